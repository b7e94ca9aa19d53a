"""Per-example gradient statistics of a Dense or Conv layer from its inputs and backprop signals.

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning", 2020,
https://arxiv.org/abs/2007.04532: per-example gradients of Dense and Conv layers are
(sums of) outer products, so their norms and inner products with rank-1 directions come
from the layer's inputs and backprop signals without forming the gradients.

A layer ``y_t = W^T a_t + b`` applied at positions ``t = 1..T`` of one example (one position
for a Dense layer on ``(B, d)`` inputs, the tokens of a sequence for a Dense layer on
``(B, T, d)`` inputs, the output pixels of a convolution with ``a_t`` the unfolded input
patch) has per-example gradients

.. math::

  G_i = \\sum_t a_{i,t} \\delta_{i,t}^\\top, \\qquad g^{b}_i = \\sum_t \\delta_{i,t},
  \\qquad \\delta_{i,t} = \\partial \\ell_i / \\partial y_{i,t}.

Everything here works from ``a`` of shape ``(B, T, d_in)`` and ``δ`` of shape
``(B, T, d_out)``; no function sees the model. Three contractions give
``||G_i||^2``:

* ``"rank1"`` (``T = 1``): ``||a_i||^2 ||\\delta_i||^2``, ``O(B (d_in + d_out))``;
* ``"gram"``: ``\\sum_{s,t} (a_s \\cdot a_t)(\\delta_s \\cdot \\delta_t)``,
  ``O(B T^2 (d_in + d_out))``, no ``d_in × d_out`` array per example;
* ``"outer"``: form ``G_i`` and square it, ``O(B T d_in d_out)``, a few examples at a time
  (then the inner products are ``v^T G_i u`` when that is cheaper than projecting every
  position).

:func:`choose_contraction` picks the cheapest for a layer's shapes. The per-coordinate sum
of squares ``\\sum_i G_i^2`` is ``(a^2)^\\top (\\delta^2)`` when ``T = 1`` and needs the
explicit ``G_i`` otherwise, so asking for it makes ``"outer"`` the choice for ``T > 1``.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxeff.pergrad.chunks import (
    examples_per_device_step,
    merge_chunks,
    replicated_like,
    split_chunks,
    sum_over_examples,
)

__all__ = [
    "CONTRACTIONS",
    "OUTER_CHUNK_ENTRIES",
    "LayerStats",
    "choose_contraction",
    "conv_patches",
    "layer_stats",
]

CONTRACTIONS = ("rank1", "gram", "outer")


class LayerStats(NamedTuple):
    """Per-example statistics of one layer's kernel and bias.

    Attributes:
      kernel_sq_norms: ``(B,)``, ``||G_i||^2``.
      bias_sq_norms: ``(B,)``, ``||g^b_i||^2``; ``None`` without a bias.
      kernel_sum_sq: ``(d_in, d_out)``, ``\\sum_i G_i^2``; ``None`` when not asked for.
      bias_sum_sq: ``(d_out,)``, ``\\sum_i (g^b_i)^2``; ``None`` when not asked for or
        without a bias.
      dots: ``(K, B)``, ``<G_i, v_k u_k^T> + <g^b_i, u_k>``; ``None`` without directions.
      kernel_grad: ``(d_in, d_out)``, ``Σ_i w_i G_i``; ``None`` without ``grad_weights``.
      bias_grad: ``(d_out,)``, ``Σ_i w_i g^b_i``; ``None`` without ``grad_weights`` or
        without a bias.
    """

    kernel_sq_norms: jax.Array
    bias_sq_norms: jax.Array | None
    kernel_sum_sq: jax.Array | None
    bias_sum_sq: jax.Array | None
    dots: jax.Array | None
    kernel_grad: jax.Array | None = None
    bias_grad: jax.Array | None = None


def choose_contraction(positions: int, d_in: int, d_out: int, *, with_sum_sq: bool) -> str:
    """The cheapest way to get ``||G_i||^2`` (and ``Σ_i G_i²`` if asked) for a layer.

    Args:
      positions: ``T``, the number of positions the layer is applied at per example
        (summed over calls when the layer is applied more than once).
      d_in: size of ``a_t`` (``in_features``, or ``prod(kernel_size) · in_features`` for
        a convolution).
      d_out: size of ``δ_t`` (``out_features``).
      with_sum_sq: whether the per-coordinate sum of squares is needed too.

    Returns:
      ``"rank1"``, ``"gram"`` or ``"outer"`` (see the module docstring).
    """
    if positions == 1:
        return "rank1"
    if with_sum_sq:
        return "outer"
    gram_cost = positions * positions * (d_in + d_out + 1)
    outer_cost = positions * d_in * d_out + d_in * d_out
    return "gram" if gram_cost < outer_cost else "outer"


#: Entries of per-example gradients ``G_i`` held at once by the ``"outer"`` contraction
#: (4 MiB in float32). Larger chunks were slower on CPU (the squares and sums stream
#: from memory instead of cache) and cost memory everywhere.
OUTER_CHUNK_ENTRIES = 1 << 20


def _outer_steps(size: int, per_device: int, matrix_entries: int) -> int:
    """The fewest chunks whose ``G`` fit :data:`OUTER_CHUNK_ENTRIES`, each a multiple of
    ``per_device`` examples (one chunk if ``size`` is not a multiple)."""
    if size % per_device:
        return 1
    for steps in range(1, size // per_device + 1):
        chunk, rest = divmod(size, steps)
        if rest == 0 and chunk % per_device == 0:
            if chunk * matrix_entries <= OUTER_CHUNK_ENTRIES or chunk == per_device:
                return steps
    return size // per_device


def _weighted_example_sum(x, weights):
    """``Σ_i w_i x_i`` over the leading axis; ``weights`` a scalar (every example) or ``(B,)``."""
    if jnp.ndim(weights) == 0:
        return sum_over_examples(x) * weights
    return jnp.einsum("b...,b->...", x, weights, **replicated_like(x))


def weighted_contraction(a, delta, weights):
    """``Σ_i w_i Σ_t a_{i,t} δ_{i,t}^T`` as one contraction (an ordinary weight gradient).

    The weights scale the narrower of ``a`` and ``δ``.
    """
    out = replicated_like(a)
    if jnp.ndim(weights) == 0:
        return jnp.einsum("bti,bto->io", a, delta, **out) * weights
    w = weights[:, None, None]
    if delta.shape[-1] <= a.shape[-1]:
        return jnp.einsum("bti,bto->io", a, delta * w, **out)
    return jnp.einsum("bti,bto->io", a * w, delta, **out)


def _outer_stats(a, delta, *, with_sum_sq: bool, direction=None, grad_weights=None):
    """``||G_i||²``, ``Σ_i G_i²``, ``v_k^T G_i u_k`` and ``Σ_i w_i G_i`` from explicit ``G_i``,
    chunk by chunk.

    A ``lax.scan`` over chunks keeps about :data:`OUTER_CHUNK_ENTRIES` entries of ``G`` in
    memory instead of ``B·d_in·d_out``. A chunk holds a multiple of the number of devices
    the batch is explicitly split over, so each step keeps every device busy.

    Returns:
      ``(norms (B,), sum_sq or None, dots (B, K) or None, weighted sum or None)``.
    """
    size, _, d_in = a.shape
    d_out = delta.shape[-1]
    per_device = examples_per_device_step(a)
    num_steps = _outer_steps(size, per_device, d_in * d_out)
    options = {"with_sum_sq": with_sum_sq, "direction": direction}
    if num_steps == 1:
        return _outer_chunk(a, delta, grad_weights, **options)
    interleave = per_device > 1  # contiguous chunks need no copy
    per_example_weights = grad_weights is not None and jnp.ndim(grad_weights) == 1

    def step(totals, chunk):
        a, delta, w = chunk if per_example_weights else (*chunk, grad_weights)
        norms, sum_sq, dots, grad = _outer_chunk(a, delta, w, **options)
        return jax.tree.map(jnp.add, totals, (sum_sq, grad)), (norms, dots)

    zeros = jnp.zeros((d_in, d_out), a.dtype)
    init = (zeros if with_sum_sq else None, None if grad_weights is None else zeros)
    parts = (a, delta, grad_weights) if per_example_weights else (a, delta)
    chunks = tuple(split_chunks(x, num_steps, interleave=interleave) for x in parts)
    (sum_sq, grad), per_example = jax.lax.scan(step, init, chunks)
    norms, dots = jax.tree.map(lambda x: merge_chunks(x, interleave=interleave), per_example)
    return norms, sum_sq, dots, grad


def _outer_chunk(a, delta, grad_weights, *, with_sum_sq: bool, direction=None):
    grads = jnp.einsum("bti,bto->bio", a, delta)
    squares = grads * grads
    sum_sq = sum_over_examples(squares) if with_sum_sq else None
    dots = None
    if direction is not None:
        v, u = direction
        dots = jnp.einsum("bik,ki->bk", jnp.einsum("bio,ko->bik", grads, u), v)
    grad = None if grad_weights is None else _weighted_example_sum(grads, grad_weights)
    return jnp.sum(squares, axis=(1, 2)), sum_sq, dots, grad


def layer_stats(
    a: jax.Array,
    delta: jax.Array,
    *,
    use_bias: bool,
    with_sum_sq: bool,
    direction: tuple[jax.Array, jax.Array] | None = None,
    grad_weights: jax.Array | float | None = None,
) -> LayerStats:
    """Squared norms, sums of squares and rank-1 inner products of a layer's per-example gradients.

    With ``G_i = Σ_t a_{i,t} δ_{i,t}^T`` and ``g^b_i = Σ_t δ_{i,t}``:

    .. math::

      \\|G_i\\|^2 = \\sum_{s,t} (a_{i,s} \\cdot a_{i,t})(\\delta_{i,s} \\cdot \\delta_{i,t}),
      \\qquad
      \\langle G_i, v u^\\top \\rangle = \\sum_t (v^\\top a_{i,t})(u^\\top \\delta_{i,t}),
      \\qquad
      \\langle g^b_i, u \\rangle = u^\\top g^b_i.

    For ``T = 1`` the first is ``||a_i||²·||δ_i||²`` and ``Σ_i G_i² = (a²)^T (δ²)``, so no
    per-example ``d_in × d_out`` array is formed. With ``grad_weights`` the weighted
    gradient ``Σ_i w_i G_i`` comes from the explicit ``G_i`` when the ``"outer"``
    contraction forms them anyway, and from one contraction of ``a`` and ``δ`` otherwise.

    Args:
      a: ``(B, T, d_in)`` layer inputs (conv: unfolded patches, see :func:`conv_patches`).
      delta: ``(B, T, d_out)`` backprop signals ``∂ℓ_i/∂y_{i,t}``.
      use_bias: whether the layer has a bias (its statistics are then computed too).
      with_sum_sq: whether to compute the per-coordinate sums of squares.
      direction: optional ``(v, u)`` with ``v`` of shape ``(K, d_in)`` and ``u`` of shape
        ``(K, d_out)``: ``K`` rank-1 kernel directions ``v_k u_k^T`` and bias directions
        ``u_k``.
      grad_weights: optional weights ``w`` of the gradient ``Σ_i w_i G_i`` (and
        ``Σ_i w_i g^b_i``): a scalar for every example, or ``(B,)``; ``None``: no gradient.

    Returns:
      A :class:`LayerStats` (float32 or wider).

    Example::

      a, delta = jnp.ones((4, 1, 3)), jnp.ones((4, 1, 2))
      layer_stats(a, delta, use_bias=True, with_sum_sq=True).kernel_sq_norms  # [6., ...]
    """
    dtype = jnp.promote_types(jnp.result_type(a, delta), jnp.float32)
    a, delta = a.astype(dtype), delta.astype(dtype)
    _, positions, d_in = a.shape
    d_out = delta.shape[-1]
    contraction = choose_contraction(positions, d_in, d_out, with_sum_sq=with_sum_sq)

    v, u = (None, None) if direction is None else (jnp.asarray(x, dtype) for x in direction)
    w = None if grad_weights is None else jnp.asarray(grad_weights, dtype)
    # With explicit G_i, v^T G_i u costs K·d_in·d_out per example instead of the
    # projections' K·T·(d_in + d_out).
    dots_from_grads = (
        direction is not None
        and contraction == "outer"
        and d_in * d_out < positions * (d_in + d_out)
    )
    kernel_sum_sq = dots = kernel_grad = None
    if contraction == "rank1":
        a1, d1 = a[:, 0], delta[:, 0]
        kernel_sq = jnp.sum(a1 * a1, axis=-1) * jnp.sum(d1 * d1, axis=-1)
        if with_sum_sq:
            kernel_sum_sq = jnp.einsum("bi,bo->io", a1 * a1, d1 * d1, **replicated_like(a))
    elif contraction == "gram":
        a_gram = jnp.einsum("bsi,bti->bst", a, a)
        d_gram = jnp.einsum("bso,bto->bst", delta, delta)
        kernel_sq = jnp.sum(a_gram * d_gram, axis=(1, 2))
    else:
        kernel_sq, kernel_sum_sq, dots, kernel_grad = _outer_stats(
            a,
            delta,
            with_sum_sq=with_sum_sq,
            direction=(v, u) if dots_from_grads else None,
            grad_weights=w,
        )
    if w is not None and kernel_grad is None:
        kernel_grad = weighted_contraction(a, delta, w)

    bias_sq = bias_sum_sq = bias_grads = bias_grad = None
    if use_bias:
        bias_grads = jnp.sum(delta, axis=1)
        bias_sq = jnp.sum(bias_grads * bias_grads, axis=-1)
        if with_sum_sq:
            bias_sum_sq = sum_over_examples(bias_grads * bias_grads)
        if w is not None:
            bias_grad = _weighted_example_sum(bias_grads, w)

    if direction is not None:
        if dots is not None:  # from the explicit G_i (`dots_from_grads`)
            dots = dots.T
        else:
            a_proj = jnp.einsum("bti,ki->kbt", a, v)
            d_proj = jnp.einsum("bto,ko->kbt", delta, u)
            dots = jnp.sum(a_proj * d_proj, axis=-1)
        if use_bias:
            dots = dots + jnp.einsum("bo,ko->kb", bias_grads, u)
    return LayerStats(kernel_sq, bias_sq, kernel_sum_sq, bias_sum_sq, dots, kernel_grad, bias_grad)


def _conv_pads(spatial, kernel_size, strides, padding, kernel_dilation):
    """``(mode, pads)`` for ``jnp.pad`` reproducing ``nnx.Conv``'s padding of the input."""
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    if padding in ("CIRCULAR", "REFLECT"):
        pads = [((k - 1) // 2, k // 2) for k in dilated]
        return {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding], pads
    if padding == "CAUSAL":
        return "constant", [(dilated[0] - 1, 0)]
    if isinstance(padding, str):
        return "constant", list(lax.padtype_to_pads(spatial, dilated, strides, padding))
    return "constant", list(padding)


def conv_patches(
    x: jax.Array,
    *,
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    padding: str | tuple[tuple[int, int], ...],
    kernel_dilation: tuple[int, ...],
) -> jax.Array:
    """Unfolds the input of an ``nnx.Conv`` (``feature_group_count = 1``, no input dilation).

    Pads the input as the layer does, then takes one strided slice per kernel offset,
    which is far cheaper than ``lax.conv_general_dilated_patches`` (itself a convolution).

    Args:
      x: ``(N, *spatial, c_in)`` channels-last input.
      kernel_size: tuple of kernel sizes, one per spatial axis.
      strides: tuple of strides, one per spatial axis.
      padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"`` (or
        another padding string ``lax.padtype_to_pads`` knows) or a tuple of ``(low,
        high)`` pairs, one per spatial axis.
      kernel_dilation: tuple of kernel dilations, one per spatial axis.

    Returns:
      ``(N, *out_spatial, prod(kernel_size) · c_in)`` patches, features ordered as
      ``kernel.reshape(-1, c_out)`` of a kernel of shape ``(*kernel_size, c_in, c_out)``,
      so ``y[n, p] = patches[n, p] @ kernel.reshape(-1, c_out) + b``.
    """
    spatial = x.shape[1:-1]
    mode, pads = _conv_pads(spatial, kernel_size, strides, padding, kernel_dilation)
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=mode)
    padded = x.shape[1:-1]
    out = [
        (p - (k - 1) * d - 1) // s + 1
        for p, k, d, s in zip(padded, kernel_size, kernel_dilation, strides, strict=True)
    ]
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        start = [o * d for o, d in zip(offset, kernel_dilation, strict=True)]
        limit = [st + (n - 1) * s + 1 for st, n, s in zip(start, out, strides, strict=True)]
        slices.append(
            lax.slice(
                x,
                (0, *start, 0),
                (x.shape[0], *limit, x.shape[-1]),
                (1, *strides, 1),
            )
        )
    patches = jnp.stack(slices, axis=-2)
    return patches.reshape(*patches.shape[:-2], math.prod(kernel_size) * x.shape[-1])
