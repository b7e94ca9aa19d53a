"""Norms, duals and worst-case directions against numpy and Hölder's inequality."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxeff import robust

NORMS = [1, 2, jnp.inf, 1.5, 3.0, "fourier_1", "fourier_inf"]
# One example shape per Fourier convention: 1-D signal, (H, W) image, (H, W, C) image.
SHAPES = [(1,), (5,), (8,), (3, 4), (2, 3, 2), (4, 3, 3)]


def explicit_dft(x):
    """Orthonormal DFT written out from its definition (no FFT), same axis convention."""
    x = np.asarray(x, np.float64)

    def matrix(n):
        k = np.arange(n)
        return np.exp(-2j * np.pi * np.outer(k, k) / n) / np.sqrt(n)

    if x.ndim == 1:
        return matrix(x.shape[0]) @ x
    if x.ndim == 2:
        return matrix(x.shape[0]) @ x @ matrix(x.shape[1]).T
    return np.stack([explicit_dft(x[..., c]) for c in range(x.shape[-1])], axis=-1)


def numpy_norm(x, p):
    if isinstance(p, str):
        moduli = np.abs(explicit_dft(x)).ravel()
        return moduli.sum() if p == "fourier_1" else moduli.max()
    return np.linalg.norm(np.asarray(x, np.float64).ravel(), p)


def test_dual_exponent_table():
    assert robust.dual_exponent(1) == math.inf
    assert robust.dual_exponent(jnp.inf) == 1.0
    assert robust.dual_exponent(np.inf) == 1.0
    assert robust.dual_exponent(2) == 2.0
    assert robust.dual_exponent(3) == pytest.approx(1.5)
    assert robust.dual_exponent(1.5) == pytest.approx(3.0)
    assert robust.dual_exponent("fourier_1") == "fourier_inf"
    assert robust.dual_exponent("fourier_inf") == "fourier_1"


@pytest.mark.parametrize("p", NORMS)
def test_dual_of_dual_is_the_norm(p):
    twice = robust.dual_exponent(robust.dual_exponent(p))
    assert twice == (p if isinstance(p, str) else pytest.approx(float(p)))


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_norm_and_dual_norm_match_numpy(p, shape):
    rng = np.random.default_rng(len(shape) * 10 + shape[0])
    x = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(robust.norm(x, p), numpy_norm(x, p), rtol=2e-5)
    q = robust.dual_exponent(p)
    np.testing.assert_allclose(robust.dual_norm(x, p), numpy_norm(x, q), rtol=2e-5)


def test_fourier_norm_counts_every_coefficient_of_a_real_signal():
    # cos(2π n / 8) has two coefficients of modulus sqrt(8)/2 (k = 1 and k = 7).
    x = np.cos(2 * np.pi * np.arange(8) / 8)
    np.testing.assert_allclose(robust.norm(x, "fourier_1"), 2 * np.sqrt(8) / 2, rtol=1e-6)
    np.testing.assert_allclose(robust.norm(x, "fourier_inf"), np.sqrt(8) / 2, rtol=1e-6)


def test_large_p_norm_does_not_overflow():
    x = jnp.array([1e30, 2e30, -3e30])
    expected = np.linalg.norm([1.0, 2.0, 3.0], 7) * 1e30
    np.testing.assert_allclose(robust.norm(x, 7.0), expected, rtol=1e-6)
    assert float(robust.norm(jnp.zeros(3), 7.0)) == 0.0


@pytest.mark.parametrize("p", NORMS)
def test_batch_dims_equals_a_loop(p):
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 3, 2)).astype(np.float32)
    batched = robust.norm(x, p, batch_dims=2)
    looped = [[robust.norm(x[i, j], p) for j in range(2)] for i in range(3)]
    np.testing.assert_allclose(batched, np.array(looped), rtol=1e-5)
    d = robust.maximizing_direction(x, p, batch_dims=2)
    np.testing.assert_allclose(d[1, 0], robust.maximizing_direction(x[1, 0], p), atol=1e-6)


examples = st.tuples(st.sampled_from(SHAPES), st.sampled_from(NORMS), st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(examples)
def test_holder_inequality_attained_by_the_maximizing_direction(case):
    shape, p, seed = case
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    delta = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.1, 3)
    inner = abs(float(np.sum(w * delta)))
    bound = float(robust.norm(delta, p)) * float(robust.dual_norm(w, p))
    assert inner <= bound * (1 + 1e-5) + 1e-6
    star = robust.maximizing_direction(w, p)
    assert star.shape == w.shape and star.dtype == w.dtype
    assert float(robust.norm(star, p)) <= 1 + 1e-5
    np.testing.assert_allclose(jnp.vdot(w, star), robust.dual_norm(w, p), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("p", NORMS)
def test_maximizing_direction_of_zero_is_zero(p):
    assert not np.any(np.asarray(robust.maximizing_direction(jnp.zeros((2, 3)), p)))


def test_maximizing_direction_closed_forms():
    g = jnp.array([0.5, -2.0, 1.0])
    np.testing.assert_array_equal(robust.maximizing_direction(g, 1), [0.0, -1.0, 0.0])
    np.testing.assert_array_equal(robust.maximizing_direction(g, jnp.inf), [1.0, -1.0, 1.0])
    np.testing.assert_allclose(robust.maximizing_direction(g, 2), g / np.linalg.norm(g), rtol=1e-6)
    # Fourier-L∞: all coefficients at modulus 1, phases of g's.
    x = np.random.default_rng(1).normal(size=(4, 4, 3))
    d = np.asarray(robust.maximizing_direction(x, "fourier_inf"), np.float64)
    np.testing.assert_allclose(np.abs(explicit_dft(d)), 1.0, rtol=1e-5)


def test_jit_and_grad():
    f = jax.jit(lambda x: robust.norm(x, 3.0, batch_dims=1))
    x = jnp.arange(6.0).reshape(2, 3) - 2
    np.testing.assert_allclose(f(x), [np.linalg.norm([-2, -1, 0], 3), np.linalg.norm([1, 2, 3], 3)])
    g = jax.grad(lambda x: robust.norm(x, 2))(jnp.array([3.0, 4.0]))
    np.testing.assert_allclose(g, [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("bad", [0.5, 0, -1, math.nan, "l2", "fourier_2", True, [1, 2], None])
def test_invalid_norms_name_the_argument(bad):
    with pytest.raises(ValueError, match="`p`"):
        robust.norm(jnp.ones(3), bad)
    with pytest.raises(ValueError, match="`p`"):
        robust.dual_exponent(bad)


def test_traced_norm_is_refused():
    with pytest.raises(ValueError, match="`p`"):
        jax.jit(lambda p: robust.dual_exponent(p))(2.0)


def test_fourier_norm_of_rank_4_example_is_refused():
    with pytest.raises(ValueError, match="rank"):
        robust.norm(jnp.ones((2, 2, 2, 2)), "fourier_1")
    np.testing.assert_allclose(robust.norm(jnp.ones((2, 2, 2, 2)), "fourier_1", batch_dims=1), 4.0)


@pytest.mark.parametrize("batch_dims", [-1, 3, 1.0, True])
def test_bad_batch_dims(batch_dims):
    with pytest.raises(ValueError, match="`batch_dims`"):
        robust.norm(jnp.ones((2, 3)), 2, batch_dims=batch_dims)
