r"""MNIST, the study's CNN, batch 128, SGD with learning rate 0.05 for 30 epochs.

    python -m experiments.gvar.main --config=experiments/gvar/configs/mnist.py \
        --config.data.data_dir=/data/tfds --workdir=/tmp/gvar_mnist

Needs MNIST prepared once as array_record (with TensorFlow installed):
``tfds build mnist --data_dir=/data/tfds --file_format=array_record``; it is then read
without TensorFlow. ``--config.model.name=mlp --config.model.hidden=(512,512)`` gives the
MLP instead. Faghri et al., "A Study of Gradient Variance in Deep Learning", arXiv
2007.04532 (MNIST: lr 0.05, 30 epochs, 10 draws every 100 steps, SVRG snapshot every 2
epochs).
"""

from experiments.gvar.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "mnist"
    config.model.name = "cnn"
    config.model.features = (32, 64)
    config.model.dense = 128
    config.batch_size = 128
    config.learning_rate = 0.05
    config.num_steps = 14040  # 30 epochs of 468 steps
    config.log_every = 100
    config.checkpoint_every = 1000
    config.gvar.measure_every = 200
    config.gvar.svrg_snapshot_every = 936  # 2 epochs
    config.gvar.exact = False  # one full pass over 60000 examples per measurement
    config.gvar.chunk_size = 2048
    return config
