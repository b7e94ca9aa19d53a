"""Interleaved chunks of a batch, and sums over examples, that keep sharded batches spread.

A batch of ``n·c`` examples is processed as ``n`` chunks of ``c``; chunk ``k`` holds
examples ``k, k + n, k + 2n, ...`` (as ``optax.microbatching`` does), so when the batch is
split over devices along its leading axis every chunk is split the same way and every
device works on every chunk.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "examples_per_device_step",
    "merge_chunks",
    "replicated_like",
    "split_chunks",
    "sum_over_examples",
    "take_rows",
]


def _explicit_batch_sharding(x):
    """``(mesh, batch mesh axes)`` if ``x``'s leading axis is split over explicit mesh axes."""
    sharding = jax.typeof(x).sharding
    if not (sharding.mesh.axis_names and sharding.mesh.are_all_axes_explicit):
        return None, None
    return sharding.mesh, (sharding.spec[0] if len(sharding.spec) else None)


def leading_axis_like(x, ndim: int) -> dict:
    """``out_sharding`` for a new ``ndim``-array whose leading axis is split like ``x``'s.

    Empty unless ``x`` lives on a mesh with explicit axes (where ops between differently
    sharded arrays are type errors); elsewhere the compiler chooses.
    """
    mesh, batch_axes = _explicit_batch_sharding(x)
    if mesh is None:
        return {}
    return {"out_sharding": NamedSharding(mesh, P(batch_axes, *[None] * (ndim - 1)))}


def replicated_like(x) -> dict:
    """``out_sharding`` for a sum over ``x``'s leading axis (replicated on its mesh).

    Empty unless ``x`` lives on a mesh with explicit axes, where a contraction over a
    sharded axis must name its output sharding.
    """
    mesh, _ = _explicit_batch_sharding(x)
    if mesh is None:
        return {}
    return {"out_sharding": NamedSharding(mesh, P())}


def take_rows(x, rows):
    """``x[rows]`` along the leading axis; replicated when ``x`` is sharded over explicit axes.

    On a mesh with explicit axes a gather from a batch-sharded array must name its output
    sharding (the rows may come from any device); they come out replicated. Elsewhere
    this is ``jnp.take(x, rows, axis=0)``, or numpy indexing when both are numpy (host
    data stays on the host).
    """
    out = replicated_like(x)
    if out:
        return x.at[rows].get(mode="fill", **out)
    if isinstance(x, np.ndarray) and isinstance(rows, np.ndarray):
        return x[rows]
    return jnp.take(x, rows, axis=0)


def examples_per_device_step(x) -> int:
    """How many devices ``x``'s leading axis is split over (1 unless explicit sharding says)."""
    mesh, batch_axes = _explicit_batch_sharding(x)
    if mesh is None or batch_axes is None:
        return 1
    names = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
    return math.prod(mesh.shape[name] for name in names)


def split_chunks(x, num_chunks: int, *, interleave: bool = True):
    """``(n·c, ...) -> (n, c, ...)``.

    With ``interleave`` chunk ``k`` holds rows ``k, k + n, k + 2n, ...`` (a sharded batch
    stays spread over its devices); without, rows ``k·c .. k·c + c - 1`` (no copy).
    """
    if not interleave:
        return jnp.reshape(x, (num_chunks, x.shape[0] // num_chunks, *x.shape[1:]))
    shape = (x.shape[0] // num_chunks, num_chunks, *x.shape[1:])
    return jnp.swapaxes(jnp.reshape(x, shape, **leading_axis_like(x, len(shape))), 0, 1)


def merge_chunks(x, *, interleave: bool = True):
    """Inverse of :func:`split_chunks`: ``(n, c, ...) -> (n·c, ...)`` in the original order."""
    if interleave:
        x = jnp.swapaxes(x, 0, 1)
    return jnp.reshape(x, (x.shape[0] * x.shape[1], *x.shape[2:]))


def sum_over_examples(x):
    """``jnp.sum(x, axis=0)`` by pairwise halving.

    XLA:CPU reduces a leading axis one element at a time: for ``(128, 784, 512)`` float32,
    ``jnp.sum(x, axis=0)`` took 390 ms and this 8.7 ms (2 cores). Adding the two halves
    ``log2 B`` times reads the data about twice and vectorises on every backend. A leading
    axis split over explicit mesh axes is summed by ``jnp.sum`` (an all-reduce).
    """
    if examples_per_device_step(x) > 1:
        return jnp.sum(x, axis=0)
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        head = x[:half] + x[half : 2 * half]
        x = jnp.concatenate([head, x[2 * half :]]) if x.shape[0] % 2 else head
    return x[0]
