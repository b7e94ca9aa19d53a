r"""The digits MLP on data where 10 images are repeated 100 times each (1000 extra rows).

    python -m experiments.gvar.main --config=experiments/gvar/configs/digits_duplicates.py \
        --workdir=/tmp/gvar_digits_dup

The duplicated variant of the study (its MNIST runs used 10 images x 10000 copies):
identical examples have identical gradients, the structure gradient clustering exploits.
Label noise and class imbalance are the fields ``data.label_noise`` and
``data.imbalance`` of the default config.
"""

from experiments.gvar.configs import default


def get_config():
    config = default.get_config()
    config.data.duplicates = 10
    config.data.duplicate_copies = 100
    return config
