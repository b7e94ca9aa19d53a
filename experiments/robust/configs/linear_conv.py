r"""Gradient descent on a linear circular-convolution network vs a fully connected one.

    python -m experiments.robust.main --config=experiments/robust/configs/linear_conv.py \
        --workdir=/tmp/robust_linear_conv

Gaussian points ``x ~ N(0, I)`` in ``d = 100`` dimensions, ``n = 25`` training points
(``d/n = 4``) labelled by a random teacher, ``num_seeds`` seeds. Two networks with one
hidden layer and no biases, first layer ``α·identity`` (``model.init_scale``) and a zero
readout: a full-width single-channel circular convolution (``LinearConvNet``) and a
``d x d`` dense layer (``DeepLinear``). Both take ``num_steps`` unit gradient steps on
``log L`` of length ``step_scale / max_i ||x_i||_2``; their equivalent linear classifiers
are measured every ``log_every`` steps against the cvxpy max-margin classifiers in L1,
L2, L∞, Fourier-L1 and Fourier-L∞. The convolutional network ends near the Fourier-L1
max-margin (0.98 of its margin at 5000 steps) and is the more robust to Fourier-L∞
perturbations; the fully connected one ends at the L2 max-margin. Faghri et al., "Bridging
the Gap Between Adversarial Robustness and Optimization Bias", arXiv 2102.08868;
Gunasekar et al., "Implicit Bias of Gradient Descent on Linear Convolutional Networks",
NeurIPS 2018.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.experiment = "linear_conv"  # experiments/robust/main.py runs linear_conv.py
    config.seed = 0  # seed s of the run uses data seed `seed + s`
    config.num_seeds = 3

    config.data = ml_collections.ConfigDict()
    config.data.dim = 100
    config.data.num_train = 25
    config.data.num_test = 1000  # held-out points for the robust accuracy

    config.model = ml_collections.ConfigDict()
    # α of the first layer α·identity; small α is the regime of the implicit bias (the
    # readout starts at zero either way).
    config.model.init_scale = 0.01

    config.num_steps = 5000
    config.step_scale = 0.3  # c in the unit step length c / max_i ||x_i||_2
    config.log_every = 50  # steps between measurements of the networks' classifiers

    # Robust accuracy at eps from 0 to max_eps_ratio times the training max-margin radius
    # against the attack (the max-margin in the attack's dual norm), num_eps values.
    config.robust = ml_collections.ConfigDict()
    config.robust.num_eps = 21
    config.robust.max_eps_ratio = 2.0
    return config
