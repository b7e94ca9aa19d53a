"""Per-example gradients by ``vmap(grad)``: the reference path, and the fallback of the fast one.

Built on ``optax.microbatching.micro_grad``, which vmaps ``jax.grad`` over examples and
applies a per-example transform (summed or concatenated) and per-example metrics. The
chunking is done here rather than by ``micro_grad``'s own ``microbatch_size``: optax 0.2.8
decides whether to pass ``out_sharding`` to its chunk reshape by comparing version
*strings* (``jax.__version__ < '0.7.0'`` holds for jax 0.10), so its chunking fails on
batches sharded over a mesh with explicit axes. Chunks are interleaved as in optax (chunk
``k`` holds examples ``k, k + n, k + 2n, ...``) so a batch sharded along its leading axis
keeps every device busy in every chunk; a batch whose size is not a multiple of the chunk
is padded with zero-weight copies of its last example.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from optax.microbatching import AccumulationType

from jaxeff.pergrad.chunks import leading_axis_like, merge_chunks, split_chunks, sum_over_examples

__all__ = ["batch_size_of", "check_chunk_size", "map_per_example_grads", "per_example_grads"]


def batch_size_of(batch: chex.ArrayTree, *, name: str = "batch") -> int:
    """The common leading-axis size ``B`` of every array in ``batch``.

    Raises:
      ValueError: naming ``name`` if ``batch`` has no arrays, a scalar leaf, or leaves
        whose leading axes differ.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(f"`{name}` must hold at least one array, got {batch!r}.")
    if any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError(f"`{name}` leaves must have a leading example axis; found a scalar.")
    sizes = {jnp.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
        shapes = jax.tree.map(jnp.shape, batch)
        raise ValueError(f"`{name}` leaves must share the leading axis size B, got {shapes}.")
    (size,) = sizes
    if size < 1:
        raise ValueError(f"`{name}` must hold at least one example, got B = {size}.")
    return size


def check_chunk_size(chunk_size: int | None) -> None:
    """Raises ``ValueError`` naming ``chunk_size`` unless it is ``None`` or a positive int."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}.")


def map_per_example_grads(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: chex.ArrayTree,
    batch: chex.ArrayTree,
    *,
    chunk_size: int | None = None,
    transform_fn: Callable[[Any], Any] = lambda g: g,
    metrics_fn: Callable[[Any], Any] = lambda g: None,
    accumulation: AccumulationType = AccumulationType.CONCAT,
) -> tuple[Any, jax.Array, Any]:
    """Per-example gradients, transformed and accumulated, via ``optax.microbatching.micro_grad``.

    For ``g_i = ∇_θ loss_fn(θ, example_i)`` returns ``acc_i transform_fn(g_i)`` (``acc``
    is concatenation along a new leading axis, or a sum) and the per-example
    ``metrics_fn(g_i)`` and losses. Chunks run one after another (``lax.scan``).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example (no batch
        axis on ``example``'s leaves).
      params: pytree of parameters to differentiate.
      batch: pytree of arrays with a leading axis of size ``B``.
      chunk_size: examples per chunk (``None``: all at once). Need not divide ``B``.
      transform_fn: applied to each ``g_i``; must map a zero gradient to zeros when
        ``accumulation`` is ``SUM`` and ``B`` is not a multiple of ``chunk_size``.
      metrics_fn: per-example function of ``g_i``, returned with a leading ``B`` axis.
      accumulation: ``AccumulationType.CONCAT`` or ``AccumulationType.SUM``.

    Returns:
      ``(accumulated, losses, metrics)``; ``losses`` is ``(B,)``.
    """
    check_chunk_size(chunk_size)
    if accumulation not in (AccumulationType.CONCAT, AccumulationType.SUM):
        raise ValueError(f"`accumulation` must be CONCAT or SUM, got {accumulation!r}.")
    size = batch_size_of(batch)
    chunk = size if chunk_size is None else min(chunk_size, size)
    pad = -size % chunk
    weights = jnp.ones((size,), jnp.float32, **leading_axis_like(jax.tree.leaves(batch)[0], 1))
    if pad:
        batch = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, 0)]), batch)
        weights = jnp.concatenate([weights, jnp.zeros((pad,), jnp.float32)])

    def weighted_loss(params, weighted_example):
        example, weight = weighted_example
        loss = loss_fn(params, example)
        if jnp.shape(loss) != ():
            raise ValueError(
                f"`loss_fn` must return a scalar loss for one example, got shape {jnp.shape(loss)}."
            )
        return weight.astype(loss.dtype) * loss

    # micro_grad's own SUM reduces with jnp.sum(axis=0), which XLA:CPU runs element by
    # element (see sum_over_examples); concatenate per chunk and sum by halving instead.
    grad_fn = optax.microbatching.micro_grad(
        weighted_loss,
        argnums=0,
        batch_argnums=1,
        keep_batch_dim=False,
        accumulator=AccumulationType.CONCAT,
        transform_fn=transform_fn,
        metrics_fn=metrics_fn,
    )
    if accumulation == AccumulationType.SUM:
        per_chunk = grad_fn

        def grad_fn(params, chunk_batch):
            transformed, aux = per_chunk(params, chunk_batch)
            return jax.tree.map(sum_over_examples, transformed), aux

    num_chunks = (size + pad) // chunk
    if num_chunks == 1:
        accumulated, aux = grad_fn(params, (batch, weights))
    else:
        chunks = jax.tree.map(lambda x: split_chunks(x, num_chunks), (batch, weights))
        if accumulation == AccumulationType.SUM:
            first = jax.tree.map(lambda x: x[0], chunks)
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first)[0])

            def step(total, chunk_batch):
                summed, aux = grad_fn(params, chunk_batch)
                return jax.tree.map(jnp.add, total, summed), aux

            accumulated, aux = jax.lax.scan(step, zeros, chunks)
        else:
            accumulated, aux = jax.lax.map(lambda c: grad_fn(params, c), chunks)
            accumulated = jax.tree.map(merge_chunks, accumulated)
        aux = jax.tree.map(merge_chunks, aux)
    real = lambda x: x[:size]
    if accumulation == AccumulationType.CONCAT:
        accumulated = jax.tree.map(real, accumulated)
    return accumulated, real(aux.values), jax.tree.map(real, aux.metrics)


def per_example_grads(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: chex.ArrayTree,
    batch: chex.ArrayTree,
    *,
    chunk_size: int | None = None,
) -> chex.ArrayTree:
    """Gradient of the loss of each example of a batch, by ``vmap(grad)`` in chunks.

    .. math::

      g_i = \\nabla_\\theta\\, \\ell(\\theta; x_i), \\qquad i = 1..B.

    The reference for :func:`jaxeff.pergrad.per_example_stats` and its fallback for
    parameters without a fast rule. Memory is ``chunk_size`` (default ``B``) examples'
    activations plus the ``B`` gradients returned. Pure and jittable.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example; the leaves
        of ``example`` are the batch's leaves without their leading axis.
      params: pytree of parameters (e.g. ``nnx.state(model, nnx.Param)``).
      batch: pytree of arrays with a leading axis of size ``B``.
      chunk_size: examples per chunk; chunks run one after another. ``None`` vmaps over
        the whole batch. Need not divide ``B``. On a batch sharded over ``n`` devices, a
        multiple of ``n`` keeps every device busy.

    Returns:
      A pytree like ``params`` whose leaves have a leading axis of size ``B``.

    Example::

      def loss_fn(w, example):
          return (example["x"] @ w - example["y"]) ** 2

      grads = per_example_grads(loss_fn, jnp.zeros(3), {"x": x, "y": y}, chunk_size=32)
    """
    grads, _, _ = map_per_example_grads(loss_fn, params, batch, chunk_size=chunk_size)
    return grads
