r"""Steepest descent and norm regularisation in L2, L1, L∞ against the max-margin classifiers.

    python -m experiments.robust.main --config=experiments/robust/configs/default.py \
        --workdir=/tmp/robust_linear

Gaussian points ``x ~ N(0, I)`` in ``d = 100`` dimensions, ``n = d / ratio`` training
points for each ratio of ``data.d_over_n``, labels ``sign(<x, w_teacher>)`` from a random
teacher (noiseless), zero init, logistic loss, ``num_seeds`` seeds. Gradient descent (L2),
coordinate descent (L1) and sign descent (L∞) take unit steps ``η d*(g)`` of the gradient
of ``log L`` with ``η = c / max_i ||x_i||_*`` (``step_scale``; the settings of
``benchmarks/robust_steepest.py`` that reach 0.99 of the max-margin). The logistic loss
plus ``λ ||w||_q`` (q = L1, L2, L∞) is minimised along ``log λ`` from 0 to
``regularization.min_log_lambda`` (``e^-100``: 0.99 of the max-margin), warm-started,
``steps_per_lambda`` proximal-gradient steps each. All are compared with the cvxpy
max-margin classifiers in the same three norms. Faghri et al., "Bridging the Gap Between
Adversarial Robustness and Optimization Bias", arXiv 2102.08868.

The linear circular-convolution experiment has its own config, ``linear_conv.py``.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.experiment = "linear"  # experiments/robust/main.py runs train.train_and_evaluate
    config.seed = 0  # seed s of the run uses data seed `seed + s`
    config.num_seeds = 3

    config.data = ml_collections.ConfigDict()
    config.data.dim = 100
    config.data.d_over_n = (1, 2, 4, 8, 16, 32)  # n = round(dim / ratio)
    config.data.num_test = 1000  # held-out points for the robust accuracy

    config.num_steps = 20_000
    # c in the step size c / max_i ||x_i||_* of each optimiser's unit steps.
    config.step_scale = ml_collections.ConfigDict()
    config.step_scale.gradient_descent = 1.0
    config.step_scale.coordinate_descent = 0.3
    config.step_scale.sign_descent = 1.0

    # Logistic loss + λ||w||_q at log λ = 0, ..., min_log_lambda (path_length values, evenly
    # spaced: steps of 2 in log λ), each from the previous solution.
    config.regularization = ml_collections.ConfigDict()
    config.regularization.min_log_lambda = -100.0
    config.regularization.path_length = 51
    config.regularization.steps_per_lambda = 60

    # Robust accuracy at eps from 0 to max_eps_ratio times the training max-margin radius
    # against the attack (the max-margin in the attack's dual norm), num_eps values.
    config.robust = ml_collections.ConfigDict()
    config.robust.num_eps = 21
    config.robust.max_eps_ratio = 2.0
    return config
