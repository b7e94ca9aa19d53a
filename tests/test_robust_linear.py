"""Closed-form robustness of linear classifiers against brute force over the ball."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxeff import robust

EPS = 0.3


def linf_vertices(d, eps):
    return eps * np.array(list(itertools.product([-1.0, 1.0], repeat=d)))


def l1_vertices(d, eps):
    return eps * np.concatenate([np.eye(d), -np.eye(d)])


def lp_sphere(d, eps, p, count=50_000, seed=0):
    """Dense samples of the p-sphere of radius eps (Gaussian directions, rescaled)."""
    z = np.random.default_rng(seed).normal(size=(count, d))
    return eps * z / np.linalg.norm(z, p, axis=1, keepdims=True)


def fourier_inf_vertices(eps, angles=720):
    """Extreme points of the Fourier-L∞ ball of real length-4 signals: X0, X2 = ±ε
    (real coefficients), X1 = conj(X3) = ε e^{iθ}; inverse DFT written out."""
    out = []
    for s0, s2 in itertools.product([-1.0, 1.0], repeat=2):
        for theta in np.linspace(0, 2 * np.pi, angles, endpoint=False):
            x1 = eps * np.exp(1j * theta)
            coefficients = np.array([s0 * eps, x1, s2 * eps, np.conj(x1)])
            n = np.arange(4)
            basis = np.exp(2j * np.pi * np.outer(n, n) / 4) / 2
            out.append((basis @ coefficients).real)
    return np.array(out)


def ball_samples(p, d, eps):
    if p == jnp.inf:
        return linf_vertices(d, eps), 1e-5
    if p == 1:
        return l1_vertices(d, eps), 1e-5
    if p == "fourier_inf":
        return fourier_inf_vertices(eps), 1e-4
    return lp_sphere(d, eps, p), 5e-3


def brute_binary(w, b, x, y, deltas):
    """min over the samples of y (w·(x + δ) + b), for each point."""
    return np.min(y[:, None] * ((x @ w)[:, None] + deltas @ w + b), axis=1)


def brute_multiclass(W, b, x, y, deltas):
    """min over the samples of the smallest margin of the true class over the others."""
    scores = np.einsum("nd,dk->nk", x, W)[:, None, :] + (deltas @ W)[None] + b
    true = np.take_along_axis(scores, y[:, None, None].repeat(deltas.shape[0], 1), axis=2)
    others = np.where(np.arange(W.shape[1]) == y[:, None, None], -np.inf, scores)
    return np.min(true[..., 0] - np.max(others, axis=2), axis=1)


def binary_problem(d=4, n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=d), 0.3, rng.normal(size=(n, d)), rng.choice([-1.0, 1.0], n)


def multiclass_problem(d=4, n=40, k=3, seed=1):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(d, k)),
        rng.normal(size=k),
        rng.normal(size=(n, d)),
        rng.integers(0, k, n),
    )


PERTURBATIONS = [jnp.inf, 1, 2, 3.0, "fourier_inf"]


@pytest.mark.parametrize("p", PERTURBATIONS)
def test_binary_robust_margin_equals_brute_force(p):
    w, b, x, y = binary_problem()
    deltas, tol = ball_samples(p, 4, EPS)
    brute = brute_binary(w, b, x, y, deltas)
    exact = np.asarray(robust.robust_margin(w, x, y, eps=EPS, p=p, b=b), np.float64)
    # Samples only reach the minimum from above; vertices reach it exactly.
    assert np.all(brute >= exact - 1e-5)
    np.testing.assert_allclose(brute, exact, atol=tol * np.abs(w).sum() * 10)


@pytest.mark.parametrize("p", PERTURBATIONS)
def test_multiclass_robust_margin_equals_brute_force(p):
    W, b, x, y = multiclass_problem()
    deltas, tol = ball_samples(p, 4, EPS)
    brute = brute_multiclass(W, b, x, y, deltas)
    exact = np.asarray(robust.robust_margin(W, x, y, eps=EPS, p=p, b=b), np.float64)
    assert np.all(brute >= exact - 1e-5)
    np.testing.assert_allclose(brute, exact, atol=tol * np.abs(W).sum() * 10)


def test_closed_form_worst_cases():
    w = jnp.array([1.0, -3.0, 2.0])
    x = jnp.array([[0.5, 0.1, 0.2], [1.0, 1.0, 1.0]])
    y = jnp.array([1, -1])
    delta = robust.worst_case_perturbation(w, x, y, eps=EPS, p=jnp.inf)
    np.testing.assert_allclose(delta, -EPS * np.array([[1, -1, 1], [-1, 1, -1]]) * 1.0)
    delta = robust.worst_case_perturbation(w, x, y, eps=EPS, p=2)
    np.testing.assert_allclose(delta, -EPS * np.outer([1, -1], w) / np.linalg.norm(w), rtol=1e-6)
    delta = robust.worst_case_perturbation(w, x, y, eps=EPS, p=1)
    np.testing.assert_allclose(delta, [[0, EPS, 0], [0, -EPS, 0]])
    margin = robust.robust_margin(w, x, y, eps=EPS, p=jnp.inf)
    np.testing.assert_allclose(margin, [0.5 - 0.3 + 0.4 - 6 * EPS, -(0.0) - 6 * EPS], atol=1e-6)


@pytest.mark.parametrize("p", [jnp.inf, 1, 2, 1.5, "fourier_inf", "fourier_1"])
@pytest.mark.parametrize("multiclass", [False, True])
def test_worst_case_perturbation_is_in_the_ball_and_attains_the_margin(p, multiclass):
    w, b, x, y = multiclass_problem(d=8) if multiclass else binary_problem(d=8)
    delta = robust.worst_case_perturbation(w, x, y, eps=EPS, p=p, b=b)
    assert delta.shape == x.shape
    assert np.all(np.asarray(robust.norm(delta, p, batch_dims=1)) <= EPS * (1 + 1e-5))
    attacked = robust.robust_margin(w, x + delta, y, eps=0.0, p=p, b=b)
    exact = robust.robust_margin(w, x, y, eps=EPS, p=p, b=b)
    np.testing.assert_allclose(attacked, exact, rtol=1e-5, atol=1e-5)


def test_images_with_channels():
    rng = np.random.default_rng(2)
    w, x = rng.normal(size=(4, 4, 3)), rng.normal(size=(5, 4, 4, 3))
    y = rng.choice([-1, 1], 5)
    for p in ("fourier_inf", jnp.inf):
        delta = robust.worst_case_perturbation(w, x, y, eps=0.1, p=p)
        attacked = y * np.einsum("nhwc,hwc->n", x + np.asarray(delta, np.float64), w)
        exact = robust.robust_margin(w, x, y, eps=0.1, p=p)
        np.testing.assert_allclose(attacked, exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("multiclass", [False, True])
def test_accuracy_curve_in_one_call(multiclass):
    w, b, x, y = multiclass_problem() if multiclass else binary_problem()
    eps = jnp.linspace(0.0, 1.0, 11)
    curve = robust.robust_accuracy(w, x, y, eps=eps, p=2, b=b)
    assert curve.shape == (11,)
    single = [float(robust.robust_accuracy(w, x, y, eps=float(e), p=2, b=b)) for e in eps]
    np.testing.assert_allclose(curve, single)
    assert np.all(np.diff(np.asarray(curve)) <= 0)
    if multiclass:
        clean = np.mean(np.argmax(x @ w + b, axis=1) == y)
    else:
        clean = np.mean(y * (x @ w + b) > 0)
    np.testing.assert_allclose(curve[0], clean)


@pytest.mark.parametrize("p", [2, jnp.inf, "fourier_inf"])
@pytest.mark.parametrize("multiclass", [False, True])
def test_certified_radius_is_where_each_point_flips(p, multiclass):
    w, b, x, y = multiclass_problem() if multiclass else binary_problem()
    r = np.asarray(robust.certified_radius(w, x, y, p=p, b=b), np.float64)
    correct = robust.robust_margin(w, x, y, eps=0.0, p=p, b=b) > 0
    np.testing.assert_array_equal(r > 0, correct)
    flips = r[r > 0]
    below = robust.robust_margin(w, x[r > 0], y[r > 0], eps=flips * 0.999, p=p, b=b)
    above = robust.robust_margin(w, x[r > 0], y[r > 0], eps=flips * 1.001, p=p, b=b)
    assert np.all(np.diagonal(below) > 0) and np.all(np.diagonal(above) < 0)


def test_certified_radius_is_the_distance_to_the_hyperplane():
    w, b, x, y = binary_problem()
    expected = y * (x @ w + b) / np.linalg.norm(w)
    np.testing.assert_allclose(robust.certified_radius(w, x, y, p=2, b=b), expected, rtol=1e-5)
    expected = y * (x @ w + b) / np.abs(w).max()
    np.testing.assert_allclose(robust.certified_radius(w, x, y, p=1, b=b), expected, rtol=1e-5)


def test_certified_radius_of_identical_classes():
    W = jnp.ones((2, 3))
    x = jnp.ones((1, 2))
    r = robust.certified_radius(W, x, jnp.array([0]), p=2, b=jnp.array([1.0, 0.0, 0.0]))
    assert float(r[0]) == np.inf
    r = robust.certified_radius(W, x, jnp.array([1]), p=2, b=jnp.array([1.0, 0.0, 0.0]))
    assert float(r[0]) == -np.inf


@pytest.mark.parametrize("multiclass", [False, True])
def test_max_eps_at_accuracy_is_the_edge_of_the_curve(multiclass):
    w, b, x, y = multiclass_problem() if multiclass else binary_problem()
    clean = float(robust.robust_accuracy(w, x, y, eps=0.0, p=jnp.inf, b=b))
    targets = clean * np.array([0.2, 0.5, 0.8, 1.0])
    eps = np.asarray(robust.max_eps_at_accuracy(w, x, y, accuracy=targets, p=jnp.inf, b=b))
    for a, e in zip(targets, eps, strict=True):
        assert e > 0
        assert float(robust.robust_accuracy(w, x, y, eps=e * 0.999, p=jnp.inf, b=b)) >= a
        assert float(robust.robust_accuracy(w, x, y, eps=e * 1.001, p=jnp.inf, b=b)) < a
    assert float(robust.max_eps_at_accuracy(w, x, y, accuracy=0.0, p=2, b=b)) == np.inf
    assert float(robust.max_eps_at_accuracy(w, x, y, accuracy=1.0, p=2, b=b)) <= 0


def test_max_eps_at_accuracy_rounds_the_count_exactly():
    # 0.7 * 10 is 7.000000000000001 in floating point; 7 points must suffice.
    w = jnp.array([1.0])
    x = jnp.arange(1.0, 11.0)[:, None]
    eps = robust.max_eps_at_accuracy(w, x, jnp.ones(10), accuracy=0.7, p=2)
    np.testing.assert_allclose(eps, 4.0)


def test_normalized_margin():
    w, b, x, y = binary_problem()
    expected = np.min(y * (x @ w + b)) / np.abs(w).sum()
    np.testing.assert_allclose(robust.normalized_margin(w, x, y, norm=1, b=b), expected, rtol=1e-5)


def test_jit_with_traced_eps_and_labels():
    w, b, x, y = binary_problem()
    f = jax.jit(lambda eps, y: robust.robust_accuracy(w, x, y, eps=eps, p=2, b=b))
    np.testing.assert_allclose(
        f(jnp.array([0.0, 0.5]), y),
        robust.robust_accuracy(w, x, y, eps=jnp.array([0.0, 0.5]), p=2, b=b),
    )


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_batch_sharded_over_eight_devices(axis_type):
    # Both mesh kinds: on an explicit-axes mesh a sort, top-k or gather along the sharded
    # batch axis is a type error unless the function gathers first.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    shard = lambda a: jax.device_put(np.asarray(a), NamedSharding(mesh, PartitionSpec("data")))
    eps = jnp.linspace(0.0, 1.0, 5)
    for (w, b, x, y), p in ((binary_problem(), jnp.inf), (multiclass_problem(), "fourier_inf")):
        xs, ys = shard(x.astype(np.float32)), shard(y.astype(np.int32))
        curve = jax.jit(lambda w, x, y, b, p=p: robust.robust_accuracy(w, x, y, eps=eps, p=p, b=b))
        np.testing.assert_allclose(
            curve(w, xs, ys, b), robust.robust_accuracy(w, x, y, eps=eps, p=p, b=b)
        )
        np.testing.assert_allclose(
            robust.worst_case_perturbation(w, xs, ys, eps=0.1, p=p, b=b),
            robust.worst_case_perturbation(w, x, y, eps=0.1, p=p, b=b),
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(
            robust.max_eps_at_accuracy(w, xs, ys, accuracy=np.array([0.1, 0.3]), p=p, b=b),
            robust.max_eps_at_accuracy(w, x, y, accuracy=np.array([0.1, 0.3]), p=p, b=b),
            rtol=1e-5,
        )
        np.testing.assert_allclose(
            robust.project(xs, p, 0.5, batch_dims=1),
            robust.project(x, p, 0.5, batch_dims=1),
            rtol=1e-5,
            atol=1e-6,
        )


def test_bad_inputs_name_the_argument():
    w, b, x, y = binary_problem()
    W, bk, xk, yk = multiclass_problem()
    with pytest.raises(ValueError, match="`w`"):
        robust.robust_accuracy(w[:3], x, y, eps=0.1, p=2)
    with pytest.raises(ValueError, match="`y`"):
        robust.robust_accuracy(w, x, y[:5], eps=0.1, p=2)
    with pytest.raises(ValueError, match="`y`.*-1, \\+1"):
        robust.robust_accuracy(w, x, np.where(y > 0, 1, 0), eps=0.1, p=2)
    with pytest.raises(ValueError, match="`y`.*integer"):
        robust.robust_accuracy(W, xk, yk.astype(float), eps=0.1, p=2)
    with pytest.raises(ValueError, match="`y`.*\\[0, 3\\)"):
        robust.robust_accuracy(W, xk, yk + 1, eps=0.1, p=2)
    with pytest.raises(ValueError, match="`b`"):
        robust.robust_accuracy(w, x, y, eps=0.1, p=2, b=jnp.ones(2))
    with pytest.raises(ValueError, match="`b`"):
        robust.robust_accuracy(W, xk, yk, eps=0.1, p=2, b=jnp.ones(2))
    with pytest.raises(ValueError, match="`eps`"):
        robust.robust_accuracy(w, x, y, eps=-0.1, p=2)
    with pytest.raises(ValueError, match="`eps`"):
        robust.robust_accuracy(w, x, y, eps=jnp.ones((2, 2)), p=2)
    with pytest.raises(ValueError, match="`eps`"):
        robust.worst_case_perturbation(w, x, y, eps=jnp.ones(2), p=2)
    with pytest.raises(ValueError, match="`p`"):
        robust.robust_accuracy(w, x, y, eps=0.1, p=0.5)
    with pytest.raises(ValueError, match="`p`"):
        robust.certified_radius(w, x, y, p="fourier")
    with pytest.raises(ValueError, match="`norm`"):
        robust.normalized_margin(w, x, y, norm="l2")
    with pytest.raises(ValueError, match="`accuracy`"):
        robust.max_eps_at_accuracy(w, x, y, accuracy=1.5, p=2)
    with pytest.raises(ValueError, match="`x`"):
        robust.robust_accuracy(w, np.float32(1.0), y, eps=0.1, p=2)
    with pytest.raises(ValueError, match="`x`.*finite"):
        robust.certified_radius(w, np.where(x > 1, np.nan, x), y, p=2)
    with pytest.raises(ValueError, match="`w`.*finite"):
        robust.robust_margin(np.full_like(w, np.inf), x, y, eps=0.1, p=2)
