r"""Training the digits MLP with gradient-clustering batches against uniform batches.

    python -m experiments.gvar.compare --config=experiments/gvar/configs/gc_training.py \
        --workdir=/tmp/gvar_gc_training

The default digits MLP and SGD settings; two runs, ``sampler = "uniform"`` and
``sampler = "gc"`` (10 clusters, re-clustered every 100 steps), evaluated on the whole
training and test sets every 50 steps. No variance measurement. Faghri et al., "A Study
of Gradient Variance in Deep Learning", arXiv 2007.04532.
"""

from experiments.gvar.configs import default


def get_config():
    config = default.get_config()
    config.num_steps = 2000
    config.gvar.measure_every = 50
    config.gvar.estimators = ""  # evaluation only
    config.gvar.exact = False
    config.gc.recluster_every = 100
    return config
