r"""A linear classifier on the digits: the attacks against the exact robust accuracy.

    python -m experiments.robust_cnn.main --config=experiments/robust_cnn/configs/linear.py \
        --workdir=/tmp/robust_cnn_linear

Multi-class logistic regression on the pixels, whose robust accuracy in every norm has a
closed form (:func:`jaxeff.robust.robust_accuracy`). Without the image box and with one
attack toward each other class (multi-targeted, margin loss), PGD reaches that worst
case: the curves of ``robust_accuracy.png`` lie on the dashed exact ones.
"""

from experiments.robust_cnn.configs import default


def get_config():
    config = default.get_config()
    config.model.name = "linear"
    config.learning_rate = 0.01
    config.num_steps = 1000
    config.attack.clip = False
    config.attack.multi_targeted = True
    config.attack.loss = "margin"
    config.attack.steps = 20
    config.attack.step_size = 0.5
    return config
