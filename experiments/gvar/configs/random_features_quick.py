r"""The random-features sweep in about 30 seconds: three ratios, one seed, short runs.

    python -m experiments.gvar.random_features \
        --config=experiments/gvar/configs/random_features_quick.py --workdir=/tmp/rf_quick

The setting of ``random_features.py`` with ``hidden = 200``, ratios 0.3, 1 and 3, one
learning rate, one seed and 300 steps.
"""

from experiments.gvar.configs import random_features


def get_config():
    config = random_features.get_config()
    config.num_seeds = 1
    config.ratios = (0.3, 1.0, 3.0)
    config.size = 200
    config.learning_rates = (2.0,)
    config.num_steps = 300
    config.gvar.measure_every = 50
    return config
