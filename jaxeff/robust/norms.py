"""Lp and Fourier-domain norms, their duals, and the directions that attain them.

A norm is named by ``p``:

* a number ``p >= 1`` (``1``, ``2``, ``jnp.inf`` or any other) for the Lp norm
  ``||x||_p = (Σ_i |x_i|^p)^{1/p}`` of the flattened example;
* ``"fourier_1"`` / ``"fourier_inf"`` for the L1 / L∞ norm of the orthonormal DFT of the
  example, ``||x||_{F,1} = Σ_k |X_k|`` and ``||x||_{F,∞} = max_k |X_k|`` (axis
  convention and the counting of a real signal's coefficients in
  :mod:`jaxeff.robust.fourier`).

The dual norm ``||g||_* = sup_{||d|| <= 1} <g, d>`` of Lp is Lq with ``1/p + 1/q = 1``;
Fourier-L1 and Fourier-L∞ are dual to each other. Hölder's inequality
``|<g, δ>| <= ||δ|| ||g||_*`` holds with equality at ``δ = ||δ|| · d*(g)``, where
:func:`maximizing_direction` returns ``d*(g) = argmax_{||d|| <= 1} <g, d>``.

Every function takes ``batch_dims`` leading batch axes and treats the rest of the array as
one example.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jaxeff.robust.fourier import _check_batch_dims, dft, idft

__all__ = ["FOURIER_NORMS", "dual_exponent", "dual_norm", "maximizing_direction", "norm"]

FOURIER_NORMS = ("fourier_1", "fourier_inf")
_FOURIER_EXPONENT = {"fourier_1": 1.0, "fourier_inf": math.inf}


def check_norm(p: Any, name: str = "p") -> float | str:
    """The canonical form of a norm name: a float ``>= 1`` (``inf`` included) or a string.

    Args:
      p: ``1``, ``2``, ``jnp.inf``, any real number ``>= 1``, ``"fourier_1"`` or
        ``"fourier_inf"``. Must be a static (not traced) value.
      name: the caller's name of the argument, used in the error message.

    Returns:
      ``float(p)`` for a number, the string itself for a Fourier norm.

    Raises:
      ValueError: naming the argument for anything else (``p < 1``, NaN, booleans, arrays,
        unknown strings).
    """
    if isinstance(p, str):
        if p in FOURIER_NORMS:
            return p
        raise ValueError(
            f"`{name}` must be a number >= 1 (1, 2, jnp.inf, ...) or one of {FOURIER_NORMS}, "
            f"got the unknown norm {p!r}."
        )
    bad = isinstance(p, bool | jax.core.Tracer) or np.ndim(p) != 0
    if not bad and not isinstance(p, numbers.Real):
        bad = np.asarray(p).dtype.kind not in "iuf"
    if bad or not float(p) >= 1:
        raise ValueError(
            f"`{name}` must be a number >= 1 (1, 2, jnp.inf, ...) or one of {FOURIER_NORMS}, "
            f"got {p!r}."
        )
    return float(p)


@overload
def dual_exponent(p: str) -> str: ...
@overload
def dual_exponent(p: float) -> float: ...
def dual_exponent(p: float | str) -> float | str:
    """The dual of the norm named ``p``: ``q`` with ``1/p + 1/q = 1``.

    ``1 ↔ inf``, ``2 ↔ 2``, ``p ↔ p / (p - 1)``, ``"fourier_1" ↔ "fourier_inf"``.

    Args:
      p: a number ``>= 1`` (``jnp.inf`` included) or a Fourier norm name.

    Returns:
      The dual exponent as a float, or the dual Fourier norm name.

    Raises:
      ValueError: for an invalid norm.

    Example:
      >>> from jaxeff.robust import dual_exponent
      >>> dual_exponent(1), dual_exponent(3), dual_exponent("fourier_inf")
      (inf, 1.5, 'fourier_1')
    """
    p = check_norm(p)
    if isinstance(p, str):
        return "fourier_inf" if p == "fourier_1" else "fourier_1"
    if p == 1:
        return math.inf
    if p == math.inf:
        return 1.0
    return p / (p - 1)


def _flatten(x, batch_dims):
    x = jnp.asarray(x)
    return x.reshape(x.shape[:batch_dims] + (-1,))


def _coefficients(x, p, batch_dims):
    """``(flat vectors, exponent)``: the example as a vector in the norm's own coordinates."""
    if isinstance(p, str):
        return _flatten(dft(x, batch_dims=batch_dims), batch_dims), _FOURIER_EXPONENT[p]
    return _flatten(x, batch_dims), p


def _safe_divide(a, b):
    positive = b > 0
    return jnp.where(positive, a / jnp.where(positive, b, 1), 0)


def vector_norm(v: jax.Array, p: float) -> jax.Array:
    """Lp norm over the last axis of a real or complex ``v``, for a canonical float ``p``."""
    a = jnp.abs(v)
    if p == 1:
        return jnp.sum(a, axis=-1)
    if p == math.inf:
        return jnp.max(a, axis=-1, initial=0.0)
    if p == 2:
        return jnp.sqrt(jnp.sum(jnp.square(a), axis=-1))
    scale = jnp.max(a, axis=-1, keepdims=True, initial=0.0)
    ratio = _safe_divide(a, scale)
    return scale[..., 0] * jnp.sum(ratio**p, axis=-1) ** (1 / p)


def phase(v: jax.Array) -> jax.Array:
    """``v / |v|`` elementwise (``sign`` for real arrays), 0 where ``v`` is 0."""
    if jnp.iscomplexobj(v):
        return _safe_divide(v, jnp.abs(v))
    return jnp.sign(v)


def replicated(a: jax.Array) -> jax.Array:
    """``a`` gathered onto every device when it is sharded over an explicit-axes mesh, where
    operations along a sharded axis (sort, top-k, FFT) are type errors; otherwise ``a``."""
    sharding = jax.typeof(a).sharding
    if any(entry is not None for entry in getattr(sharding, "spec", ())):
        return jax.sharding.reshard(a, NamedSharding(sharding.mesh, PartitionSpec()))
    return a


def top_k_direction(v: jax.Array, k: int) -> jax.Array:
    """``argmax <v, d>`` over ``max(||d||_∞, ||d||_1 / k) <= 1``: the phase of ``v`` on its
    ``k`` largest-magnitude coordinates (last axis), 0 elsewhere. ``k = 1`` is the L1 ball."""
    n = v.shape[-1]
    if k == 1:  # a reduction, which also runs on a sharded last axis
        index = jnp.argmax(jnp.abs(v), axis=-1)
        mask = jnp.arange(n) == index[..., None]
        return jnp.where(mask, phase(v), 0)
    v = replicated(v)
    _, index = jax.lax.top_k(jnp.abs(v), min(int(k), n))
    flat = index.reshape(-1, index.shape[-1])
    mask = jax.vmap(lambda i: jnp.zeros(n, bool).at[i].set(True))(flat)
    return jnp.where(mask.reshape(v.shape), phase(v), 0)


def vector_direction(v: jax.Array, p: float) -> jax.Array:
    """``argmax_{||d||_p <= 1} Re <v, d>`` over the last axis, for a canonical float ``p``."""
    if p == 1:
        return top_k_direction(v, 1)
    if p == math.inf:
        return phase(v)
    if p == 2:
        return _safe_divide(v, vector_norm(v, 2)[..., None])
    q = p / (p - 1)
    ratio = _safe_divide(jnp.abs(v), vector_norm(v, q)[..., None])
    return phase(v) * ratio ** (q - 1)


def norm(x: ArrayLike, p: float | str, *, batch_dims: int = 0) -> jax.Array:
    """The norm named ``p`` of each example of ``x``.

    .. math::

      ||x||_p = \\Big(\\sum_i |x_i|^p\\Big)^{1/p},\\qquad
      ||x||_{F,1} = \\sum_k |(F x)_k|,\\qquad ||x||_{F,\\infty} = \\max_k |(F x)_k|

    with ``F`` the orthonormal DFT (:func:`jaxeff.robust.dft`).

    Args:
      x: real array: ``batch_dims`` batch axes, then one example (any rank for Lp,
        rank 0 to 3 for the Fourier norms).
      p: ``1``, ``2``, ``jnp.inf``, any number ``>= 1``, ``"fourier_1"`` or
        ``"fourier_inf"``.
      batch_dims: number of leading batch axes.

    Returns:
      Array of shape ``x.shape[:batch_dims]``.

    Raises:
      ValueError: naming the argument for an invalid ``p`` or ``batch_dims``, or an
        example of rank above 3 with a Fourier norm.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import norm
      >>> x = jnp.array([[3.0, -4.0], [1.0, 1.0]])
      >>> print(norm(x, 1, batch_dims=1), norm(x, jnp.inf, batch_dims=1))
      [7. 2.] [4. 1.]
    """
    p = check_norm(p)
    _check_batch_dims(x, batch_dims, "x")
    return _norm(jnp.asarray(x), p, batch_dims)


@functools.partial(jax.jit, static_argnames=("p", "batch_dims"))
def _norm(x, p, batch_dims):
    v, exponent = _coefficients(x, p, batch_dims)
    return vector_norm(v, exponent)


def dual_norm(x: ArrayLike, p: float | str, *, batch_dims: int = 0) -> jax.Array:
    """The dual of the norm named ``p``: ``norm(x, dual_exponent(p))``.

    .. math::

      ||g||_* = \\sup_{||d||_p \\le 1} \\langle g, d\\rangle = ||g||_q,\\qquad
      \\frac{1}{p} + \\frac{1}{q} = 1

    A linear score ``wᵀx`` moves by at most ``ε ||w||_*`` under ``||δ||_p <= ε``.

    Args:
      x: real array, as in :func:`norm`.
      p: the (primal) norm, as in :func:`norm`.
      batch_dims: number of leading batch axes.

    Returns:
      Array of shape ``x.shape[:batch_dims]``.

    Raises:
      ValueError: as :func:`norm`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import dual_norm
      >>> print(dual_norm(jnp.array([3.0, -4.0]), jnp.inf))
      7.0
    """
    return norm(x, dual_exponent(p), batch_dims=batch_dims)


def maximizing_direction(g: ArrayLike, p: float | str, *, batch_dims: int = 0) -> jax.Array:
    """The unit vector of the norm named ``p`` most aligned with ``g``.

    .. math::

      d^*(g) = \\arg\\max_{||d||_p \\le 1} \\langle g, d\\rangle,\\qquad
      \\langle g, d^*(g)\\rangle = ||g||_*

    * L1: ``sign(g_i) e_i`` at the largest ``|g_i|`` (the first one on ties);
    * L2: ``g / ||g||_2``;
    * L∞: ``sign(g)``;
    * Lp: ``sign(g) |g|^{q-1} / ||g||_q^{q-1}``, ``q`` the dual exponent;
    * Fourier-L∞: ``F⁻¹(G / |G|)`` with ``G = F g``;
    * Fourier-L1: the real signal ``Re F⁻¹(G_k / |G_k| e_k)`` at the largest ``|G_k|``
      (half of the unit mass on ``k``, half on its conjugate partner ``-k``).

    The worst-case perturbation of a linear score ``wᵀx`` in an ε-ball is
    ``-ε d*(w)``; the steepest-descent step in the norm is ``-||g||_* d*(g)``. Where
    ``g = 0`` the direction is 0.

    Args:
      g: real array: ``batch_dims`` batch axes, then one example.
      p: the norm of the ball, as in :func:`norm`.
      batch_dims: number of leading batch axes.

    Returns:
      Real array of the shape of ``g``.

    Raises:
      ValueError: as :func:`norm`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import maximizing_direction
      >>> g = jnp.array([0.5, -2.0, 1.0])
      >>> print(maximizing_direction(g, 1), maximizing_direction(g, jnp.inf))
      [ 0. -1.  0.] [ 1. -1.  1.]
    """
    p = check_norm(p)
    _check_batch_dims(g, batch_dims, "g")
    return _maximizing_direction(jnp.asarray(g), p, batch_dims)


@functools.partial(jax.jit, static_argnames=("p", "batch_dims"))
def _maximizing_direction(g, p, batch_dims):
    v, exponent = _coefficients(g, p, batch_dims)
    d = vector_direction(v, exponent)
    if isinstance(p, str):
        shape = g.shape + (1,) * (g.ndim == batch_dims)
        d = idft(d.reshape(shape), batch_dims=batch_dims)
    return d.reshape(g.shape).astype(g.dtype)
