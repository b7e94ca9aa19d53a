r"""Online gradient clustering as an optax transformation that rides along any training step.

:func:`gradient_clustering` is a ``GradientTransformationExtraArgs`` that leaves the
updates unchanged and, from the extra argument ``per_example_stats`` (the fast-path
statistics of the step's batch, :func:`jaxeff.pergrad.value_grad_and_stats` with
``directions=state.clusters.centres``), assigns the batch's examples and updates the
clusters online (:func:`jaxeff.clustering.online_update`). Put it first in an
``optax.chain`` and feed the assignments it keeps to a stratified sampler
(:class:`jaxeff.clustering.StratifiedSampler`), whose weights ``N_k/(N n_k)`` make the
weighted mean gradient of the next batches an unbiased, lower-variance estimate of the
full gradient. Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep
Learning", https://arxiv.org/abs/2007.04532.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jaxeff.clustering.centres import (
    ClusterState,
    _check_num_clusters,
    assign_members,
    cluster_leaves,
    seed_rows,
    zero_directions,
)
from jaxeff.clustering.online import apply_sums, check_online_options
from jaxeff.clustering.sums import member_sums
from jaxeff.pergrad.reference import batch_size_of

__all__ = ["GradientClusteringState", "gradient_clustering"]


class GradientClusteringState(NamedTuple):
    """State of :func:`gradient_clustering`.

    Attributes:
      clusters: the :class:`jaxeff.clustering.ClusterState`; ``clusters.centres`` are the
        ``directions`` the step's statistics must be computed with.
      assignments: ``(B,)`` int32 clusters of the last batch's examples, ``-1`` before the
        first assignment (the first update only seeds the centres at examples of its batch).
      key: PRNG key for the seeding.
    """

    clusters: ClusterState
    assignments: jax.Array
    key: jax.Array


def gradient_clustering(
    loss_fn: Callable[[Any, Any], jax.Array],
    batch: chex.ArrayTree,
    *,
    num_clusters: int,
    decay: float = 0.9,
    min_fraction: float = 0.0,
    reinit_every: int = 0,
    leaves: str | Sequence[str] | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Clusters the examples of each step by gradient; the updates pass through unchanged.

    ``update(updates, state, params=None, *, per_example_stats, **extra_args)``: on the
    first call the ``K`` centres are seeded at ``K`` distinct examples of the batch
    (:func:`jaxeff.clustering.init_from_stats`); on every later call the batch is assigned
    by ``argmin_k (N_k + 1)||g_i − C_k||²`` and sizes and centres move by the moving
    averages of :func:`jaxeff.clustering.online_update`. Jittable; the state is a pytree of
    arrays that checkpoints with the optimizer state.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)``, the per-example loss the step's
        statistics are computed for (only traced at ``init``, to find the leaves and their
        factor shapes).
      batch: a batch of the step's shape (arrays or ``jax.ShapeDtypeStruct``); its ``B``
        is the number of examples in each step's statistics.
      num_clusters: ``K``.
      decay, min_fraction, reinit_every: see :func:`jaxeff.clustering.online_update`.
      leaves: the parameter paths to cluster on (``None``: every leaf that can be; see
        :func:`jaxeff.clustering.cluster_leaves`).
      seed: seeds the choice of the initial centres.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`GradientClusteringState`.

    Example (any framework; here flax linen)::

      def loss_fn(params, batch):
          logits = model.apply({"params": params}, batch["x"])
          return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

      tx = optax.chain(gradient_clustering(loss_fn, batch, num_clusters=8), optax.sgd(0.1))
      opt_state = tx.init(params)
      loss, grads, stats = pergrad.value_grad_and_stats(
          loss_fn, params, batch, weights=weights, directions=opt_state[0].clusters.centres)
      updates, opt_state = tx.update(grads, opt_state, params, per_example_stats=stats)
      sampler.update(opt_state[0].assignments, indices=batch_indices)
    """
    _check_num_clusters(num_clusters)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    batch_size = batch_size_of(batch)
    if batch_size < num_clusters:
        raise ValueError(
            f"`batch` must hold at least `num_clusters` ({num_clusters}) examples, got "
            f"{batch_size}."
        )
    check_online_options(decay=decay, min_fraction=min_fraction, reinit_every=reinit_every)
    batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), batch)

    def init_fn(params):
        shapes = cluster_leaves(loss_fn, params, batch_shapes, leaves)
        sizes = jnp.full((num_clusters,), batch_size / num_clusters, jnp.float32)
        clusters = ClusterState(
            zero_directions(shapes, num_clusters), sizes, jnp.zeros((), jnp.int32)
        )
        return GradientClusteringState(
            clusters,
            jnp.full((batch_size,), -1, jnp.int32),
            jax.random.key_data(jax.random.key(seed)),
        )

    def update_fn(updates, state, params=None, *, per_example_stats=None, **extra_args):
        del params, extra_args
        if per_example_stats is None:
            raise ValueError(
                "gradient_clustering needs the extra argument `per_example_stats` (from "
                "jaxeff.pergrad.value_grad_and_stats with directions=state.clusters.centres)."
            )
        stats = per_example_stats
        if stats.losses.shape != (batch_size,):
            raise ValueError(
                f"`per_example_stats` must describe {batch_size} examples (the `batch` "
                f"gradient_clustering was made with), got losses of shape {stats.losses.shape}."
            )
        key = jax.random.wrap_key_data(state.key)
        seed_key, next_key = jax.random.split(key)
        clusters = state.clusters
        first = clusters.count == 0
        # One program for both cases, so that a step runs the collectives of a sharded
        # batch once each and outside any branch (where they can merge with the
        # gradient's): only the choice of the seeds, which the first update alone needs,
        # sits behind a `cond`. The first update sums each seed as a cluster of its own,
        # which puts every centre on its example's factors.
        leaves = list(clusters.centres)

        def seeds(_):  # (B, K) members: seed k alone in cluster k
            chosen = seed_rows(stats, num_clusters=num_clusters, key=seed_key, leaves=leaves)
            return jnp.arange(batch_size)[:, None] == chosen[None, :]

        def no_seeds(_):
            return jnp.zeros((batch_size, num_clusters), bool)

        seeded = jax.lax.cond(first, seeds, no_seeds, None)
        assignments, members, dist = assign_members(clusters, stats)
        sums = member_sums(clusters, stats, jnp.where(first, seeded, members), dist)
        moved = apply_sums(
            clusters, sums, decay=decay, min_fraction=min_fraction, reinit_every=reinit_every
        )
        seeded_clusters = ClusterState(
            sums.factor_sums,
            jnp.full((num_clusters,), batch_size / num_clusters, jnp.float32),
            jnp.ones((), jnp.int32),
        )
        clusters = jax.tree.map(
            lambda a, b: jnp.where(first, a, b).astype(b.dtype), seeded_clusters, moved
        )
        assignments = jnp.where(first, -1, assignments)
        return updates, GradientClusteringState(
            clusters, assignments, jax.random.key_data(next_key)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
