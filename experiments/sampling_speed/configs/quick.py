r"""The study at tiny size: two regimes, two learning rates, two seeds, 40 steps (seconds).

    python -m experiments.sampling_speed.main \
        --config=experiments/sampling_speed/configs/quick.py --workdir=/tmp/sampling_quick

``default.py`` on the first 240 digits with a hidden layer of 16, 4 images repeated 40
times in the duplicated regime, 4 clusters and batches of 16.
"""

from experiments.sampling_speed.configs import default


def get_config():
    config = default.get_config()
    config.regimes = default.regimes("clean", "duplicates")
    config.regimes.duplicates.duplicates = 4
    config.regimes.duplicates.duplicate_copies = 40
    config.learning_rates = (0.2, 0.5)
    config.num_seeds = 2
    config.data.max_examples = 240
    config.model.hidden = (16,)
    config.batch_size = 16
    config.num_steps = 40
    config.target_step = 20
    config.eval_every = 5
    config.refresh_every = 10
    config.chunk_size = 128
    config.gc.num_clusters = 4
    return config
