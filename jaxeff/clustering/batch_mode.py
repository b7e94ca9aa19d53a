r"""Batch-mode gradient clustering: full passes over (a subset of) the data, assign then update.

One pass is one Lloyd iteration of the size-weighted objective: every example is assigned
with the current centres and sizes (:func:`jaxeff.clustering.assign`), then each centre
becomes the outer product of its cluster's factor means (for a Dense kernel the mean input
and the mean backprop signal; for a bias the mean gradient), each size
the cluster's count, and any cluster below ``min_fraction`` of the examples is re-seeded
by splitting the cluster of highest distortion (:func:`split_small_clusters`). Faghri,
Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.typing import ArrayLike

from jaxeff.clustering.centres import (
    AssignmentCounts,
    ClusterState,
    cluster_leaves,
    distances,
    init_from_stats,
    size_weighted_argmin,
    zero_directions,
)
from jaxeff.clustering.sums import (
    ClusterSums,
    add_sums,
    check_min_fraction,
    cluster_sums,
    empty_sums,
    split_small_clusters,
)
from jaxeff.pergrad import per_example_stats

__all__ = ["batch_update", "clustering_pass", "init_clusters"]


def batch_update(state: ClusterState, sums: ClusterSums, *, min_fraction: float) -> ClusterState:
    r"""The clustering after a pass whose examples gave ``sums``.

    .. math::

       f_{k,j} = F_{k,j} / n_k, \qquad N_k = n_k,

    for every cluster with members (an empty one keeps its centre), then clusters below
    ``min_fraction · Σ_k n_k`` are re-seeded (:func:`split_small_clusters`). Pure, jittable.

    Args:
      state: the clustering the pass assigned with.
      sums: the :class:`ClusterSums` of the whole pass (:func:`add_sums` over its batches).
      min_fraction: the smallest cluster size kept, as a fraction of the examples.

    Returns:
      The new :class:`ClusterState`, ``count`` incremented.
    """
    check_min_fraction(min_fraction)
    has = sums.counts > 0
    safe = jnp.where(has, sums.counts, 1.0)

    def mean(centre, total):
        shape = (-1, *[1] * (centre.ndim - 1))
        return jnp.where(has.reshape(shape), total / safe.reshape(shape), centre)

    centres = jax.tree.map(mean, state.centres, sums.factor_sums)
    centres, sizes = split_small_clusters(centres, sums.counts, sums, min_fraction=min_fraction)
    return ClusterState(centres, sizes, state.count + 1)


def _on_host(x: ArrayLike) -> np.ndarray:
    """``x`` as numpy, on every process also when its rows are spread over processes (then a
    collective: every process passes its part)."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


@functools.partial(jax.jit, static_argnames=("loss_fn", "size_weighted"))
def _assign_batch(params, batch, mask, state, so_far, *, loss_fn, size_weighted):
    stats = per_example_stats(loss_fn, params, batch, directions=state.centres, with_sum_sq=False)
    dist = distances(state, stats)
    if size_weighted:
        assignments, so_far = size_weighted_argmin(dist, state.sizes, mask=mask, so_far=so_far)
    else:
        assignments = jnp.argmin(dist, axis=1).astype(jnp.int32)
    return assignments, cluster_sums(state, stats, assignments, dist, mask=mask), so_far


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_clusters", "leaves"))
def _seed(params, batch, key, *, loss_fn, num_clusters, leaves):
    shapes = dict(leaves)
    stats = per_example_stats(
        loss_fn, params, batch, directions=zero_directions(shapes, 1), with_sum_sq=False
    )
    return init_from_stats(stats, num_clusters=num_clusters, key=key, leaves=list(shapes))


def init_clusters(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: chex.ArrayTree,
    batch: chex.ArrayTree,
    *,
    num_clusters: int,
    key: jax.Array,
    leaves: str | Sequence[str] | None = None,
) -> ClusterState:
    """``K`` clusters seeded at ``K`` distinct examples of ``batch`` (see
    :func:`jaxeff.clustering.init_from_stats`).

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses (any framework:
        :mod:`jaxeff.pergrad.engine` shows linen, nnx, equinox and haiku).
      params: the parameter pytree.
      batch: pytree of arrays with ``B >= num_clusters`` examples on the leading axis.
      num_clusters: ``K``.
      key: PRNG key choosing the seeds.
      leaves: optional parameter paths to cluster on (:func:`jaxeff.clustering.cluster_leaves`;
        ``None``: every leaf that can be).

    Returns:
      A :class:`ClusterState`.

    Example::

      state = init_clusters(loss_fn, params, first_batch, num_clusters=8, key=jax.random.key(0))
      for _ in range(3):
          state, assignments = clustering_pass(loss_fn, params, batches(), state)
    """
    shapes = cluster_leaves(loss_fn, params, batch, leaves)
    return _seed(
        params,
        batch,
        key,
        loss_fn=loss_fn,
        num_clusters=num_clusters,
        leaves=tuple(shapes.items()),
    )


def clustering_pass(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: chex.ArrayTree,
    batches: Iterable[chex.ArrayTree],
    state: ClusterState,
    *,
    min_fraction: float = 0.0,
    size_weighted: bool = True,
    mask_key: str = "mask",
) -> tuple[ClusterState, np.ndarray]:
    r"""One batch-mode pass: assign every example of ``batches``, then update the centres.

    The examples are assigned one after another in the order of ``batches``, with the
    running size estimates of :func:`jaxeff.clustering.size_weighted_argmin` carried from
    batch to batch. Each batch is assigned with ``state`` (its per-example statistics computed with
    ``directions=state.centres``, jit-compiled, no per-example gradient formed), its
    :class:`ClusterSums` are added up, and :func:`batch_update` makes the new state. The
    batches may be sharded over devices, and over the processes of a multi-process run
    (every process calls the pass with its part); the sums are the same numbers, and every
    process gets all the assignments.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      params: the parameters to cluster the gradients at.
      batches: an iterable of batches (pytrees of arrays with a leading example axis; the
        last may be smaller, or padded and marked with a boolean ``batch[mask_key]``).
      state: the current :class:`ClusterState`.
      min_fraction: clusters with fewer than this fraction of the examples are re-seeded.
      size_weighted: assign by ``argmin_k (N_k + 1) d_{ik}`` (``False``: ``argmin_k d_{ik}``).
      mask_key: the key of an optional ``(B,)`` bool mask in dict batches (left in the
        batch, so ``loss_fn`` may ignore it).

    Returns:
      ``(new_state, assignments)``: ``assignments`` the host ``(M,)`` int32 cluster of
      every example of the pass (masked rows left out), in the order of ``batches``, as
      assigned with ``state``: the clusters the new centres average.
    """
    check_min_fraction(min_fraction, static=True)  # a static argument of the update
    total, parts = empty_sums(state), []
    k = state.sizes.shape[0]
    so_far = AssignmentCounts(jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32))
    for batch in batches:
        mask = batch.get(mask_key) if isinstance(batch, dict) else None
        assignments, sums, so_far = _assign_batch(
            params, batch, mask, state, so_far, loss_fn=loss_fn, size_weighted=size_weighted
        )
        total = _add_sums_jit(total, sums)
        assignments = _on_host(assignments)  # the whole batch's, also on many processes
        parts.append(assignments if mask is None else assignments[_on_host(mask).astype(bool)])
    if not parts:
        raise ValueError("`batches` is empty; a pass needs at least one batch.")
    new_state = _batch_update_jit(state, total, min_fraction=min_fraction)
    return new_state, np.concatenate(parts).astype(np.int32)


_batch_update_jit = jax.jit(batch_update, static_argnames=("min_fraction",))
_add_sums_jit = jax.jit(add_sums)
