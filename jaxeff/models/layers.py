"""Small building blocks shared by the VSE encoders: normalisation, initialisers, checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: jax.Array, axis: int = -1, *, eps: float = 1e-12) -> jax.Array:
    r"""Scales ``x`` to unit L2 norm along ``axis``.

    .. math::

        \hat x = \frac{x}{\max(\lVert x \rVert_2, \epsilon)}

    The reference code divides by the norm directly; the ``eps`` floor keeps the value
    (zero) and the gradient (finite) defined at the origin. The norm is computed in at
    least float32, and the result has the dtype of ``x``.

    Args:
        x: array to normalise.
        axis: axis along which the norm is taken.
        eps: smallest norm divided by.

    Returns:
        Array of the shape and dtype of ``x`` with unit norm along ``axis`` (zero where
        ``x`` is zero).

    Example:
        >>> import jax.numpy as jnp
        >>> l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
        Array([[0.6, 0.8],
               [0. , 0. ]], dtype=float32)
    """
    x = jnp.asarray(x)
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(compute_dtype)
    sq = jnp.sum(jnp.square(xf), axis=axis, keepdims=True)
    inv = jax.lax.rsqrt(jnp.maximum(sq, jnp.asarray(eps, compute_dtype) ** 2))
    return (xf * inv).astype(x.dtype)


def xavier_uniform():
    r"""Glorot/Xavier uniform initialiser, ``U(-r, r)`` with ``r = \sqrt{6 / (d_in + d_out)}``.

    The reference ``EncoderImagePrecomp``/``EncoderImageFull`` initialise their final
    Linear layer this way (with a zero bias).
    """
    return jax.nn.initializers.xavier_uniform()


def he_uniform():
    r"""He (Kaiming) uniform initialiser for ReLU layers: ``U(-r, r)``, ``r = \sqrt{6 / d_in}``."""
    return jax.nn.initializers.variance_scaling(2.0, "fan_in", "uniform")


def symmetric_uniform(limit: float):
    """Initialiser drawing every entry from ``U(-limit, limit)``, any shape."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-limit, maxval=limit)

    return init


def is_concrete(x) -> bool:
    """Whether ``x`` holds values (not a tracer inside ``jit``/``grad``/``vmap``)."""
    return not isinstance(x, jax.core.Tracer)


def check_floating(name: str, x, *, rank: int, last_dim: int | None = None, what: str = ""):
    """Raises ``ValueError`` naming ``name`` unless ``x`` is a floating array of this rank."""
    shape = jnp.shape(x)
    if len(shape) != rank:
        raise ValueError(f"`{name}` must be a rank-{rank} {what} array, got shape {shape}.")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating array, got dtype {jnp.result_type(x)}; convert "
            "(and scale) it to float first."
        )
    if last_dim is not None and shape[-1] != last_dim:
        raise ValueError(
            f"`{name}` must have {last_dim} features in its last axis, got shape {shape}."
        )


def check_tokens_and_lengths(tokens, lengths, *, vocab_size: int | None = None):
    """Validates a padded caption batch at a public boundary.

    Shapes and dtypes are always checked. Values (``1 <= lengths <= L`` and token ids in
    ``[0, vocab_size)``) are checked when the arrays are concrete, i.e. outside ``jit``.

    Raises:
        ValueError: naming ``tokens`` or ``lengths``.
    """
    tshape, lshape = jnp.shape(tokens), jnp.shape(lengths)
    if len(tshape) != 2:
        raise ValueError(f"`tokens` must be a rank-2 (batch, length) array, got shape {tshape}.")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"`tokens` must be an integer array, got dtype {jnp.result_type(tokens)}.")
    if tshape[1] < 1:
        raise ValueError(f"`tokens` must have at least one time step, got shape {tshape}.")
    if lshape != (tshape[0],):
        raise ValueError(
            f"`lengths` must have shape (batch,) = ({tshape[0]},) to match `tokens` of shape "
            f"{tshape}, got shape {lshape}."
        )
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise ValueError(
            f"`lengths` must be an integer array, got dtype {jnp.result_type(lengths)}."
        )
    if is_concrete(lengths):
        lv = np.asarray(lengths)
        if lv.size and (lv.min() < 1 or lv.max() > tshape[1]):
            raise ValueError(
                f"`lengths` must lie in [1, {tshape[1]}] (the padded length of `tokens`), got "
                f"values in [{lv.min()}, {lv.max()}]."
            )
    if vocab_size is not None and is_concrete(tokens):
        tv = np.asarray(tokens)
        if tv.size and (tv.min() < 0 or tv.max() >= vocab_size):
            raise ValueError(
                f"`tokens` must be ids in [0, {vocab_size}), got values in "
                f"[{tv.min()}, {tv.max()}]."
            )
