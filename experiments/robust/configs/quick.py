r"""One d/n, one seed, a few thousand steps: the whole study in seconds.

    python -m experiments.robust.main --config=experiments/robust/configs/quick.py \
        --workdir=/tmp/robust_quick

The default setting at ``d/n = 4`` (``n = 25``) only, with 3000 optimiser steps and the
regularisation path in 26 steps of 4 in ``log λ``, for tests and the quickstart.
"""

from experiments.robust.configs import default


def get_config():
    config = default.get_config()
    config.num_seeds = 1
    config.data.d_over_n = (4,)
    config.data.num_test = 500
    config.num_steps = 3000
    config.regularization.path_length = 26
    config.robust.num_eps = 11
    return config
