"""Max-margin classifiers against scikit-learn's SVM and independent linear programs."""

import math

import cvxpy as cp
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog
from sklearn.svm import SVC, LinearSVC

from jaxeff import robust


def separable(n=12, d=6, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.sign(x @ rng.normal(size=d) + offset)
    return x, y


def cosine(a, b):
    return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


def test_l2_matches_a_hard_margin_svm_with_bias():
    x, y = separable(offset=0.5)
    sol = robust.max_margin(x, y, norm=2, bias=True)
    svm = SVC(kernel="linear", C=1e8, tol=1e-10).fit(x, y)
    w_svm, b_svm = svm.coef_.ravel(), float(svm.intercept_[0])
    assert cosine(sol.w, w_svm) > 0.999
    np.testing.assert_allclose(sol.margin, 1 / np.linalg.norm(w_svm), rtol=1e-3)
    np.testing.assert_allclose(sol.b, b_svm, rtol=1e-3, atol=1e-3)


def test_l2_matches_a_hard_margin_svm_without_bias():
    x, y = separable(seed=1)
    sol = robust.max_margin(x, y, norm=2)
    assert sol.b == 0.0
    svm = LinearSVC(fit_intercept=False, loss="hinge", C=1e4, tol=1e-9, max_iter=10_000_000)
    w_svm = svm.fit(x, y).coef_.ravel()
    assert cosine(sol.w, w_svm) > 0.999
    np.testing.assert_allclose(sol.margin, 1 / np.linalg.norm(w_svm), rtol=1e-3)


def linprog_max_margin(x, y, q, bias):
    """``min ||w||_q s.t. y_i (w·x_i + b) >= 1`` as a plain LP for scipy's HiGHS.

    L1: variables ``(u, v, b)`` with ``w = u - v``, ``u, v >= 0``, minimise ``Σ u + v``.
    L∞: variables ``(w, t, b)``, ``-t <= w_j <= t``, minimise ``t``.
    """
    n, d = x.shape
    yx = y[:, None] * x
    free = (None, None)
    if q == 1:
        c = np.concatenate([np.ones(2 * d), [0.0]])
        a_ub = -np.hstack([yx, -yx, y[:, None]])
        bounds = [(0, None)] * (2 * d) + [free if bias else (0, 0)]
        res = linprog(c, A_ub=a_ub, b_ub=-np.ones(n), bounds=bounds, method="highs")
        return res.x[:d] - res.x[d : 2 * d], res.x[-1], res.fun
    c = np.concatenate([np.zeros(d), [1.0, 0.0]])
    margin_rows = -np.hstack([yx, np.zeros((n, 1)), y[:, None]])
    eye = np.eye(d)
    box_rows = np.vstack(
        [
            np.hstack([eye, -np.ones((d, 1)), np.zeros((d, 1))]),
            np.hstack([-eye, -np.ones((d, 1)), np.zeros((d, 1))]),
        ]
    )
    a_ub = np.vstack([margin_rows, box_rows])
    b_ub = np.concatenate([-np.ones(n), np.zeros(2 * d)])
    bounds = [free] * d + [(0, None), free if bias else (0, 0)]
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    return res.x[:d], res.x[-1], res.fun


@pytest.mark.parametrize("q", [1, math.inf])
@pytest.mark.parametrize("bias", [False, True])
def test_l1_and_linf_match_an_independent_linear_program(q, bias):
    x, y = separable(n=10, d=8, seed=2, offset=0.4)
    sol = robust.max_margin(x, y, norm=q, bias=bias)
    w, b, value = linprog_max_margin(x, y, q, bias)
    np.testing.assert_allclose(sol.margin, 1 / value, rtol=1e-6)
    np.testing.assert_allclose(sol.w, w, atol=1e-6)
    np.testing.assert_allclose(sol.b, b, atol=1e-6)


def test_margin_is_the_normalized_margin_and_the_certified_radius():
    x, y = separable(seed=3)
    for q in (1, 2, math.inf, 3.0, "fourier_1", "fourier_inf"):
        sol = robust.max_margin(x, y, norm=q)
        np.testing.assert_allclose(
            robust.normalized_margin(sol.w, x, y, norm=q), sol.margin, rtol=1e-4
        )
        # The max-margin classifier in q is robust to the dual-norm ball of that radius.
        radius = robust.certified_radius(sol.w, x, y, p=robust.dual_exponent(q))
        np.testing.assert_allclose(np.min(radius), sol.margin, rtol=1e-4)


def test_general_p_beats_every_other_solution_in_its_own_norm():
    x, y = separable(seed=4)
    candidates = [robust.max_margin(x, y, norm=q).w for q in (1, 2, math.inf, 1.5)]
    sol = robust.max_margin(x, y, norm=3.0)
    for w in candidates:
        assert float(robust.normalized_margin(w, x, y, norm=3.0)) < sol.margin * (1 + 1e-6)
    assert sol.margin > float(robust.normalized_margin(candidates[1], x, y, norm=3.0)) * 1.001


def test_fourier_l1_matches_a_complex_formulation():
    x, y = separable(n=8, d=8, seed=5)
    sol = robust.max_margin(x, y, norm="fourier_1")
    w = cp.Variable(8)
    dft = np.fft.fft(np.eye(8), norm="ortho")
    problem = cp.Problem(cp.Minimize(cp.norm1(dft @ w)), [cp.multiply(y, x @ w) >= 1])
    problem.solve(solver="CLARABEL")
    np.testing.assert_allclose(sol.margin, 1 / problem.value, rtol=1e-5)
    np.testing.assert_allclose(sol.w, w.value, atol=1e-4)


def test_images_keep_their_shape():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(6, 3, 3, 2))
    y = np.sign(np.einsum("nhwc,hwc->n", x, rng.normal(size=(3, 3, 2))))
    sol = robust.max_margin(x, y, norm="fourier_1", bias=True)
    assert sol.w.shape == (3, 3, 2) and isinstance(sol.b, float)
    np.testing.assert_allclose(
        robust.normalized_margin(sol.w, x, y, norm="fourier_1", b=sol.b), sol.margin, rtol=1e-4
    )


@pytest.mark.parametrize("q", [1, 2, math.inf, "fourier_1"])
def test_non_separable_data_raises(q):
    x = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    y = np.array([1, -1, 1])
    with pytest.raises(ValueError, match="not linearly separable"):
        robust.max_margin(x, y, norm=q, bias=True)


def test_separable_only_with_a_bias():
    x = np.array([[1.0], [2.0], [3.0]])
    y = np.array([-1, 1, 1])
    with pytest.raises(ValueError, match="not linearly separable without a bias"):
        robust.max_margin(x, y, norm=2)
    sol = robust.max_margin(x, y, norm=2, bias=True)
    np.testing.assert_allclose(sol.margin, 0.5, rtol=1e-6)  # boundary at 1.5


def test_bad_inputs_name_the_argument():
    x, y = separable()
    with pytest.raises(ValueError, match="`norm`"):
        robust.max_margin(x, y, norm=0.5)
    with pytest.raises(ValueError, match="`norm`"):
        robust.max_margin(x, y, norm="l1")
    with pytest.raises(ValueError, match="`y`"):
        robust.max_margin(x, (y > 0).astype(int), norm=2)
    with pytest.raises(ValueError, match="`y`"):
        robust.max_margin(x, y[:-1], norm=2)
    with pytest.raises(ValueError, match="`y`.*single class"):
        robust.max_margin(x, np.ones(len(y)), norm=2, bias=True)
    with pytest.raises(ValueError, match="`x`"):
        robust.max_margin(x[0], y[:1], norm=2)
    with pytest.raises(ValueError, match="`x`"):
        robust.max_margin(np.where(x > 1, np.nan, x), y, norm=2)
    with pytest.raises(ValueError, match="rank"):
        robust.max_margin(np.ones((2, 2, 2, 2, 2)), np.array([1, -1]), norm="fourier_1")


def test_accepts_jax_arrays():
    x, y = separable()
    sol = robust.max_margin(jnp.asarray(x), jnp.asarray(y), norm=jnp.inf)
    assert isinstance(sol, robust.MaxMarginSolution) and sol.w.dtype == np.float64
