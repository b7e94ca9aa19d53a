r"""Linear regression (a noisy quadratic): dimension 1000, 500 examples, batch 10.

    python -m experiments.gvar.main --config=experiments/gvar/configs/linreg.py \
        --workdir=/tmp/gvar_linreg

The setting of Faghri et al., "A Study of Gradient Variance in Deep Learning" (arXiv
2007.04532): more dimensions than examples, x ~ N(0, I/1000), targets from a random
teacher plus Gaussian noise, squared loss, zero initialisation, plain SGD with batch 10.
"""

from experiments.gvar.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "linreg"
    config.data.dim = 1000
    config.data.num_examples = 500
    config.data.noise = 0.1
    config.model.name = "linear"
    config.batch_size = 10
    config.learning_rate = 0.5
    config.num_steps = 2000
    config.log_every = 50
    config.checkpoint_every = 500
    config.gvar.measure_every = 50
    config.gvar.svrg_snapshot_every = 250
    return config
