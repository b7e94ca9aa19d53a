"""Steepest descent in a norm: hand-computed steps, optax composition, implicit bias."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxeff import robust

G = np.array([0.5, -2.0, 1.0, 0.25], np.float32)
LR = 0.1


def hand_step(g, norm, normalize=False, top_k=None):
    """``-lr ||g||_* d*(g)`` written out per norm with numpy."""
    g = np.asarray(g, np.float64)
    if top_k is not None:
        keep = np.argsort(-np.abs(g))[:top_k]
        d = np.zeros_like(g)
        d[keep] = np.sign(g[keep])
        scale = np.abs(g[keep]).sum()
    elif norm == 2:
        d, scale = g / np.linalg.norm(g), np.linalg.norm(g)
    elif norm == 1:
        i = np.argmax(np.abs(g))
        d, scale = np.sign(g[i]) * np.eye(g.size)[i], np.abs(g[i])
    elif norm == math.inf:
        d, scale = np.sign(g), np.abs(g).sum()
    elif norm == "fourier_inf":
        c = np.fft.fft(g, norm="ortho")
        d, scale = np.fft.ifft(c / np.abs(c), norm="ortho").real, np.abs(c).sum()
    elif norm == "fourier_1":
        c = np.fft.fft(g, norm="ortho")
        k = np.argmax(np.abs(c))
        one = np.zeros_like(c)
        one[k] = c[k] / np.abs(c[k])
        d, scale = np.fft.ifft(one, norm="ortho").real, np.abs(c[k])
    else:  # general p, dual exponent q
        q = norm / (norm - 1)
        scale = np.linalg.norm(g, q)
        d = np.sign(g) * (np.abs(g) / scale) ** (q - 1)
    return -LR * (d if normalize else scale * d)


@pytest.mark.parametrize("norm", [2, 1, math.inf, 3.0, 1.5, "fourier_1", "fourier_inf"])
@pytest.mark.parametrize("normalize", [False, True])
def test_one_step_against_a_hand_computed_update(norm, normalize):
    tx = robust.steepest_descent(LR, norm=norm, normalize=normalize)
    updates, _ = tx.update(jnp.asarray(G), tx.init(jnp.asarray(G)))
    np.testing.assert_allclose(updates, hand_step(G, norm, normalize), rtol=1e-5, atol=1e-7)


def test_fourier_step_of_an_image_is_real_and_matches_a_per_channel_dft():
    g = np.random.default_rng(0).normal(size=(4, 4, 2)).astype(np.float32)
    tx = robust.scale_by_steepest_descent("fourier_inf")
    u, _ = tx.update(jnp.asarray(g), tx.init(g))
    c = np.fft.fft2(g, axes=(0, 1), norm="ortho")
    expected = np.abs(c).sum() * np.fft.ifft2(c / np.abs(c), axes=(0, 1), norm="ortho").real
    np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-5)
    assert u.dtype == jnp.float32


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_coordinate_descent(k):
    tx = robust.steepest_descent(LR, norm=1, top_k=k)
    updates, _ = tx.update(jnp.asarray(G), tx.init(jnp.asarray(G)))
    np.testing.assert_allclose(updates, hand_step(G, 1, top_k=k), rtol=1e-6)
    if k == G.size:  # all coordinates: sign descent scaled by ||g||_1
        np.testing.assert_allclose(updates, hand_step(G, math.inf), rtol=1e-6)


def test_unit_sign_step_is_optax_sign_sgd():
    ours = robust.steepest_descent(LR, norm=jnp.inf, normalize=True)
    theirs = optax.sign_sgd(LR)
    g = jnp.asarray(G)
    np.testing.assert_allclose(ours.update(g, ours.init(g))[0], theirs.update(g, theirs.init(g))[0])


def test_a_pytree_is_one_vector():
    grads = {"a": jnp.array([0.5, -2.0]), "b": jnp.array([[1.0, 3.0]]), "c": jnp.array(-0.5)}
    flat = np.array([0.5, -2.0, 1.0, 3.0, -0.5])
    for norm in (1, math.inf, 2, 3.0):
        tx = robust.steepest_descent(LR, norm=norm)
        updates, _ = tx.update(grads, tx.init(grads))
        got = np.concatenate([np.ravel(updates[k]) for k in ("a", "b", "c")])
        np.testing.assert_allclose(got, hand_step(flat, norm), rtol=1e-6)
        assert jax.tree.structure(updates) == jax.tree.structure(grads)
    # Fourier norms: the coefficients of every leaf form one vector. The largest is leaf
    # b's (1 + 3) / sqrt(2) at frequency 0 (leaf a's are 1.5 and 2.5 over sqrt(2)), so only
    # b moves, by 4 / sqrt(2) times the inverse DFT of that unit coefficient.
    tx = robust.scale_by_steepest_descent("fourier_1")
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(updates["a"], [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(updates["b"], [[2.0, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(updates["c"], 0.0, atol=1e-7)
    tx = robust.scale_by_steepest_descent("fourier_inf", normalize=True)
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(updates["c"], -1.0)


def test_zero_gradient_gives_a_zero_step():
    for norm in (1, 2, math.inf, 3.0, "fourier_1", "fourier_inf"):
        tx = robust.steepest_descent(LR, norm=norm, normalize=True)
        updates, _ = tx.update(jnp.zeros(4), tx.init(jnp.zeros(4)))
        assert not np.any(np.asarray(updates))


def test_composes_with_chain_and_a_schedule():
    schedule = optax.linear_schedule(1.0, 0.5, transition_steps=2)
    tx = optax.chain(optax.clip(1.5), robust.steepest_descent(schedule, norm=1))
    params = jnp.zeros(4)
    state = tx.init(params)
    g = jnp.asarray(G)
    u1, state = tx.update(g, state, params)
    u2, state = tx.update(g, state, params)
    # clip(1.5) turns -2 into -1.5; the coordinate step keeps only that coordinate.
    np.testing.assert_allclose(u1, [0, 1.5, 0, 0])
    np.testing.assert_allclose(u2, [0, 0.75 * 1.5, 0, 0])


def test_jit_does_not_recompile():
    tx = robust.steepest_descent(LR, norm=math.inf)
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(None)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    params = jnp.zeros(4)
    state = tx.init(params)
    for i in range(3):
        params, state = step(params, state, jnp.asarray(G) * (i + 1))
    assert len(traces) == 1
    np.testing.assert_allclose(params, hand_step(G, math.inf) * 6, rtol=1e-6)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_parameters_sharded_over_eight_devices(axis_type):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    g = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    sharded = {"k": jax.device_put(g, NamedSharding(mesh, PartitionSpec("data"))), "b": G}
    for norm, top_k in ((1, None), (1, 3), (math.inf, None), ("fourier_1", None)):
        tx = robust.steepest_descent(LR, norm=norm, top_k=top_k)
        updates, _ = jax.jit(tx.update)(sharded, tx.init(sharded))
        expected, _ = tx.update({"k": g, "b": G}, tx.init(sharded))
        np.testing.assert_allclose(updates["k"], expected["k"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(updates["b"], expected["b"], rtol=1e-5, atol=1e-7)


def log_logistic(margins):
    """``log(softplus(-m))``, finite for large margins (it tends to ``-m``)."""
    large = margins > 15
    safe = jnp.where(large, 0.0, margins)
    return jnp.where(large, -margins, jnp.log(jax.nn.softplus(-safe)))


# Step size c / max_i ||x_i||_*² on log L: the logistic loss with steps η / L(w).
CONVERGENCE = [
    (2, 1.0),
    (1, 0.3),
    (math.inf, 0.3),
    (3.0, 0.3),
    ("fourier_1", 0.3),
    ("fourier_inf", 0.3),
]


@pytest.mark.parametrize(("norm", "c"), CONVERGENCE)
def test_converges_in_direction_to_its_own_max_margin(norm, c):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 10))
    y = np.sign(x @ rng.normal(size=10))
    reference = robust.max_margin(x, y, norm=norm)
    xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    log_loss = lambda w: jax.nn.logsumexp(log_logistic(ys * (xs @ w)))
    scale = float(jnp.max(robust.dual_norm(xs, norm, batch_dims=1)))
    tx = robust.steepest_descent(c / scale**2, norm=norm)

    @jax.jit
    def train(w):
        def body(carry, _):
            w, state = carry
            updates, state = tx.update(jax.grad(log_loss)(w), state, w)
            return (optax.apply_updates(w, updates), state), None

        return jax.lax.scan(body, (w, tx.init(w)), None, length=10_000)[0][0]

    w = np.asarray(train(jnp.zeros(10)), np.float64)
    cosine = w @ reference.w / np.linalg.norm(w) / np.linalg.norm(reference.w)
    assert cosine > 0.99
    others = [robust.max_margin(x, y, norm=q).w for q in (1, 2, math.inf) if q != norm]
    assert all(abs(o @ w) / np.linalg.norm(o) / np.linalg.norm(w) < cosine for o in others)


def test_line_search_takes_the_loss():
    x = jnp.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -1.0]])
    y = jnp.array([1.0, -1.0, -1.0])
    loss = lambda w: jnp.mean(jax.nn.softplus(-y * (x @ w)))
    tx = robust.steepest_descent(1.0, norm=2, linesearch=True)

    @jax.jit
    def step(w, state):
        value, grad = jax.value_and_grad(loss)(w)
        updates, state = tx.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(w, updates), state, value

    w = jnp.zeros(2)
    state = tx.init(w)
    values = []
    for _ in range(20):
        w, state, value = step(w, state)
        values.append(float(value))
    assert np.all(np.diff(values) < 0) and values[-1] < 1e-3
    grad = jax.grad(loss)(w)
    with pytest.raises(TypeError):
        tx.update(grad, state, w)
    custom = robust.steepest_descent(
        1.0, norm=1, linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=5)
    )
    value = loss(w)
    updates, _ = custom.update(grad, custom.init(w), w, value=value, grad=grad, value_fn=loss)
    assert float(loss(w + updates)) <= float(value)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="`norm`"):
        robust.steepest_descent(0.1, norm=0.5)
    with pytest.raises(ValueError, match="`norm`"):
        robust.scale_by_steepest_descent("l2")
    with pytest.raises(ValueError, match="`top_k`"):
        robust.steepest_descent(0.1, norm=2, top_k=2)
    with pytest.raises(ValueError, match="`top_k`"):
        robust.steepest_descent(0.1, norm=1, top_k=0)
    with pytest.raises(ValueError, match="`normalize`"):
        robust.steepest_descent(0.1, norm=1, normalize="yes")
    with pytest.raises(ValueError, match="`linesearch`"):
        robust.steepest_descent(0.1, norm=1, linesearch="armijo")
