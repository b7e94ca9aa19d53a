r"""The quickstart's line: GC's steps to uniform's training loss on duplicated digits.

    python -m experiments.sampling_speed.main \
        --config=experiments/sampling_speed/configs/quickstart.py \
        --workdir=/tmp/sampling_speed_quickstart

``default.py``'s duplicated regime (10 images x 100 copies) with uniform and GC batches at
the learning rate the full study tunes for both there (0.4), one seed, 600 steps, the
target at step 300: seconds. ``experiments.quickstart`` scales the steps with its
``--gvar-steps``.
"""

from experiments.sampling_speed.configs import default


def get_config():
    config = default.get_config()
    config.regimes = default.regimes("duplicates")
    config.samplers = ("uniform", "gc")
    config.learning_rates = (0.4,)
    config.num_seeds = 1
    config.num_steps = 600
    config.target_step = 300
    return config
