r"""What a batch tells the clustering: per-cluster counts, factor sums, distortion, outliers.

For the examples ``i`` assigned to cluster ``k`` (``i ∈ k``) and each clustered layer:

.. math::

   n_k = |k|, \quad A_k = \sum_{i\in k} \bar a_i, \quad S_k = \sum_{i\in k} s_i, \quad
   D_k = \sum_{i\in k} d_{ik},

and the member farthest from its centre, ``argmax_{i∈k} d_{ik}``, with its factors. The
centre update is the outer product of the cluster's mean input and mean backprop signal,
``C_k = (A_k/n_k)(S_k/n_k)ᵀ`` (not the mean of the outer products, which would not be rank
1); its bias part ``S_k/n_k`` is the cluster's exact mean bias gradient. Sums of several
batches add (:func:`add_sums`), so a pass over the data in batches gives the same centres
as one batch holding all of it. Every reduction over the batch is a contraction with a
one-hot matrix, so a batch sharded over devices reduces to the same numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxeff.clustering.centres import ClusterState, _factors
from jaxeff.pergrad.chunks import replicated_like

__all__ = ["ClusterSums", "add_sums", "cluster_sums", "empty_sums", "split_small_clusters"]


class ClusterSums(NamedTuple):
    """Per-cluster sums over the examples seen (see the module docstring).

    Attributes:
      counts: ``(K,)`` ``n_k``.
      input_sums: ``{layer name: (K, d_in)}`` ``A_k``.
      signal_sums: ``{layer name: (K, d_out)}`` ``S_k``.
      distortion: ``(K,)`` ``D_k = Σ_{i∈k} d_{ik}``.
      far_distance: ``(K,)`` ``max_{i∈k} d_{ik}``, ``-inf`` for a cluster without members.
      far_inputs, far_signals: ``{layer name: (K, d)}``, the factors of that member.
    """

    counts: jax.Array
    input_sums: dict
    signal_sums: dict
    distortion: jax.Array
    far_distance: jax.Array
    far_inputs: dict
    far_signals: dict


def empty_sums(state: ClusterState) -> ClusterSums:
    """Sums over no example, shaped for ``state``'s centres."""
    k = state.sizes.shape[0]
    zeros = {name: jnp.zeros_like(v) for name, (v, _) in state.centres.items()}
    zeros_u = {name: jnp.zeros_like(u) for name, (_, u) in state.centres.items()}
    return ClusterSums(
        counts=jnp.zeros((k,), jnp.float32),
        input_sums=zeros,
        signal_sums=zeros_u,
        distortion=jnp.zeros((k,), jnp.float32),
        far_distance=jnp.full((k,), -jnp.inf, jnp.float32),
        far_inputs=zeros,
        far_signals=zeros_u,
    )


def cluster_sums(
    state: ClusterState, stats, assignments: jax.Array, dist: jax.Array, *, mask=None
) -> ClusterSums:
    """The :class:`ClusterSums` of one batch.

    Args:
      state: the clustering (its centres name the layers).
      stats: :class:`jaxeff.pergrad.PerExampleStats` with factors for those layers.
      assignments: ``(B,)`` cluster of each example.
      dist: ``(B, K)`` distances (:func:`jaxeff.clustering.distances`).
      mask: optional ``(B,)`` bool, false for rows to leave out (padding).

    Returns:
      A :class:`ClusterSums`.
    """
    k = state.sizes.shape[0]
    factors = _factors(stats, list(state.centres))
    batch = assignments.shape[0]
    valid = jnp.ones((batch,), bool) if mask is None else jnp.asarray(mask, bool)
    member = (assignments[:, None] == jnp.arange(k)[None, :]) & valid[:, None]  # (B, K)
    onehot = member.astype(jnp.float32)
    own = jnp.where(member, dist, -jnp.inf)  # (B, K): distance to own centre, or -inf
    far_distance = jnp.max(own, axis=0)
    far_index = jnp.argmax(own, axis=0)
    far = (jnp.arange(batch)[:, None] == far_index[None, :]) & (far_distance > -jnp.inf)[None]
    far = far.astype(jnp.float32)

    def contract(weights, x):  # Σ_i weights[i, k] x[i]: replicated, also on explicit meshes
        return jnp.einsum("bk,bd->kd", weights, x.astype(jnp.float32), **replicated_like(x))

    return ClusterSums(
        counts=jnp.sum(onehot, axis=0),
        input_sums={name: contract(onehot, a) for name, (a, _) in factors.items()},
        signal_sums={name: contract(onehot, s) for name, (_, s) in factors.items()},
        distortion=jnp.sum(jnp.where(member, dist, 0.0), axis=0),
        far_distance=far_distance,
        far_inputs={name: contract(far, a) for name, (a, _) in factors.items()},
        far_signals={name: contract(far, s) for name, (_, s) in factors.items()},
    )


def add_sums(a: ClusterSums, b: ClusterSums) -> ClusterSums:
    """The sums over the examples of ``a`` and of ``b``."""
    take_b = b.far_distance > a.far_distance

    def pick(x, y):
        return jnp.where(take_b[:, None], y, x)

    return ClusterSums(
        counts=a.counts + b.counts,
        input_sums=jax.tree.map(jnp.add, a.input_sums, b.input_sums),
        signal_sums=jax.tree.map(jnp.add, a.signal_sums, b.signal_sums),
        distortion=a.distortion + b.distortion,
        far_distance=jnp.maximum(a.far_distance, b.far_distance),
        far_inputs=jax.tree.map(pick, a.far_inputs, b.far_inputs),
        far_signals=jax.tree.map(pick, a.far_signals, b.far_signals),
    )


def split_small_clusters(
    centres: dict, sizes: jax.Array, sums: ClusterSums, *, min_fraction: float
) -> tuple[dict, jax.Array]:
    r"""Moves every cluster smaller than ``min_fraction · Σ_k N_k`` into a split of a large one.

    Clusters are taken in order; each small cluster ``k`` takes the not yet split cluster
    ``j`` of highest distortion ``D_j`` that has a member away from its centre, and is
    re-seeded at ``j``'s farthest member (the split: ``j``'s members then divide between
    ``j``'s centre and that point); the two share ``j``'s size. Each cluster is split at
    most once per call. Pure and jittable.

    Returns:
      ``(centres, sizes)``.
    """
    num = sizes.shape[0]
    threshold = min_fraction * jnp.sum(sizes)
    small = sizes < threshold
    candidate = ~small & (sums.far_distance > 0) & jnp.isfinite(sums.far_distance)
    score = jnp.where(candidate, sums.distortion, -jnp.inf)

    def body(k, carry):
        centres, sizes, score = carry
        j = jnp.argmax(score)
        do = small[k] & (score[j] > -jnp.inf)
        new = {}
        for name, (v, u) in centres.items():
            v = v.at[k].set(jnp.where(do, sums.far_inputs[name][j], v[k]))
            u = u.at[k].set(jnp.where(do, sums.far_signals[name][j], u[k]))
            new[name] = (v, u)
        half = sizes[j] / 2
        sizes = jnp.where(do, sizes.at[k].set(half).at[j].set(half), sizes)
        score = jnp.where(do, score.at[j].set(-jnp.inf), score)
        return new, sizes, score

    centres, sizes, _ = jax.lax.fori_loop(0, num, body, (dict(centres), sizes, score))
    return centres, sizes
