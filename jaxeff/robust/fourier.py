"""The orthonormal discrete Fourier transform used by the Fourier-domain norms.

Axis convention. An array holds ``batch_dims`` leading batch axes followed by one
*example*; the transform acts on each example independently:

* example of rank 0 or 1, ``(d,)``: a 1-D signal, DFT over its last axis;
* example of rank 2, ``(H, W)``: a single-channel image, 2-D DFT over both axes;
* example of rank 3, ``(H, W, C)``: an image with channels last, one 2-D DFT over
  ``(H, W)`` per channel (the convention of Fourier-domain attacks on CIFAR-10).

The transform is orthonormal (``norm="ortho"``), so it preserves inner products:
``<x, y> = Re <F x, F y>`` for real ``x, y`` (Parseval). A real signal's transform is
Hermitian-symmetric, ``X[k] = conj(X[-k])``; the Fourier norms count *every* coefficient of
the full (not the one-sided ``rfft``) transform, so each conjugate pair is counted twice.
This is the counting under which Fourier-L1 and Fourier-L∞ are dual norms of each other
on real signals.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["dft", "fourier_axes", "idft"]

MAX_EXAMPLE_RANK = 3


def fourier_axes(example_ndim: int) -> tuple[int, ...]:
    """The (negative) axes the DFT acts on for an example of rank ``example_ndim``.

    Args:
      example_ndim: rank of one example (the array's rank minus its batch axes).

    Returns:
      ``(-1,)`` for a 1-D signal (rank 0 or 1), ``(-2, -1)`` for an ``(H, W)`` image,
      ``(-3, -2)`` for an ``(H, W, C)`` image (per channel).

    Raises:
      ValueError: for an example of rank above 3, which has no Fourier convention here.
    """
    if example_ndim <= 1:
        return (-1,)
    if example_ndim == 2:
        return (-2, -1)
    if example_ndim == 3:
        return (-3, -2)
    raise ValueError(
        "Fourier norms take examples of rank 1 (d,), 2 (H, W) or 3 (H, W, C); got an "
        f"example of rank {example_ndim}."
    )


def _check_batch_dims(x: ArrayLike, batch_dims: Any, name: str) -> None:
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int):
        raise ValueError(f"`batch_dims` must be a non-negative integer, got {batch_dims!r}.")
    if not 0 <= batch_dims <= jnp.ndim(x):
        raise ValueError(
            f"`batch_dims` must be between 0 and the rank of `{name}` ({jnp.ndim(x)}), "
            f"got {batch_dims}."
        )


def dft(x: ArrayLike, *, batch_dims: int = 0) -> jax.Array:
    """Orthonormal DFT of each example of ``x`` (see the module's axis convention).

    .. math::

      X[k] = \\frac{1}{\\sqrt{N}} \\sum_n x[n]\\, e^{-2\\pi i\\, k \\cdot n / N}

    over the signal axes (``N = d`` or ``N = H W``).

    Args:
      x: real array, ``batch_dims`` batch axes then one example of rank 0 to 3.
      batch_dims: number of leading batch axes.

    Returns:
      Complex array of the shape of ``x`` (a rank-0 example becomes shape ``(1,)``).

    Raises:
      ValueError: for a bad ``batch_dims`` or an example of rank above 3.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import dft
      >>> print(jnp.round(jnp.abs(dft(jnp.ones(4))), 3))
      [2. 0. 0. 0.]
    """
    _check_batch_dims(x, batch_dims, "x")
    x = jnp.asarray(x)
    example_ndim = x.ndim - batch_dims
    axes = fourier_axes(example_ndim)
    if example_ndim == 0:
        x = x[..., None]
    if len(axes) == 1:
        return jnp.fft.fft(x, axis=-1, norm="ortho")
    return jnp.fft.fft2(x, axes=axes, norm="ortho")


def idft(coefficients: ArrayLike, *, batch_dims: int = 0) -> jax.Array:
    """Inverse of :func:`dft`, keeping the real part.

    For the transform of a real signal, or any Hermitian-symmetric set of coefficients,
    the inverse is real and this is exact. For other coefficients it returns
    ``Re F⁻¹ X = F⁻¹ (X + X̃) / 2`` with ``X̃[k] = conj(X[-k])``: the Hermitian
    symmetrisation, i.e. the real signal closest to ``F⁻¹ X``.

    Args:
      coefficients: complex array, ``batch_dims`` batch axes then one example of rank 1
        to 3, as returned by :func:`dft`.
      batch_dims: number of leading batch axes.

    Returns:
      Real array of the same shape.

    Raises:
      ValueError: for a bad ``batch_dims`` or an example of rank above 3.
    """
    _check_batch_dims(coefficients, batch_dims, "coefficients")
    axes = fourier_axes(jnp.ndim(coefficients) - batch_dims)
    if len(axes) == 1:
        out = jnp.fft.ifft(coefficients, axis=-1, norm="ortho")
    else:
        out = jnp.fft.ifft2(coefficients, axes=axes, norm="ortho")
    return jnp.real(out)
