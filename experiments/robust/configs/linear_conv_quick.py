r"""The linear-convolution experiment at d = 32, n = 8, one seed, 1000 steps: seconds.

    python -m experiments.robust.main \
        --config=experiments/robust/configs/linear_conv_quick.py --workdir=/tmp/robust_conv_quick

For tests and the notebook's size: the same ``d/n = 4`` as ``linear_conv.py``.
"""

from experiments.robust.configs import linear_conv


def get_config():
    config = linear_conv.get_config()
    config.num_seeds = 1
    config.data.dim = 32
    config.data.num_train = 8
    config.data.num_test = 500
    config.num_steps = 1000
    config.robust.num_eps = 11
    return config
