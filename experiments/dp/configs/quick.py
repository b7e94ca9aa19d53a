r"""The MLP run at tiny size, 60 steps: seconds, for the tests.

    python -m experiments.dp.main --config=experiments/dp/configs/quick.py \
        --workdir=/tmp/dp_quick

``default.py`` with 32 hidden units, an expected batch of 64 and two evaluations.
"""

from experiments.dp.configs import default


def get_config():
    config = default.get_config()
    config.model.hidden = (32,)
    config.expected_batch_size = 64
    config.num_steps = 60
    config.eval_every = 30
    config.checkpoint_every = 30
    return config
