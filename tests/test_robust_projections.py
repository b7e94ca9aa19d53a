"""Projections onto Lp and Fourier balls: in the ball, idempotent, optimal."""

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_robust_norms import SHAPES, explicit_dft

from jaxeff import robust

NORMS = [1, 2, jnp.inf, 1.5, 3.0, "fourier_1", "fourier_inf"]


def cvxpy_projection(x, p, eps):
    """Projection by a conic solver: ``min ||z - x||² s.t. ||z||_p <= eps``."""
    z = cp.Variable(x.size)
    if isinstance(p, str):
        basis = np.eye(x.size).reshape((x.size,) + x.shape)
        f = np.stack([explicit_dft(b).ravel() for b in basis], axis=1)
        moduli = cp.norm(cp.vstack([f.real @ z, f.imag @ z]), 2, axis=0)
        constraint = (cp.sum(moduli) if p == "fourier_1" else cp.max(moduli)) <= eps
    else:
        constraint = cp.pnorm(z, float(p)) <= eps
    cp.Problem(cp.Minimize(cp.sum_squares(z - x.ravel())), [constraint]).solve(solver="CLARABEL")
    return z.value.reshape(x.shape)


cases = st.tuples(st.sampled_from(SHAPES), st.sampled_from(NORMS), st.integers(0, 2**31 - 1))


@settings(max_examples=30, deadline=None)
@given(cases, st.floats(0.0, 2.0))
def test_projection_is_in_the_ball_and_idempotent(case, eps):
    shape, p, seed = case
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2
    z = robust.project(x, p, eps)
    assert z.shape == x.shape and z.dtype == x.dtype
    assert float(robust.norm(z, p)) <= eps * (1 + 1e-5) + 1e-6
    np.testing.assert_allclose(robust.project(z, p, eps), z, rtol=1e-4, atol=1e-5)
    inside = x * (eps / max(float(robust.norm(x, p)), 1e-12)) * 0.5
    np.testing.assert_allclose(robust.project(inside, p, eps), inside, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("shape", [(6,), (3, 2, 2)])
def test_projection_matches_a_conic_solver(p, shape):
    x = np.random.default_rng(3).normal(size=shape) * 2
    eps = 0.7
    expected = cvxpy_projection(x, p, eps)
    got = robust.project(jnp.asarray(x, jnp.float32), p, eps)
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_l1_projection_closed_form():
    # Soft-thresholding at θ = 1: |3| - 1 = 2, the others fall to 0.
    np.testing.assert_allclose(robust.project(jnp.array([3.0, -1.0, 0.5]), 1, 2.0), [2, 0, 0])
    np.testing.assert_allclose(robust.project(jnp.array([3.0, -3.0, 0.5]), 1, 2.0), [1, -1, 0])
    np.testing.assert_allclose(robust.project(jnp.array([3.0, -3.0]), 1, 0.0), [0, 0])


def test_linf_and_l2_closed_forms():
    x = jnp.array([3.0, -4.0, 0.5])
    np.testing.assert_allclose(robust.project(x, jnp.inf, 1.0), [1.0, -1.0, 0.5])
    np.testing.assert_allclose(robust.project(x, 2, 1.0), x / np.linalg.norm(x), rtol=1e-6)


@pytest.mark.parametrize("shape", [(16,), (8, 8), (4, 6, 3)])
def test_fourier_inf_projection_against_an_explicit_dft(shape):
    x = np.random.default_rng(4).normal(size=shape)
    eps = 0.5
    coefficients = explicit_dft(x)
    moduli = np.abs(coefficients)
    clipped = np.where(moduli > eps, coefficients * eps / np.maximum(moduli, 1e-300), coefficients)
    # Inverse of the orthonormal DFT: conjugate transform of the conjugate.
    expected = np.conj(explicit_dft_complex(np.conj(clipped)))
    assert np.max(np.abs(expected.imag)) < 1e-10  # clipping kept the Hermitian symmetry
    got = robust.project(jnp.asarray(x, jnp.float32), "fourier_inf", eps)
    assert not jnp.iscomplexobj(got)
    np.testing.assert_allclose(got, expected.real, atol=1e-5)
    assert np.max(np.abs(explicit_dft(np.asarray(got)))) <= eps * (1 + 1e-5)


def explicit_dft_complex(z):
    """The explicit orthonormal DFT of a complex array (real and imaginary parts)."""
    return explicit_dft(z.real) + 1j * explicit_dft(z.imag)


def test_batched_projection_with_one_radius_per_example():
    x = np.random.default_rng(5).normal(size=(2, 2, 5)).astype(np.float32) * 3
    eps = np.array([[0.1, 0.5], [0.0, 3.0]], np.float32)
    for p in (1, 3.0, "fourier_inf"):
        z = robust.project(x, p, eps, batch_dims=2)
        for i in range(2):
            for j in range(2):
                np.testing.assert_allclose(
                    z[i, j], robust.project(x[i, j], p, eps[i, j]), rtol=1e-5, atol=1e-6
                )


def test_projection_jits_with_a_traced_radius():
    f = jax.jit(lambda x, eps: robust.project(x, 1, eps))
    np.testing.assert_allclose(f(jnp.array([3.0, -1.0, 0.5]), 2.0), [2, 0, 0])


@pytest.mark.parametrize("eps", [-0.1, np.nan, np.array([1.0, -1.0])])
def test_negative_radius_is_refused(eps):
    with pytest.raises(ValueError, match="`eps`"):
        robust.project(jnp.ones((2, 3)), 2, eps, batch_dims=1)


def test_radius_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="`eps`"):
        robust.project(jnp.ones((2, 3)), 2, jnp.ones(3), batch_dims=1)
    with pytest.raises(ValueError, match="`p`"):
        robust.project(jnp.ones(3), 0.9, 1.0)
