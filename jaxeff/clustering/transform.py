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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxeff.clustering.centres import (
    ClusterState,
    _check_num_clusters,
    cluster_layers,
    init_from_stats,
)
from jaxeff.clustering.online import check_online_options, online_update

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
    model: nnx.Module,
    *,
    num_clusters: int,
    batch_size: int,
    decay: float = 0.9,
    min_fraction: float = 0.0,
    reinit_every: int = 0,
    layers=None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Clusters the examples of each step by gradient; the updates pass through unchanged.

    ``update(updates, state, params=None, *, per_example_stats, **extra_args)``: on the
    first call the ``K`` centres are seeded at ``K`` distinct examples of the batch
    (``v_k = ā_i``, ``u_k = s_i``); on every later call the batch is assigned by
    ``argmin_k (N_k + 1)||g_i − C_k||²`` and sizes and centres move by the moving averages
    of :func:`jaxeff.clustering.online_update`. Jittable; the state is a pytree of arrays
    that checkpoints with the optimizer state.

    Args:
      model: the ``nnx.Module`` being trained (only its layer shapes are read).
      num_clusters: ``K``.
      batch_size: ``B``, the number of examples in each step's statistics.
      decay, min_fraction, reinit_every: see :func:`jaxeff.clustering.online_update`.
      layers: the ``nnx.Linear``/``nnx.Conv`` layers to cluster on (``None``: all).
      seed: seeds the choice of the initial centres.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`GradientClusteringState`.

    Example::

      gc = gradient_clustering(model, num_clusters=8, batch_size=64)
      tx = optax.chain(gc, optax.sgd(0.1))
      opt_state = tx.init(nnx.state(model, nnx.Param))
      loss, grads, stats = pergrad.value_grad_and_stats(
          model, loss_fn, batch, weights=weights, directions=opt_state[0].clusters.centres)
      updates, opt_state = tx.update(grads, opt_state, params, per_example_stats=stats)
      sampler.update(opt_state[0].assignments, indices=batch_indices)
    """
    _check_num_clusters(num_clusters)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < num_clusters:
        raise ValueError(
            f"`batch_size` must be an integer of at least `num_clusters` ({num_clusters}), got "
            f"{batch_size!r}."
        )
    shapes = cluster_layers(model, layers)
    options = dict(decay=decay, min_fraction=min_fraction, reinit_every=reinit_every)
    check_online_options(**options)

    def init_fn(params):
        del params
        centres = {
            name: (
                jnp.zeros((num_clusters, d_in), jnp.float32),
                jnp.zeros((num_clusters, d_out), jnp.float32),
            )
            for name, (d_in, d_out) in shapes.items()
        }
        sizes = jnp.full((num_clusters,), batch_size / num_clusters, jnp.float32)
        clusters = ClusterState(centres, sizes, jnp.zeros((), jnp.int32))
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
                f"`per_example_stats` must describe batch_size={batch_size} examples, got "
                f"losses of shape {stats.losses.shape}."
            )
        key = jax.random.wrap_key_data(state.key)
        seed_key, next_key = jax.random.split(key)

        def seed(state):
            clusters = init_from_stats(
                stats, num_clusters=num_clusters, key=seed_key, layers=list(shapes)
            )
            clusters = clusters._replace(count=jnp.ones((), jnp.int32))
            return clusters, jnp.full((batch_size,), -1, jnp.int32)

        def move(state):
            return online_update(state.clusters, stats, **options)

        clusters, assignments = jax.lax.cond(state.clusters.count == 0, seed, move, state)
        return updates, GradientClusteringState(
            clusters, assignments, jax.random.key_data(next_key)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
