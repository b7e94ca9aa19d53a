r"""DP-SGD on the digits with a small CNN: test accuracy against ε (under a minute).

    python -m experiments.dp.main --config=experiments/dp/configs/cnn.py \
        --workdir=/tmp/dp_digits_cnn

``default.py`` with two stages of a 3x3 convolution (8 and 16 channels), tanh and 2x2
average pooling, a dense layer of 32 and the linear head (the engine has exact
per-example rules for all of them), and a learning rate of 0.15. The sampling rate, the
steps and the noise multipliers are the MLP's, so are the ε: the two tables compare the
models at equal privacy.
"""

from experiments.dp.configs import default


def get_config():
    config = default.get_config()
    config.model.name = "cnn"
    config.learning_rate = 0.15
    return config
