r"""The study on CIFAR-10 with the small CNN of ``experiments/gvar``: as is, and duplicated.

    python -m experiments.sampling_speed.main \
        --config=experiments/sampling_speed/configs/cifar10.py \
        --config.data.data_dir=/data/tfds --workdir=/tmp/sampling_speed_cifar10

Needs CIFAR-10 prepared once as array_record (with TensorFlow installed):
``tfds build cifar10 --data_dir=/data/tfds --file_format=array_record``; it is then read
without TensorFlow. No data augmentation. Batch 128, 4000 steps (10 epochs), three
learning rates, 5 seeds: for an accelerator.
"""

from experiments.sampling_speed.configs import default


def get_config():
    config = default.get_config()
    config.regimes = default.regimes("clean", "duplicates", "label_noise")
    config.regimes.duplicates.duplicate_copies = 10000
    config.data.name = "cifar10"
    config.model.name = "cnn"
    config.model.features = (32, 64)
    config.model.dense = 256
    config.learning_rates = (0.02, 0.05, 0.1)
    config.batch_size = 128
    config.num_steps = 4000
    config.target_step = 2000
    config.eval_every = 100
    config.refresh_every = 500
    config.chunk_size = 1024
    return config
