r"""What a batch tells the clustering: per-cluster counts, factor sums, distortion, outliers.

For the examples ``i`` assigned to cluster ``k`` (``i ∈ k``) and each factor ``f_{i,p,j}``
of each clustered leaf ``p`` (``stats.factors``: ``ā_i`` and ``s_i`` of a matrix leaf, ``g_i``
of a one-factor leaf):

.. math::

   n_k = |k|, \quad F_{k,p,j} = \sum_{i\in k} f_{i,p,j}, \quad D_k = \sum_{i\in k} d_{ik},

and the member farthest from its centre, ``argmax_{i∈k} d_{ik}``, with its factors. The
centre update is the outer product of the factor means, ``C_{k,p} = ⊗_j F_{k,p,j}/n_k``: for a
matrix leaf the cluster's mean input times its mean backprop signal (not the mean of the
outer products, which would not be rank 1), for a one-factor leaf the cluster's exact mean
gradient. Sums of several batches add (:func:`add_sums`), so a pass over the data in
batches gives the same centres as one batch holding all of it. Every reduction over the
batch is a contraction with a one-hot matrix, so a batch sharded over devices reduces to
the same numbers.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxeff._checks import check_number
from jaxeff.clustering.centres import ClusterState, _factors, _members
from jaxeff.pergrad import PerExampleStats
from jaxeff.pergrad.chunks import replicated_like

__all__ = [
    "ClusterSums",
    "add_sums",
    "check_min_fraction",
    "cluster_sums",
    "empty_sums",
    "member_sums",
    "split_small_clusters",
]


class ClusterSums(NamedTuple):
    """Per-cluster sums over the examples seen (see the module docstring).

    Attributes:
      counts: ``(K,)`` ``n_k``.
      factor_sums: ``{path: tuple of (K, *S_j)}``, ``F_{k,p,j}``.
      distortion: ``(K,)`` ``D_k = Σ_{i∈k} d_{ik}``.
      far_distance: ``(K,)`` ``max_{i∈k} d_{ik}``, ``-inf`` for a cluster without members.
      far_factors: ``{path: tuple of (K, *S_j)}``, the factors of that member.
    """

    counts: jax.Array
    factor_sums: dict[str, tuple[jax.Array, ...]]
    distortion: jax.Array
    far_distance: jax.Array
    far_factors: dict[str, tuple[jax.Array, ...]]


def empty_sums(state: ClusterState) -> ClusterSums:
    """Sums over no example, shaped for ``state``'s centres."""
    k = state.sizes.shape[0]
    zeros = jax.tree.map(jnp.zeros_like, state.centres)
    return ClusterSums(
        counts=jnp.zeros((k,), jnp.float32),
        factor_sums=zeros,
        distortion=jnp.zeros((k,), jnp.float32),
        far_distance=jnp.full((k,), -jnp.inf, jnp.float32),
        far_factors=zeros,
    )


def cluster_sums(
    state: ClusterState,
    stats: PerExampleStats,
    assignments: jax.Array,
    dist: jax.Array,
    *,
    mask: ArrayLike | None = None,
) -> ClusterSums:
    """The :class:`ClusterSums` of one batch.

    Args:
      state: the clustering (its centres name the leaves).
      stats: :class:`jaxeff.pergrad.PerExampleStats` with factors for those leaves.
      assignments: ``(B,)`` cluster of each example.
      dist: ``(B, K)`` distances (:func:`jaxeff.clustering.distances`).
      mask: optional ``(B,)`` bool, false for rows to leave out (padding).

    Returns:
      A :class:`ClusterSums`.
    """
    return member_sums(state, stats, _members(assignments, state.sizes.shape[0], mask), dist)


def member_sums(
    state: ClusterState, stats: PerExampleStats, members: jax.Array, dist: jax.Array
) -> ClusterSums:
    """:func:`cluster_sums` with the clusters given as ``(B, K)`` bool members, ``members[i, k]``
    true iff example ``i`` is a (valid) member of cluster ``k``
    (:func:`jaxeff.clustering.centres.assign_members`)."""
    factors = _factors(stats, list(state.centres))
    batch = members.shape[0]
    onehot = members.astype(jnp.float32)
    own = jnp.where(members, dist, -jnp.inf)  # (B, K): distance to own centre, or -inf
    far_distance = jnp.max(own, axis=0)
    far_index = jnp.argmax(own, axis=0)
    far = (jnp.arange(batch)[:, None] == far_index[None, :]) & (far_distance > -jnp.inf)[None]
    far = far.astype(jnp.float32)

    def contract(weights, x):  # Σ_i weights[i, k] x[i]: replicated, also on explicit meshes;
        # at full precision, so a cluster of one example is that example's factors exactly.
        return jnp.einsum(
            "bk,b...->k...",
            weights,
            x.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
            **replicated_like(x),
        )

    return ClusterSums(
        counts=jnp.sum(onehot, axis=0),
        factor_sums={p: tuple(contract(onehot, f) for f in fs) for p, fs in factors.items()},
        distortion=jnp.sum(jnp.where(members, dist, 0.0), axis=0),
        far_distance=far_distance,
        far_factors={p: tuple(contract(far, f) for f in fs) for p, fs in factors.items()},
    )


def add_sums(a: ClusterSums, b: ClusterSums) -> ClusterSums:
    """The sums over the examples of ``a`` and of ``b``."""
    take_b = b.far_distance > a.far_distance

    def pick(x, y):
        return jnp.where(take_b.reshape(-1, *[1] * (x.ndim - 1)), y, x)

    return ClusterSums(
        counts=a.counts + b.counts,
        factor_sums=jax.tree.map(jnp.add, a.factor_sums, b.factor_sums),
        distortion=a.distortion + b.distortion,
        far_distance=jnp.maximum(a.far_distance, b.far_distance),
        far_factors=jax.tree.map(pick, a.far_factors, b.far_factors),
    )


_T = TypeVar("_T")


def check_min_fraction(min_fraction: _T, *, static: bool = False) -> _T:
    """Refuses a ``min_fraction`` outside ``[0, 1)`` (NaN included), naming it.

    ``static``: it will be a Python number (a static argument), so a traced one is refused
    too; otherwise a traced one passes unchecked.
    """
    return check_number(min_fraction, "min_fraction", at_least=0, below=1, static=static)


def split_small_clusters(
    centres: dict[str, tuple[jax.Array, ...]],
    sizes: jax.Array,
    sums: ClusterSums,
    *,
    min_fraction: float,
) -> tuple[dict[str, tuple[jax.Array, ...]], jax.Array]:
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
        new = {
            path: tuple(
                f.at[k].set(jnp.where(do, far[j], f[k]))
                for f, far in zip(parts, sums.far_factors[path], strict=True)
            )
            for path, parts in centres.items()
        }
        half = sizes[j] / 2
        sizes = jnp.where(do, sizes.at[k].set(half).at[j].set(half), sizes)
        score = jnp.where(do, score.at[j].set(-jnp.inf), score)
        return new, sizes, score

    centres, sizes, _ = jax.lax.fori_loop(0, num, body, (dict(centres), sizes, score))
    return centres, sizes
