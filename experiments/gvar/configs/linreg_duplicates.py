r"""Linear regression where 10 examples are repeated 500 times each (5000 extra rows).

    python -m experiments.gvar.main --config=experiments/gvar/configs/linreg_duplicates.py \
        --workdir=/tmp/gvar_linreg_dup

The noisy quadratic of ``linreg.py`` with duplicated examples: identical examples have
identical gradients, so gradient clustering can put each group in a cluster of its own
and its variance falls below that of SGD with twice the batch. Faghri et al., "A Study of
Gradient Variance in Deep Learning" (arXiv 2007.04532).
"""

from experiments.gvar.configs import linreg


def get_config():
    config = linreg.get_config()
    config.data.duplicates = 10
    config.data.duplicate_copies = 500
    return config
