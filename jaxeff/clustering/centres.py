r"""Gradient clusters with rank-1 centres: the state, distances and size-weighted assignment.

Each of ``K`` clusters has, for every clustered Dense/Conv layer ``L``, a rank-1 centre
``C_{k,L} = v_{k,L} u_{k,L}ᵀ`` on the kernel (the kernel seen as the ``d_in × d_out``
matrix of :func:`jaxeff.pergrad.direction_shapes`) and ``u_{k,L}`` on the bias, stored as
the two vectors, never as a matrix. With example ``i``'s gradient ``g_{i,L}`` (kernel and
bias) the squared distance is

.. math::

   d_{ik} = \sum_L \|g_{i,L} - C_{k,L}\|^2
          = \sum_L \Big(\|g_{i,L}\|^2 - 2\langle g_{i,L}, C_{k,L}\rangle
            + \|v_{k,L}\|^2\|u_{k,L}\|^2 + [\text{bias}_L]\,\|u_{k,L}\|^2\Big),

where ``||g_{i,L}||²`` and ``<g_{i,L}, C_{k,L}>`` come from the fast path of
:func:`jaxeff.pergrad.per_example_stats` (``sq_norms`` and ``layer_dots``, computed with
``directions=state.centres``): no per-example gradient is materialised. Example ``i`` goes
to the cluster of least size-weighted distance

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff._sharding import gather_explicit
from jaxeff.pergrad import direction_shapes

__all__ = [
    "AssignmentCounts",
    "ClusterState",
    "assign",
    "cluster_layers",
    "distances",
    "init_from_stats",
    "layer_name",
    "size_weighted_argmin",
    "zero_directions",
]


class ClusterState(NamedTuple):
    """The state of a gradient clustering: a pytree that checkpoints with the rest of training.

    Attributes:
      centres: ``{layer name: (v, u)}``, ``v`` of shape ``(K, d_in)`` and ``u`` of shape
        ``(K, d_out)``; the layer name is its path joined by ``"/"`` (``"layers/0"``), so
        ``centres`` is itself the ``directions`` argument of
        :func:`jaxeff.pergrad.per_example_stats`.
      sizes: ``(K,)`` float32 cluster sizes ``N_k`` (examples per pass in batch mode, the
        moving average of examples per batch online).
      count: ``()`` int32, the number of updates so far.
    """

    centres: dict
    sizes: jax.Array
    count: jax.Array


def layer_name(path) -> str:
    """A layer path tuple (as ``nnx.iter_graph`` lists it) joined by ``"/"``."""
    return path if isinstance(path, str) else "/".join(map(str, path))


def cluster_layers(model: nnx.Module, layers=None) -> dict[str, tuple[int, int]]:
    """``{layer name: (d_in, d_out)}`` of the layers to cluster on.

    Args:
      model: an ``nnx.Module``.
      layers: layer paths (tuples or names joined by ``"/"``) of ``nnx.Linear``/``nnx.Conv``
        layers; ``None``: every such layer of the model.

    Raises:
      ValueError: naming ``layers``, for a path that is not a Dense/Conv layer of the model,
        or when the model has no such layer.
    """
    shapes = {layer_name(path): shape for path, shape in direction_shapes(model).items()}
    if not shapes:
        raise ValueError(
            "`model` has no nnx.Linear/nnx.Conv layer; gradient clustering needs at least one."
        )
    if layers is None:
        return shapes
    chosen = {}
    for path in layers:
        name = layer_name(path)
        if name not in shapes:
            raise ValueError(
                f"`layers` names {name!r}, which is not an nnx.Linear/nnx.Conv layer of the "
                f"model; layers: {sorted(shapes)}."
            )
        chosen[name] = shapes[name]
    if not chosen:
        raise ValueError("`layers` must name at least one layer.")
    return chosen


def zero_directions(shapes: dict, num_clusters: int) -> dict:
    """``{layer name: (zeros (K, d_in), zeros (K, d_out))}``: directions that only make
    :func:`jaxeff.pergrad.per_example_stats` return the layers' factors."""
    return {
        name: (jnp.zeros((num_clusters, d_in)), jnp.zeros((num_clusters, d_out)))
        for name, (d_in, d_out) in shapes.items()
    }


def _check_num_clusters(num_clusters) -> None:
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"`num_clusters` must be a positive integer, got {num_clusters!r}.")


def _factors(stats, names) -> dict:
    """``{name: (ā (B, d_in), s (B, d_out))}`` for ``names``, from ``stats.factors``."""
    found = {layer_name(path): pair for path, pair in (stats.factors or {}).items()}
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(
            f"`stats` has no factors for layers {missing}: compute them with "
            "jaxeff.pergrad.per_example_stats(..., directions=state.centres) (every clustered "
            "layer must take the fast path; see stats.paths and stats.reasons)."
        )
    return {name: found[name] for name in names}


def _layer_dots(stats, names) -> dict:
    found = {layer_name(path): dots for path, dots in (stats.layer_dots or {}).items()}
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(
            f"`stats` has no inner products for layers {missing}: compute them with "
            "directions=state.centres."
        )
    return {name: found[name] for name in names}


def _layer_sq_norms(stats, names) -> tuple[dict, dict]:
    """``({name: (B,) ||g_{i,L}||² of kernel and bias}, {name: has bias})``."""
    sq, bias = {}, {}
    for path, value in nnx.to_flat_state(stats.sq_norms):
        *layer, leaf = path
        name = layer_name(tuple(layer))
        if name in names:
            value = value.get_value() if hasattr(value, "get_value") else value
            sq[name] = sq.get(name, 0.0) + value
            bias[name] = bias.get(name, False) or leaf == "bias"
    return sq, bias


def _seed_distances(factors, has_bias, row):
    """``(B,)`` ``||g̃_i − g̃_row||²`` between the rank-1 factor gradients ``g̃_i = ā_i s_iᵀ``
    (and bias ``s_i``), summed over layers; exact for Dense layers on ``(B, d)`` inputs."""
    total = 0.0
    for name, (a, s) in factors.items():
        a_dots, s_dots = a @ a[row], s @ s[row]
        a_sq, s_sq = jnp.sum(a * a, axis=1), jnp.sum(s * s, axis=1)
        total = total + a_sq * s_sq + a_sq[row] * s_sq[row] - 2.0 * a_dots * s_dots
        if has_bias[name]:
            total = total + s_sq + s_sq[row] - 2.0 * s_dots
    return jnp.maximum(total, 0.0)


def init_from_stats(stats, *, num_clusters: int, key: jax.Array, layers) -> ClusterState:
    r"""``K`` centres at ``K`` distinct examples of a batch, chosen by D² seeding.

    Centre ``k`` is example ``i_k``'s factors, ``v_k = ā_{i_k}``, ``u_k = s_{i_k}``
    (``stats.factors``: the mean layer input over positions and the backprop signal summed
    over positions, the bias gradient); for a Dense layer ``ā_i s_iᵀ`` is example ``i``'s
    kernel gradient, so each centre starts on a real example's gradient. The first example
    is uniform; for each next one, ``2 + ⌊ln K⌋`` candidates are drawn with probability
    proportional to their squared distance to the nearest centre so far, and the one that
    lowers the total of those distances most is kept (greedy k-means++: Arthur &
    Vassilvitskii, "k-means++: The Advantages of Careful Seeding", SODA 2007), distances
    measured between the rank-1 gradients ``ā_i s_iᵀ``. Groups of identical examples thus
    each get a centre before any gets two.
    Sizes start equal, ``B / K`` each. Pure and jittable.

    Args:
      stats: :class:`jaxeff.pergrad.PerExampleStats` of a batch of ``B >= K`` examples with
        factors for ``layers`` (e.g. computed with :func:`zero_directions`).
      num_clusters: ``K`` (static).
      key: PRNG key choosing the examples.
      layers: the layer names to cluster on (:func:`cluster_layers`).

    Returns:
      A :class:`ClusterState` with ``count = 0``.
    """
    _check_num_clusters(num_clusters)
    names = list(layers)
    factors = {
        name: tuple(gather_explicit(x.astype(jnp.float32)) for x in pair)
        for name, pair in _factors(stats, names).items()
    }
    _, has_bias = _layer_sq_norms(stats, names)
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
        closer = jax.vmap(
            lambda row: jnp.minimum(nearest, _seed_distances(factors, has_bias, row))
        )(rows)
        best = jnp.argmin(jnp.sum(closer, axis=1))
        row = rows[best]
        return chosen.at[k].set(row), taken.at[row].set(True), closer[best]

    nearest = _seed_distances(factors, has_bias, first)
    chosen, _, _ = jax.lax.fori_loop(1, num_clusters, pick, (chosen, taken, nearest))
    centres = {
        name: (jnp.take(a, chosen, axis=0), jnp.take(s, chosen, axis=0))
        for name, (a, s) in factors.items()
    }
    sizes = jnp.full((num_clusters,), batch / num_clusters, jnp.float32)
    return ClusterState(centres, sizes, jnp.zeros((), jnp.int32))


def distances(state: ClusterState, stats) -> jax.Array:
    r"""``(B, K)`` squared distances ``d_{ik} = Σ_L ||g_{i,L} − C_{k,L}||²`` (module docstring).

    Computed from ``stats.sq_norms`` and ``stats.layer_dots`` (which must be computed with
    ``directions=state.centres``) in ``O(B K)`` per layer; clipped at 0 against rounding.
    """
    names = list(state.centres)
    sq, has_bias = _layer_sq_norms(stats, names)
    dots = _layer_dots(stats, names)
    total = 0.0
    for name, (v, u) in state.centres.items():
        u_sq = jnp.sum(jnp.square(u), axis=1)
        centre_sq = jnp.sum(jnp.square(v), axis=1) * u_sq + (u_sq if has_bias[name] else 0.0)
        total = total + sq[name][:, None] - 2.0 * dots[name].T + centre_sq[None, :]
    return jnp.maximum(total, 0.0)


class AssignmentCounts(NamedTuple):
    """Examples assigned so far in a pass: ``counts`` ``(K,)`` and their total ``seen``."""

    counts: jax.Array
    seen: jax.Array


def size_weighted_argmin(
    dist: jax.Array, sizes: jax.Array, *, mask=None, so_far: AssignmentCounts | None = None
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
        counts = counts + jnp.where(ok, jax.nn.one_hot(choice, k, dtype=jnp.float32), 0.0)
        return AssignmentCounts(counts, seen + ok.astype(jnp.float32)), choice

    so_far, assignments = jax.lax.scan(step, so_far, (dist, valid))
    return assignments, so_far


def assign(
    state: ClusterState, stats, *, size_weighted: bool = True, mask=None
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
    dist = distances(state, stats)
    if not size_weighted:
        return jnp.argmin(dist, axis=1).astype(jnp.int32), dist
    assignments, _ = size_weighted_argmin(dist, state.sizes, mask=mask)
    return assignments, dist
