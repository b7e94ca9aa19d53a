r"""Gradient clusters with factored centres: the state, distances and size-weighted assignment.

Each of ``K`` clusters has, for every clustered parameter leaf ``p``, a centre ``C_{k,p}``
stored as the factors of :func:`jaxeff.pergrad.direction_shapes`: for a leaf used as a
matrix (a Dense or Conv kernel, an embedding table) the rank-1 ``v_{k,p} ⊗ u_{k,p}`` in its
``(contracting, free)`` split, never formed; for a leaf given one factor (a bias, a norm
scale) the dense ``C_{k,p}``. With example ``i``'s gradient ``g_{i,p}`` the squared distance is

.. math::

   d_{ik} = \sum_p \|g_{i,p} - C_{k,p}\|^2
          = \sum_p \Big(\|g_{i,p}\|^2 - 2\langle g_{i,p}, C_{k,p}\rangle
            + \prod_j \|f_{k,p,j}\|^2\Big),

where ``||g_{i,p}||²`` and ``<g_{i,p}, C_{k,p}>`` come from
:func:`jaxeff.pergrad.per_example_stats` (``sq_norms`` and ``leaf_dots``, computed with
``directions=state.centres``) and ``f_{k,p,j}`` are the centre's factors: no per-example
gradient is materialised for a factored leaf. Example ``i`` goes to the cluster of least
size-weighted distance

.. math::

   k(i) = \arg\min_k\, (\hat N_k + 1)\, d_{ik},

the weighting that minimises the variance ``Σ_k N_k Σ_{i∈k} ||g_i − μ_k||² / (N² n)`` of
the stratified estimator with ``n`` draws per cluster (``+1`` keeps a cluster that has
just emptied from taking every example). ``N̂_k`` is the cluster's running size estimate
as the examples are assigned one after another (:func:`size_weighted_argmin`). Faghri,
Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxeff._sharding import gather_explicit
from jaxeff.pergrad import PerExampleStats, direction_shapes, param_paths, per_example_stats
from jaxeff.pergrad.chunks import replicated_like

__all__ = [
    "AssignmentCounts",
    "ClusterState",
    "assign",
    "assign_members",
    "cluster_leaves",
    "distances",
    "init_from_stats",
    "seed_rows",
    "size_weighted_argmin",
    "zero_directions",
]


class ClusterState(NamedTuple):
    """The state of a gradient clustering: a pytree that checkpoints with the rest of training.

    Attributes:
      centres: ``{parameter path: factors}``, each factor ``(K, *S_j)`` with the shapes of
        :func:`jaxeff.pergrad.direction_shapes` (``(v, u)`` for a kernel, ``(c,)`` for a
        bias), so ``centres`` is itself the ``directions`` argument of
        :func:`jaxeff.pergrad.per_example_stats`.
      sizes: ``(K,)`` float32 cluster sizes ``N_k`` (examples per pass in batch mode, the
        moving average of examples per batch online).
      count: ``()`` int32, the number of updates so far.
    """

    centres: dict[str, tuple[jax.Array, ...]]
    sizes: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count (as in optax's states)


def zero_directions(
    shapes: Mapping[str, Sequence[tuple[int, ...]]], num_clusters: int
) -> dict[str, tuple[jax.Array, ...]]:
    """``{path: zeros (K, *S_j) for each factor}``: directions that only make
    :func:`jaxeff.pergrad.per_example_stats` return the leaves' factors."""
    return {
        path: tuple(jnp.zeros((num_clusters, *shape), jnp.float32) for shape in split)
        for path, split in shapes.items()
    }


def cluster_leaves(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: chex.ArrayTree,
    batch: chex.ArrayTree,
    leaves: str | Sequence[str] | None = None,
) -> dict[str, tuple]:
    """``{path: factor shapes}`` of the parameter leaves to cluster on.

    A leaf can be clustered when :func:`jaxeff.pergrad.per_example_stats` gives its
    per-example factors in the split of :func:`jaxeff.pergrad.direction_shapes`: every
    leaf given one factor, and a matrix leaf whose per-example gradient is one sum of
    outer products in its split (Dense, Conv with one feature group, an embedding table,
    tied or not). Traces ``loss_fn`` abstractly; nothing is computed.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
      batch: a batch (arrays or ``jax.ShapeDtypeStruct``) with the example axis first.
      leaves: parameter paths (``"Dense_0/kernel"``, as :func:`jaxeff.pergrad.param_paths`)
        to cluster on; ``None``: every leaf that can be.

    Raises:
      ValueError: naming ``leaves``, for a path that is not a parameter or cannot be
        clustered (with the reason), or when none can be.
    """
    shapes = direction_shapes(loss_fn, params, batch)
    probe = jax.eval_shape(
        lambda p, b: per_example_stats(
            loss_fn, p, b, directions=zero_directions(shapes, 1), with_sum_sq=False
        ),
        params,
        batch,
    )
    usable = {path: split for path, split in shapes.items() if path in probe.factors}
    if leaves is None:
        if not usable:
            raise ValueError(
                "no parameter leaf of `params` can be clustered (see "
                "jaxeff.pergrad.per_example_stats(...).reasons)."
            )
        return usable
    if isinstance(leaves, str):
        leaves = [leaves]
    chosen = {}
    for path in leaves:
        if path not in shapes:
            raise ValueError(
                f"`leaves` names {path!r}, which is not a parameter path; paths: {sorted(shapes)}."
            )
        if path not in usable:
            raise ValueError(
                f"`leaves` names {path!r}, whose per-example gradient has no factors in the "
                f"split {shapes[path]} ({probe.reasons[path]}); cluster on other leaves."
            )
        chosen[path] = usable[path]
    if not chosen:
        raise ValueError("`leaves` must name at least one parameter leaf.")
    return chosen


def _check_num_clusters(num_clusters: Any) -> None:
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"`num_clusters` must be a positive integer, got {num_clusters!r}.")


def _from_stats(stats: PerExampleStats, field: str, paths: Sequence[str], what: str) -> dict:
    found = getattr(stats, field) or {}
    missing = [p for p in paths if p not in found]
    if missing:
        raise ValueError(
            f"`stats` has no {what} for leaves {missing}: compute them with "
            "jaxeff.pergrad.per_example_stats(..., directions=state.centres) (see "
            "jaxeff.clustering.cluster_leaves for the leaves that can be clustered)."
        )
    return {p: found[p] for p in paths}


def _factors(stats: PerExampleStats, paths: Sequence[str]) -> dict:
    """``{path: per-example factors}`` for ``paths``, from ``stats.factors``."""
    return _from_stats(stats, "factors", paths, "factors")


def _float_factors(stats: PerExampleStats, paths: Sequence[str]) -> dict:
    """:func:`_factors` in float32."""
    return {
        path: tuple(x.astype(jnp.float32) for x in parts)
        for path, parts in _factors(stats, list(paths)).items()
    }


def _leaf_sq_norms(stats: PerExampleStats, paths: Sequence[str]) -> dict:
    """``{path: (B,) ||g_{i,p}||²}`` for ``paths``."""
    flat = dict(zip(param_paths(stats.sq_norms), jax.tree.leaves(stats.sq_norms), strict=True))
    return {p: flat[p] for p in paths}


def _flat(x):
    return x.reshape(x.shape[0], -1)


def _rows(x, onehot):
    """``onehot @ x`` over the example axis: rows of ``x`` picked by a contraction, so a
    batch sharded over devices stays sharded (a reduction of the picked rows, not a gather
    of the whole array); at full precision, so the rows come out exact on any backend."""
    highest = jax.lax.Precision.HIGHEST
    axes = ([onehot.ndim - 1], [0])
    return jnp.tensordot(onehot, x, axes=axes, precision=highest, **replicated_like(x))


def _seed_distances(factors, row):
    """``(B,)`` ``||g̃_i − g̃_row||²`` between the factored gradients (``ā_i ⊗ s_i`` for a
    matrix leaf, ``g_i`` for a one-factor leaf), summed over leaves; ``row`` is one-hot."""
    total: float | jax.Array = 0.0
    for parts in factors.values():
        dots: float | jax.Array = 1.0
        sq: float | jax.Array = 1.0
        for f in parts:
            f = _flat(f)
            picked = _rows(f, row)
            dots = dots * (f @ picked)
            sq = sq * jnp.sum(f * f, axis=1)
        total = total + sq + jnp.dot(row, sq) - 2.0 * dots
    return gather_explicit(jnp.maximum(total, 0.0))


def seed_rows(
    stats: PerExampleStats, *, num_clusters: int, key: jax.Array, leaves: Sequence[str]
) -> jax.Array:
    r"""The ``(K,)`` distinct examples of a batch that :func:`init_from_stats` seeds at.

    D² seeding on the factored gradients: the first example is uniform; for each next
    one, ``2 + ⌊ln K⌋`` candidates are drawn with probability proportional to their
    squared distance to the nearest centre so far, and the one that lowers the total of
    those distances most is kept (greedy k-means++: Arthur & Vassilvitskii, "k-means++: The
    Advantages of Careful Seeding", SODA 2007). Pure and jittable; the rows of a batch
    sharded over devices are picked by contractions, never gathered.
    """
    _check_num_clusters(num_clusters)
    factors = _float_factors(stats, leaves)
    batch = stats.losses.shape[0]
    if batch < num_clusters:
        raise ValueError(
            f"the batch must hold at least `num_clusters` ({num_clusters}) examples to seed "
            f"the centres, got {batch}."
        )
    keys = jax.random.split(key, num_clusters)
    first = jax.random.randint(keys[0], (), 0, batch)
    chosen = jnp.zeros((num_clusters,), jnp.int32).at[0].set(first)
    taken = jnp.zeros((batch,), bool).at[first].set(True)

    trials = 2 + int(math.log(num_clusters))

    def pick(k, carry):
        chosen, taken, nearest = carry
        # D² among the examples not chosen yet; uniform among them if all are at 0.
        weight = jnp.where(taken, 0.0, nearest)
        weight = jnp.where(jnp.sum(weight) > 0, weight, jnp.where(taken, 0.0, 1.0))
        rows = jax.random.categorical(keys[k], jnp.log(weight), shape=(trials,))
        # Greedy: of the candidates, the one that lowers Σ_i min_k d(i, k) the most.
        onehot = jax.nn.one_hot(rows, batch, dtype=jnp.float32)
        closer = jax.vmap(lambda row: jnp.minimum(nearest, _seed_distances(factors, row)))(onehot)
        best = jnp.argmin(jnp.sum(closer, axis=1))
        row = rows[best]
        return chosen.at[k].set(row), taken.at[row].set(True), closer[best]

    nearest = _seed_distances(factors, jax.nn.one_hot(first, batch, dtype=jnp.float32))
    chosen, _, _ = jax.lax.fori_loop(1, num_clusters, pick, (chosen, taken, nearest))
    return chosen


def init_from_stats(
    stats: PerExampleStats, *, num_clusters: int, key: jax.Array, leaves: Sequence[str]
) -> ClusterState:
    r"""``K`` centres at ``K`` distinct examples of a batch, chosen by D² seeding.

    Centre ``k`` is example ``i_k``'s factors (``stats.factors``): ``ā_{i_k} ⊗ s_{i_k}`` for
    a matrix leaf (the mean layer input over positions and the backprop signal summed over
    positions; exactly ``g_{i_k}`` for a Dense layer on ``(B, d)`` inputs) and ``g_{i_k}``
    for a one-factor leaf, so each centre starts on a real example's gradient. The
    examples ``i_k`` are :func:`seed_rows` (greedy k-means++), so groups of identical
    examples each get a centre before any gets two. Sizes start equal, ``B / K`` each.
    Pure and jittable.

    Args:
      stats: :class:`jaxeff.pergrad.PerExampleStats` of a batch of ``B >= K`` examples with
        factors for ``leaves`` (e.g. computed with :func:`zero_directions`).
      num_clusters: ``K`` (static).
      key: PRNG key choosing the examples.
      leaves: the paths to cluster on (:func:`cluster_leaves`).

    Returns:
      A :class:`ClusterState` with ``count = 0``.
    """
    chosen = seed_rows(stats, num_clusters=num_clusters, key=key, leaves=leaves)
    batch = stats.losses.shape[0]
    picks = jax.nn.one_hot(chosen, batch, dtype=jnp.float32)
    centres = {
        path: tuple(_rows(f, picks) for f in parts)
        for path, parts in _float_factors(stats, leaves).items()
    }
    sizes = jnp.full((num_clusters,), batch / num_clusters, jnp.float32)
    return ClusterState(centres, sizes, jnp.zeros((), jnp.int32))


def distances(state: ClusterState, stats: PerExampleStats) -> jax.Array:
    r"""``(B, K)`` squared distances ``d_{ik} = Σ_p ||g_{i,p} − C_{k,p}||²`` (module docstring).

    Computed from ``stats.sq_norms`` and ``stats.leaf_dots`` (which must be computed with
    ``directions=state.centres``) in ``O(B K)`` per leaf; clipped at 0 against rounding.
    """
    paths = list(state.centres)
    sq = _leaf_sq_norms(stats, paths)
    dots = _from_stats(stats, "leaf_dots", paths, "inner products")
    total: float | jax.Array = 0.0
    for path, parts in state.centres.items():
        centre_sq: float | jax.Array = 1.0
        for f in parts:
            centre_sq = centre_sq * jnp.sum(jnp.square(_flat(f)), axis=1)
        total = total + sq[path][:, None] - 2.0 * dots[path].T + jnp.asarray(centre_sq)[None, :]
    return jnp.maximum(total, 0.0)


class AssignmentCounts(NamedTuple):
    """Examples assigned so far in a pass: ``counts`` ``(K,)`` and their total ``seen``."""

    counts: jax.Array
    seen: jax.Array


def size_weighted_argmin(
    dist: jax.Array,
    sizes: jax.Array,
    *,
    mask: ArrayLike | None = None,
    so_far: AssignmentCounts | None = None,
) -> tuple[jax.Array, AssignmentCounts]:
    r"""Examples assigned one after another by ``argmin_k (N̂_k + 1) d_{ik}``.

    ``N̂_k`` estimates cluster ``k``'s size at the end of the pass: the examples it has
    received so far in this pass, ``c_k``, plus its previous size ``N_k`` scaled by the
    share of the pass still to come,

    .. math::

       \hat N_k = c_k + N_k \max\Big(0, 1 - \frac{\text{seen}}{\sum_l N_l}\Big).

    Assigning all examples at once with the previous sizes oscillates: every example
    moves to the same small cluster, which is then the largest. One after another, a
    cluster that fills up stops attracting examples within the pass, which is the
    objective the weighting stands for (each example's share of the stratified
    estimator's variance ``Σ_k N_k Σ_{i∈k} ||g_i − μ_k||²``). A ``lax.scan`` over the
    ``B`` rows of ``dist`` (``O(B K)``).

    Args:
      dist: ``(B, K)`` distances.
      sizes: ``(K,)`` previous sizes ``N_k``.
      mask: optional ``(B,)`` bool; masked rows get an assignment but are not counted.
      so_far: counts from earlier batches of the same pass (default: none).

    Returns:
      ``(assignments (B,) int32, counts so far including this batch)``.
    """
    assignments, _, so_far = _scan_assign(dist, sizes, mask, so_far)
    return assignments, so_far


def _scan_assign(dist, sizes, mask, so_far):
    """:func:`size_weighted_argmin`, also returning the ``(B, K)`` bool members, a second
    output of the scan (see :func:`assign_members`)."""
    k = sizes.shape[0]
    dist = gather_explicit(dist)
    valid = jnp.ones(dist.shape[:1], bool) if mask is None else gather_explicit(jnp.asarray(mask))
    if so_far is None:
        so_far = AssignmentCounts(jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32))
    total = jnp.maximum(jnp.sum(sizes), 1.0)

    def step(carry, row):
        counts, seen = carry
        d, ok = row
        estimate = counts + sizes * jnp.maximum(0.0, 1.0 - seen / total)
        choice = jnp.argmin((estimate + 1.0) * d).astype(jnp.int32)
        member = (jnp.arange(k) == choice) & ok
        counts = counts + member.astype(jnp.float32)
        return AssignmentCounts(counts, seen + ok.astype(jnp.float32)), (choice, member)

    so_far, (assignments, members) = jax.lax.scan(step, so_far, (dist, valid))
    return assignments, members, so_far


def assign(
    state: ClusterState,
    stats: PerExampleStats,
    *,
    size_weighted: bool = True,
    mask: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Each example's cluster, ``argmin_k (N̂_k + 1) d_{ik}``, and the distances.

    With ``size_weighted`` the examples are assigned in order by
    :func:`size_weighted_argmin` (sizes ``state.sizes``), otherwise to their nearest
    centre.

    Args:
      state: the :class:`ClusterState` whose centres ``stats`` was computed with.
      stats: :class:`jaxeff.pergrad.PerExampleStats` with ``directions=state.centres``.
      size_weighted: ``False`` for plain nearest-centre assignment ``argmin_k d_{ik}``.
      mask: optional ``(B,)`` bool, false for rows that are not real examples.

    Returns:
      ``(assignments (B,) int32, distances (B, K))``.
    """
    assignments, _, dist = assign_members(state, stats, size_weighted=size_weighted, mask=mask)
    return assignments, dist


def assign_members(
    state: ClusterState,
    stats: PerExampleStats,
    *,
    size_weighted: bool = True,
    mask: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`assign`, with the ``(B, K)`` bool members ``[k(i) = k and row i is valid]``.

    For :func:`jaxeff.clustering.sums.member_sums`. The members are computed beside the
    assignments rather than from them, so that on a batch split over devices the
    assignments stay whole on every device: the members are split like the factors they
    are contracted with, and would otherwise take the assignments with them (a gather of
    the assignments each step).

    Returns:
      ``(assignments (B,) int32, members (B, K) bool, distances (B, K))``.
    """
    dist = distances(state, stats)
    if size_weighted:
        assignments, members, _ = _scan_assign(dist, state.sizes, mask, None)
        return assignments, members, dist
    assignments = jnp.argmin(dist, axis=1).astype(jnp.int32)
    return assignments, _members(assignments, state.sizes.shape[0], mask), dist


def _members(assignments: jax.Array, num_clusters: int, mask: ArrayLike | None) -> jax.Array:
    """``(B, K)`` bool ``[assignments[i] = k and row i is valid]``."""
    members = assignments[:, None] == jnp.arange(num_clusters)[None, :]
    return members if mask is None else members & jnp.asarray(mask, bool)[:, None]
