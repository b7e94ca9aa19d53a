r"""The study on MNIST with the MLP 784-512-512-10: as is, and 10 images x 10000 copies.

    python -m experiments.sampling_speed.main \
        --config=experiments/sampling_speed/configs/mnist.py \
        --config.data.data_dir=/data/tfds --workdir=/tmp/sampling_speed_mnist

Needs MNIST prepared once as array_record (with TensorFlow installed):
``tfds build mnist --data_dir=/data/tfds --file_format=array_record``; it is then read
without TensorFlow. Batch 128, 3000 steps (6.4 epochs), 5 seeds, three learning rates:
hours on a CPU, minutes on an accelerator. The duplicated regime is the study's (Faghri et
al., "A Study of Gradient Variance in Deep Learning", arXiv 2007.04532).
"""

from experiments.sampling_speed.configs import default


def get_config():
    config = default.get_config()
    config.regimes = default.regimes("clean", "duplicates")
    config.regimes.duplicates.duplicate_copies = 10000
    config.data.name = "mnist"
    config.model.hidden = (512, 512)
    config.learning_rates = (0.05, 0.1, 0.2)
    config.batch_size = 128
    config.num_steps = 3000
    config.target_step = 1500
    config.eval_every = 100
    config.refresh_every = 500
    config.chunk_size = 2048
    return config
