"""Euclidean projections onto the ε-balls of the Lp and Fourier-domain norms."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxeff.robust.fourier import _check_batch_dims, dft, idft
from jaxeff.robust.norms import _FOURIER_EXPONENT, check_norm, phase, vector_norm

__all__ = ["project"]

# Bisection steps of the general-Lp projection: 2^-48 of the bracket is below float32
# and float64 working precision for the magnitudes that reach it after scaling by ε.
_BISECTION_STEPS = 48
# Smallest radius, relative to the largest magnitude, that the general-Lp bisection
# solves for (keeps the scaled problem finite in float32).
_TINY = 1e-20


def check_eps(eps: ArrayLike, name: str = "eps") -> None:
    """Refuses a known negative or NaN radius; traced values pass unchecked."""
    if isinstance(eps, jax.core.Tracer):
        return
    value = np.asarray(eps)
    if value.dtype.kind not in "biuf" or value.dtype == bool:
        raise ValueError(f"`{name}` must be a real number (or array) >= 0, got {eps!r}.")
    if value.size and not np.all(value >= 0):
        raise ValueError(f"`{name}` must be >= 0, got {eps!r}.")


def _l1_ball_magnitudes(a, radius):
    """Projection of non-negative ``a`` (last axis) onto ``{t >= 0 : Σ t <= radius}``.

    Sorting-based (Held, Wolfe, Crowder 1974; Duchi et al. 2008): ``t = max(a - θ, 0)``
    with ``θ = max_j (Σ_{i<=j} u_i - radius) / j`` over the sorted ``u`` (descending);
    the sequence rises up to the last kept coordinate and falls after it.
    """
    u = -jnp.sort(-a, axis=-1)
    count = jnp.arange(1, a.shape[-1] + 1, dtype=a.dtype)
    theta = jnp.max((jnp.cumsum(u, axis=-1) - radius) / count, axis=-1, keepdims=True)
    inside = jnp.sum(a, axis=-1, keepdims=True) <= radius
    return jnp.where(inside, a, jnp.maximum(a - theta, 0))


def _lp_ball_magnitudes(a, p, radius):
    """Projection of non-negative ``a`` onto ``{t >= 0 : ||t||_p <= radius}``, ``1 < p < ∞``.

    KKT: ``t_i + μ p t_i^{p-1} = a_i`` with ``μ >= 0`` such that ``||t||_p = radius``. Both
    the per-coordinate equation (increasing in ``t_i`` on ``[0, a_i]``) and ``μ``
    (``||t(μ)||_p`` decreases in ``μ``; ``μ <= ||a||_q / p`` on the unit ball) are solved
    by bisection, keeping the feasible side of each bracket. The problem is scaled to the
    unit ball; a radius below ``_TINY`` times the largest ``|a_i|`` is raised to it (the
    answer is then within that fraction of 0) and the result scaled back into the ball.
    """
    largest = jnp.max(a, axis=-1, keepdims=True, initial=0.0)
    solved_radius = jnp.maximum(radius, _TINY * largest)
    scaled = _safe_divide(a, solved_radius)
    mu_high = vector_norm(scaled, p / (p - 1))[..., None] / p

    def magnitudes(mu):
        def step(_, bracket):
            low, high = bracket
            mid = (low + high) / 2
            above = mid + mu * p * mid ** (p - 1) > scaled
            return jnp.where(above, low, mid), jnp.where(above, mid, high)

        return jax.lax.fori_loop(0, _BISECTION_STEPS, step, (jnp.zeros_like(scaled), scaled))[0]

    def outer(_, bracket):
        low, high = bracket
        mid = (low + high) / 2
        feasible = jnp.sum(magnitudes(mid) ** p, axis=-1, keepdims=True) <= 1
        return jnp.where(feasible, low, mid), jnp.where(feasible, mid, high)

    mu = jax.lax.fori_loop(0, _BISECTION_STEPS, outer, (jnp.zeros_like(mu_high), mu_high))[1]
    t = solved_radius * magnitudes(mu)
    t = t * jnp.minimum(1, _safe_divide(radius, vector_norm(t, p)[..., None]))
    inside = vector_norm(a, p)[..., None] <= radius
    return jnp.where(inside, a, t)


def _safe_divide(a, b):
    positive = b > 0
    return jnp.where(positive, a / jnp.where(positive, b, 1), 0)


@functools.partial(jax.jit, static_argnames=("p", "batch_dims"))
def _project(x, radius, p, batch_dims):
    """Projection of validated inputs; ``radius`` has shape ``batch shape + (1,)``."""
    batch_shape = x.shape[:batch_dims]
    if isinstance(p, str):
        coefficients = dft(x, batch_dims=batch_dims)
        v = coefficients.reshape(batch_shape + (-1,))
        exponent = _FOURIER_EXPONENT[p]
    else:
        v, exponent = x.reshape(batch_shape + (-1,)), p
    a = jnp.abs(v)
    if exponent == math.inf:
        magnitudes = jnp.minimum(a, radius)
    elif exponent == 1:
        magnitudes = _l1_ball_magnitudes(a, radius)
    elif exponent == 2:
        magnitudes = a * jnp.minimum(1, _safe_divide(radius, vector_norm(a, 2)[..., None]))
    else:
        magnitudes = _lp_ball_magnitudes(a, exponent, radius)
    out = phase(v) * magnitudes
    if isinstance(p, str):
        out = idft(out.reshape(coefficients.shape), batch_dims=batch_dims)
    return out.reshape(x.shape).astype(x.dtype)


def project(x: ArrayLike, p: float | str, eps: ArrayLike, *, batch_dims: int = 0) -> jax.Array:
    """Euclidean projection of each example of ``x`` onto the ball ``||δ|| <= eps``.

    .. math::

      \\Pi(x) = \\arg\\min_{||\\delta|| \\le \\epsilon} ||\\delta - x||_2

    * L∞: ``clip(x, -ε, ε)``;
    * L2: ``x · min(1, ε / ||x||_2)``;
    * L1: ``sign(x) max(|x| - θ, 0)``, ``θ`` found exactly by sorting (Duchi et al.);
    * Lp, ``1 < p < ∞``: ``sign(x) t`` with ``t_i + μ p t_i^{p-1} = |x_i|`` (KKT), by
      bisection to working precision;
    * Fourier-L∞: clip the modulus of every DFT coefficient at ε (phases kept), then the
      inverse DFT;
    * Fourier-L1: the L1 projection of the coefficients' moduli (phases kept), then the
      inverse DFT.

    The DFT is orthonormal, so a projection in the Fourier domain is the projection of the
    signal; both Fourier rules keep a real signal's Hermitian symmetry, so the result is
    real. Points already in the ball are returned unchanged.

    Args:
      x: real array: ``batch_dims`` batch axes, then one example (rank 0 to 3 for the
        Fourier norms).
      p: ``1``, ``2``, ``jnp.inf``, any number ``>= 1``, ``"fourier_1"`` or
        ``"fourier_inf"``.
      eps: radius ``>= 0``: a scalar or an array broadcastable to ``x.shape[:batch_dims]``
        (one radius per example).
      batch_dims: number of leading batch axes.

    Returns:
      Array of the shape and dtype of ``x``.

    Raises:
      ValueError: naming the argument for an invalid ``p``, a negative or NaN ``eps``
        (when not traced), a bad ``batch_dims`` or an ``eps`` that does not broadcast.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import project
      >>> print(project(jnp.array([3.0, -1.0, 0.5]), 1, 2.0))
      [ 2. -0.  0.]

    References:
      Duchi, Shalev-Shwartz, Singer, Chandra, `Efficient projections onto the l1-ball for
      learning in high dimensions <https://doi.org/10.1145/1390156.1390191>`_, ICML 2008.
    """
    p = check_norm(p)
    check_eps(eps)
    _check_batch_dims(x, batch_dims, "x")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    batch_shape = x.shape[:batch_dims]
    try:
        radius = jnp.broadcast_to(jnp.asarray(eps, x.dtype), batch_shape)[..., None]
    except ValueError:
        raise ValueError(
            f"`eps` must be a scalar or broadcast to the batch shape {batch_shape}, got shape "
            f"{jnp.shape(eps)}."
        ) from None
    return _project(x, radius, p, batch_dims)
