r"""Random-features sweep: variance of SGD-B, SGD-2B and gradient clustering over hidden/N.

    python -m experiments.gvar.random_features \
        --config=experiments/gvar/configs/random_features.py --workdir=/tmp/rf

A teacher–student task after Faghri et al., "A Study of Gradient Variance in Deep
Learning" (arXiv 2007.04532): ``x ~ N(0, I/d)`` with ``d = 100``, binary labels from a
fixed random ReLU teacher of width 100, a student of ``hidden = 1000`` fixed random ReLU
features and a trained linear head (from zero), ``N = hidden / ratio`` training examples
for each ratio, plain SGD with batch ``B = 10`` at three learning rates, three seeds. Every
``gvar.measure_every`` steps: SGD-B, SGD-2B and GC (``K = 10`` clusters, re-clustered at
each measurement, batch ``B``), ``gvar.num_draws`` draws each for the mean and the
variance. About 10 minutes on 2 CPU cores.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0  # seed s of the run uses `seed + s` (data, teacher, features, batches)
    config.num_seeds = 3

    # hidden / N; `vary` is the size the ratio sets, the other one is `size`:
    # "num_examples": hidden = size, N = size / ratio (the study's sweep);
    # "hidden": N = size, hidden = ratio * size.
    config.ratios = (0.1, 0.3, 1.0, 3.0, 10.0)
    config.vary = "num_examples"
    config.size = 1000

    config.data = ml_collections.ConfigDict()
    config.data.dim = 100
    config.data.teacher_hidden = 100
    config.data.num_test = 1000

    config.batch_size = 10  # B
    config.learning_rates = (0.5, 2.0, 8.0)  # plain SGD, constant
    config.num_steps = 1000
    config.summary_fraction = 0.7  # summarise the measurements of the last 70% of training

    config.gvar = ml_collections.ConfigDict()
    config.gvar.measure_every = 50
    config.gvar.num_draws = 20  # m: draws for the mean, then m more for the variance
    config.gvar.num_clusters = 10  # K
    config.gvar.num_passes = 3  # batch-mode clustering passes at each measurement
    config.gvar.min_fraction = 0.0  # re-seed clusters smaller than this fraction of N
    config.gvar.allocation = "equal"  # slots per cluster: equal | proportional
    config.gvar.replace = True  # measurement draws with replacement
    config.gvar.chunk_size = 1024  # examples per clustering step
    config.gvar.seed = 1  # the measurement's own PRNG stream
    return config
