r"""CIFAR-10: a three-stage CNN, then PGD in L∞, L2 and Fourier-L∞ at ε up to 16/255.

    python -m experiments.robust_cnn.main --config=experiments/robust_cnn/configs/cifar10.py \
        --config.data.data_dir=/data/tfds --workdir=/tmp/robust_cnn_cifar10

Needs CIFAR-10 prepared once as array_record (with TensorFlow installed):
``tfds build cifar10 --data_dir=/data/tfds --file_format=array_record``; it is then read
without TensorFlow. A standard (not adversarially) trained CNN, no data augmentation,
Adam for 30 epochs; the first 1000 test images attacked with 20 PGD steps of ε/8 and
one restart, ε from 1/255 to 16/255 for L∞ and Fourier-L∞ (the paper's ε = 8/255 makes
the spectrum figure) and the usual L2 radii. ``--config.eval.num_examples=0`` attacks all
10000. Faghri, Gowal, Vasconcelos, Fleet, Pedregosa, Le Roux, "Bridging the Gap Between
Adversarial Robustness and Optimization Bias", arXiv 2102.08868.
"""

from experiments.robust_cnn.configs import default

E = 1 / 255


def get_config():
    config = default.get_config()
    config.data.name = "cifar10"
    config.model.features = (32, 64, 128)
    config.model.dense = 256
    config.batch_size = 128
    config.learning_rate = 0.001
    config.num_steps = 11700  # 30 epochs of 390 steps
    config.log_every = 100
    config.checkpoint_every = 1000
    config.eval.num_examples = 1000
    config.attack.eps.linf = (0.0, 1 * E, 2 * E, 4 * E, 8 * E, 16 * E)
    config.attack.eps.fourier_inf = (0.0, 1 * E, 2 * E, 4 * E, 8 * E, 16 * E)
    config.attack.eps.l2 = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0)
    config.attack.spectrum_eps = 8 * E
    config.attack.batch_size = 250
    return config
