r"""CIFAR-10, a small CNN, batch 128, plain SGD with learning rate 0.05 for 30 epochs.

    python -m experiments.gvar.main --config=experiments/gvar/configs/cifar10.py \
        --config.data.data_dir=/data/tfds --workdir=/tmp/gvar_cifar10

Needs CIFAR-10 prepared once as array_record (with TensorFlow installed):
``tfds build cifar10 --data_dir=/data/tfds --file_format=array_record``; it is then read
without TensorFlow. No data augmentation, so every draw sees the stored images.
Faghri et al., "A Study of Gradient Variance in Deep Learning", arXiv 2007.04532.
"""

from experiments.gvar.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "cifar10"
    config.model.name = "cnn"
    config.model.features = (32, 64)
    config.model.dense = 256
    config.batch_size = 128
    config.learning_rate = 0.05
    config.num_steps = 11700  # 30 epochs of 390 steps
    config.log_every = 100
    config.checkpoint_every = 1000
    config.gvar.measure_every = 390
    config.gvar.svrg_snapshot_every = 390  # every epoch
    config.gvar.exact = False
    config.gvar.chunk_size = 1024
    return config
