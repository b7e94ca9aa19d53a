"""The norm-regularised logistic path: cvxpy's minimisers, optimality at tiny λ, max-margin."""

import math
import re

import cvxpy as cp
import numpy as np
import pytest

from jaxeff import robust

# Every path has this length and step count and the data one shape, so the tests share the
# compiled solver of each norm.
PATH_LENGTH, STEPS = 31, 300


def separable(n=10, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, np.sign(x @ rng.normal(size=d))


def penalty(w, q):
    """``||w||_q`` as a cvxpy expression; Fourier-L1 through an explicit DFT matrix."""
    if q == "fourier_1":
        d = w.shape[0]
        k = np.arange(d)
        dft = np.exp(-2j * np.pi * np.outer(k, k) / d) / np.sqrt(d)
        return cp.sum(cp.norm(cp.vstack([dft.real @ w, dft.imag @ w]), 2, axis=0))
    return cp.norm(w, q)


def penalty_value(w, q):
    if q == "fourier_1":
        return float(np.sum(np.abs(np.fft.fft(w, norm="ortho"))))
    return float(np.linalg.norm(w, q))


def objective(w, x, y, lam, q):
    return float(np.mean(np.logaddexp(0, -y * (x @ w))) + lam * penalty_value(w, q))


@pytest.mark.parametrize("q", [1.0, 2.0, math.inf, "fourier_1"])
def test_minimisers_match_cvxpy(q):
    """Two points of the path against cvxpy's exponential-cone solution of the same problem:
    the objective, the margins ``y_i <w, x_i>`` (unique: the loss is strictly convex in
    them) and, except for L∞, the weights. With ``d > n`` the L∞ penalty has a face of
    minimisers (coordinates below ``||w||_∞`` can move along the null space of ``x``)."""
    x, y = separable()
    log_lambdas = np.linspace(0.0, -6.0, PATH_LENGTH)
    path = np.asarray(
        robust.regularization_path(x, y, norm=q, log_lambdas=log_lambdas, steps_per_lambda=STEPS),
        np.float64,
    )
    for k in (15, 30):
        lam = math.exp(log_lambdas[k])
        w = cp.Variable(x.shape[1])
        loss = cp.sum(cp.logistic(-cp.multiply(y, x @ w))) / len(y)
        cp.Problem(cp.Minimize(loss + lam * penalty(w, q))).solve(solver="CLARABEL")
        reference = np.asarray(w.value)
        best = objective(reference, x, y, lam, q)
        assert objective(path[k], x, y, lam, q) == pytest.approx(best, rel=2e-6)
        # The largest margins sit where the loss is flat (its curvature is about e^-m): there
        # cvxpy's own solution is off by up to 0.3 % (its KKT residual at L∞ is 3e-4, the
        # path's 2e-4).
        np.testing.assert_allclose(y * (x @ path[k]), y * (x @ reference), rtol=5e-3)
        if q != math.inf:
            np.testing.assert_allclose(path[k], reference, atol=1e-3 * np.abs(reference).max())


@pytest.mark.parametrize("q", [1.0, 2.0, math.inf])
def test_optimality_conditions_at_tiny_lambda(q):
    """At λ = e^-60, where λ, the loss and its gradient all underflow float32, the weights
    satisfy ``-∇L(w) ∈ λ ∂||w||_q``: ``||∇L||_* = λ`` and ``<-∇L, w> = λ ||w||_q``, checked
    in float64 with the gradient scaled by 1/λ."""
    x, y = separable(seed=1)
    kappa = 60.0
    log_lambdas = np.linspace(0, -kappa, PATH_LENGTH)
    path = robust.regularization_path(x, y, norm=q, log_lambdas=log_lambdas, steps_per_lambda=STEPS)
    w = np.asarray(path[-1], np.float64)
    margins = y * (x @ w)
    assert margins.min() > 40  # far into the region where L itself underflows float32
    # ∇L / λ = -e^κ/n Σ_i σ(-m_i) y_i x_i, with e^κ σ(-m_i) = exp(κ - m_i - log1p(e^-m_i)).
    weights = np.exp(kappa - margins - np.log1p(np.exp(-margins))) / len(y)
    scaled_gradient = -(weights * y) @ x
    dual = {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[q]
    assert np.linalg.norm(scaled_gradient, dual) == pytest.approx(1.0, abs=1e-3)
    assert -scaled_gradient @ w == pytest.approx(np.linalg.norm(w, q), rel=1e-3)


def test_path_ends_at_the_max_margin_of_its_norm():
    """Rosset et al.: the direction tends to the max-margin classifier of the penalty's norm,
    and is further from the other norms' solutions."""
    x, y = separable()
    norms = {"1": 1.0, "2": 2.0, "inf": math.inf}
    solutions = {name: robust.max_margin(x, y, norm=q) for name, q in norms.items()}
    log_lambdas = np.linspace(0, -100, PATH_LENGTH)
    for name, q in norms.items():
        path = robust.regularization_path(
            x, y, norm=q, log_lambdas=log_lambdas, steps_per_lambda=STEPS
        )
        ratios = [
            float(robust.normalized_margin(w, x, y, norm=q)) / solutions[name].margin
            for w in path[np.array([5, 15, 30])]
        ]
        # Measured: 0.954, 0.985, 0.993 (L1); 0.955, 0.985, 0.993 (L2); 0.975, 0.991, 0.995.
        assert ratios[0] < ratios[1] < ratios[2] <= 1 + 1e-5, (name, ratios)
        assert ratios[2] > 0.99, (name, ratios)
        w = np.asarray(path[-1], np.float64)
        cosines = {
            other: float(w @ s.w / np.linalg.norm(w) / np.linalg.norm(s.w))
            for other, s in solutions.items()
        }
        assert cosines[name] > 0.98, (name, cosines)  # measured 0.9999, 1.0, 0.991
        assert max(cosines, key=cosines.get) == name, (name, cosines)


def test_example_shape_is_kept():
    """Images ``(n, H, W)`` give ``(K, H, W)`` weights, the flattened problem's reshaped."""
    x, y = separable()
    log_lambdas = np.linspace(0, -20, PATH_LENGTH)
    flat = robust.regularization_path(x, y, norm=1, log_lambdas=log_lambdas, steps_per_lambda=STEPS)
    images = robust.regularization_path(
        x.reshape(10, 4, 4), y, norm=1, log_lambdas=log_lambdas, steps_per_lambda=STEPS
    )
    assert images.shape == (PATH_LENGTH, 4, 4)
    # Float32 sums in another order, over 9300 steps.
    np.testing.assert_allclose(images.reshape(PATH_LENGTH, 16), flat, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"norm": 0.5}, "`norm`"),
        ({"x": np.ones(3)}, "`x`"),
        ({"x": np.full((4, 2), np.nan)}, "`x` must be finite"),
        ({"y": np.ones(3)}, "`y` must have shape (4,)"),
        ({"y": np.array([1, 0, 1, -1])}, "`y` must hold binary labels"),
        ({"log_lambdas": np.array([-1.0, 0.0])}, "`log_lambdas` must be finite and non-increasing"),
        ({"log_lambdas": np.zeros((2, 2))}, "`log_lambdas` must be a non-empty 1-D"),
        ({"log_lambdas": np.array([0.0, np.nan])}, "`log_lambdas`"),
        ({"steps_per_lambda": 0}, "`steps_per_lambda`"),
        ({"steps_per_lambda": 2.0}, "`steps_per_lambda`"),
    ],
)
def test_bad_input_is_refused_by_name(kwargs, message):
    arguments = {
        "x": np.array([[1.0, 2.0], [-1.0, 0.5], [2.0, -1.0], [-2.0, -2.0]]),
        "y": np.array([1, -1, 1, -1]),
        "norm": 1,
        "log_lambdas": np.array([0.0, -1.0]),
        "steps_per_lambda": 5,
    }
    arguments.update(kwargs)
    x, y = arguments.pop("x"), arguments.pop("y")
    with pytest.raises(ValueError, match=re.escape(message)):
        robust.regularization_path(x, y, **arguments)


def test_too_large_a_first_step_is_reported():
    """Starting at λ = e^-200 from w = 0, e^κ L(0) overflows: an error, not NaN weights."""
    x, y = separable()
    log_lambdas = np.linspace(-200, -210, PATH_LENGTH)
    with pytest.raises(RuntimeError, match="not finite"):
        robust.regularization_path(x, y, norm=2, log_lambdas=log_lambdas, steps_per_lambda=STEPS)
