r"""Unbiased weighted mini-batches from gradient clusters or per-example scores (JAX).

Every sampler here returns a :class:`jaxeff.gvar.Sample` of indices ``i_j`` and weights
``w_j`` such that, for any per-example vectors ``x_i`` (gradients),

.. math::

   \mathbb{E}\Big[\sum_{j=1}^{b} w_j\, x_{i_j}\Big] = \frac{1}{N} \sum_{i=1}^{N} x_i .

* Stratified sampling over clusters (:func:`stratified_sample`): cluster ``k`` of size
  ``N_k`` gets ``n_k`` of the ``b`` slots and each slot from it weighs
  ``N_k / (N n_k)`` (:func:`stratified_weights`); its exact variance is
  :func:`stratified_variance`, zero when every cluster holds identical vectors.
* Importance sampling (:func:`importance_sample`): ``b`` independent draws with
  probabilities ``p_i`` (:func:`importance_probabilities`) weighted ``1 / (N b p_i)``; its
  exact variance is :func:`importance_variance`.

All functions are pure and jit-compatible; integers and options that fix shapes
(``num_clusters``, ``batch_size``, ``allocation``, ``replace``, ``smoothing``) are
keyword-only static arguments. Concrete inputs are checked and bad ones raise; *traced*
inputs cannot be checked at trace time, so a traced input that would make the estimate
meaningless (a cluster id outside ``[0, K)``, a negative or non-finite score) gives NaN
weights, which the training step's finiteness guard catches, instead of a plausible
number. With :func:`jaxeff.gvar.sampling_estimator` they become gradient estimators::

  est = gvar.sampling_estimator(
      loss_fn,
      lambda assignments, key, size: stratified_sample(
          key, assignments, num_clusters=10, batch_size=32),
      init_fn=lambda params, data: assignments)

The host-side samplers for input pipelines are in :mod:`jaxeff.clustering.samplers`; they
share the allocation and weight formulas defined here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxeff._checks import check_number
from jaxeff.gvar import Sample

__all__ = [
    "ALLOCATIONS",
    "importance_probabilities",
    "importance_sample",
    "importance_variance",
    "slots_per_cluster",
    "stratified_sample",
    "stratified_variance",
    "stratified_weights",
]

#: How the ``b`` slots of a stratified batch are shared among the non-empty clusters.
ALLOCATIONS = ("equal", "proportional")


# -- checks ----------------------------------------------------------------------------
def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_allocation(allocation: Any) -> None:
    if allocation not in ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {ALLOCATIONS}, got {allocation!r}.")


def _check_smoothing(smoothing: Any) -> float:
    """``smoothing`` as a Python float in ``[0, 1]`` (it is a static argument)."""
    return float(check_number(smoothing, "smoothing", at_least=0, at_most=1, static=True))


def _check_assignments(
    assignments: ArrayLike, num_clusters: int, name: str = "assignments"
) -> jax.Array:
    """Shape and dtype always; values when concrete. Returns a jnp int32 array."""
    shape, dtype = jnp.shape(assignments), jnp.result_type(assignments)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"`{name}` must have shape (N,) with N >= 1, got shape {shape}.")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"`{name}` must hold integer cluster ids, got dtype {dtype}.")
    if _is_concrete(assignments):
        values = np.asarray(assignments)
        if values.min() < 0 or values.max() >= num_clusters:
            raise ValueError(
                f"`{name}` must hold cluster ids in [0, num_clusters={num_clusters}), got "
                f"values in [{values.min()}, {values.max()}]."
            )
    return jnp.asarray(assignments, jnp.int32)


def _check_scores(scores: ArrayLike, name: str = "scores") -> jax.Array:
    """Shape and dtype always; values (finite, non-negative) when concrete."""
    shape, dtype = jnp.shape(scores), jnp.result_type(scores)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(f"`{name}` must have shape (N,) with N >= 1, got shape {shape}.")
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {dtype}.")
    if _is_concrete(scores):
        values = np.asarray(scores, np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"`{name}` must be finite; found NaN or inf.")
        if values.min() < 0:
            raise ValueError(f"`{name}` must be non-negative, got minimum {values.min()}.")
    return jnp.asarray(scores, jnp.float32)


def _check_vectors(x: ArrayLike, size: int, name: str = "x") -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] != size:
        raise ValueError(f"`{name}` must have N={size} rows (one per example), got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x.reshape(size, -1)


_ROUNDING_OFFSET = (5**0.5 - 1) / 2  # φ - 1: badly approximable by fractions


# -- formulas shared with the host samplers (numpy or jax.numpy through `xp`) -----------
def _stratum_weight(cluster_size, draws, num_examples):
    r"""``N_k / (N n_k)``: the weight of one of the ``n_k`` draws from cluster ``k``."""
    return cluster_size / (num_examples * draws)


def _allocate(sizes, batch_size: int, allocation: str, xp):
    """Slots per cluster ``n_k`` (sum ``b``) for ``b >= K'``, the number of non-empty clusters.

    "equal": ``b // K'`` each and one more for the first ``b % K'`` non-empty clusters.
    "proportional": one slot each; the other ``b - K'`` in proportion to each cluster's
    excess ``max(b N_k / N - 1, 0)``, by cumulative rounding (each within one slot of its
    share, summing to ``b - K'`` exactly). Empty clusters get none. Meaningless (but finite)
    when ``b < K'``.

    The rounding threshold is the fractional part ``1 - φ`` of the golden ratio rather than
    an integer: shares are often simple fractions, which land exactly on integers or
    halves, where float32 (JAX) and float64 (host) arithmetic could round differently;
    a simple fraction is never close to ``1 - φ``, so both give the same slots.
    """
    nonempty = sizes > 0
    count = xp.sum(nonempty)
    if allocation == "equal":
        rank = xp.cumsum(nonempty) - 1
        safe = xp.maximum(count, 1)
        slots = batch_size // safe + (rank < batch_size % safe)
        return xp.where(nonempty, slots, 0).astype(sizes.dtype)
    spare = xp.maximum(batch_size - count, 0)
    excess = xp.maximum(batch_size * (sizes / xp.sum(sizes)) - 1.0, 0.0)
    cumulative = xp.cumsum(excess)
    total = cumulative[-1]
    shares = xp.floor(spare * (cumulative / xp.maximum(total, 1e-30)) + _ROUNDING_OFFSET)
    shares = xp.where(cumulative == total, spare, xp.minimum(shares, spare)).astype(sizes.dtype)
    extra = xp.diff(shares, prepend=xp.zeros((1,), sizes.dtype))
    return (extra + nonempty).astype(sizes.dtype)


def _importance_probability(score, total, num_examples, smoothing):
    r"""``p_i = (1 - λ) s_i / Σ s + λ / N``; uniform ``1/N`` when all scores are zero."""
    safe_total = total + (total == 0)
    mixed = (1.0 - smoothing) * score / safe_total + smoothing / num_examples
    return mixed * (total > 0) + (total == 0) / num_examples


# -- stratified sampling ---------------------------------------------------------------
def slots_per_cluster(
    assignments: ArrayLike, *, num_clusters: int, batch_size: int, allocation: str = "equal"
) -> jax.Array:
    r"""How many of the ``b`` slots each cluster gets: ``n_k``, ``Σ_k n_k = b``.

    With ``K'`` non-empty clusters and ``b >= K'``:

    .. math::

       \text{equal: } n_k \in \{\lfloor b/K' \rfloor, \lceil b/K' \rceil\}, \qquad
       \text{proportional: } n_k = 1 + m_k, \quad
       m_k \approx (b - K') \frac{e_k}{\sum_l e_l}, \quad e_k = \max(b N_k / N - 1, 0),

    (``m_k`` rounded so that ``Σ_k m_k = b - K'``, each within one of its share) and
    ``n_k = 0`` for empty clusters. So proportional gives ``n_k = b N_k / N`` up to
    rounding when every cluster has ``b N_k / N >= 1``; a smaller cluster still gets one
    slot, taken from the larger ones in proportion to their excess. With ``b < K'`` (fewer
    slots than non-empty clusters) the batch cannot hold every cluster:
    :func:`stratified_sample` gives one slot to each of ``b`` clusters drawn at random,
    and this returns zeros.

    Args:
      assignments: ``(N,)`` integer cluster ids in ``[0, K)``.
      num_clusters: ``K`` (static).
      batch_size: ``b`` (static).
      allocation: ``"equal"`` or ``"proportional"``.

    Returns:
      ``(K,)`` int32 ``n_k``.

    Example::

      slots_per_cluster(jnp.array([0, 0, 0, 1]), num_clusters=3, batch_size=4,
                        allocation="proportional")   # [3, 1, 0]
    """
    _check_positive_int(num_clusters, "num_clusters")
    _check_positive_int(batch_size, "batch_size")
    _check_allocation(allocation)
    assignments = _check_assignments(assignments, num_clusters)
    sizes = jnp.zeros((num_clusters,), jnp.int32).at[assignments].add(1, mode="drop")
    slots = _allocate(sizes, batch_size, allocation, jnp)
    return jnp.where(jnp.sum(sizes > 0) > batch_size, 0, slots)


def stratified_weights(
    assignments: ArrayLike, indices: ArrayLike, *, num_clusters: int
) -> jax.Array:
    r"""Weights ``N_k / (N n_k)`` of a stratified sample, ``n_k`` counted in ``indices``.

    .. math::

       w_j = \frac{N_{k(i_j)}}{N\, n_{k(i_j)}}, \qquad
       n_k = \#\{j : k(i_j) = k\},

    the weights that make ``Σ_j w_j x_{i_j}`` unbiased for the mean of ``x`` when the
    ``n_k`` draws from each cluster are uniform within it and every non-empty cluster is
    drawn (Faghri et al. 2020, §3).

    Args:
      assignments: ``(N,)`` integer cluster ids in ``[0, K)``.
      indices: ``(b,)`` integer indices into the dataset.
      num_clusters: ``K`` (static).

    Returns:
      ``(b,)`` float32 weights.

    Example::

      stratified_weights(jnp.array([0, 0, 0, 1]), jnp.array([0, 3]), num_clusters=2)
      # [0.75, 0.25]

    References:
      Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
      https://arxiv.org/abs/2007.04532.
    """
    _check_positive_int(num_clusters, "num_clusters")
    assignments = _check_assignments(assignments, num_clusters)
    size = assignments.shape[0]
    indices = jnp.asarray(indices)
    if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(
            f"`indices` must be a (b,) integer array, got {indices.dtype}{indices.shape}."
        )
    if _is_concrete(indices) and indices.size and (indices.min() < 0 or indices.max() >= size):
        raise ValueError(
            f"`indices` must lie in [0, N={size}), got [{indices.min()}, {indices.max()}]."
        )
    sizes = jnp.zeros((num_clusters,), jnp.int32).at[assignments].add(1, mode="drop")
    clusters = assignments[indices]
    draws = jnp.zeros((num_clusters,), jnp.int32).at[clusters].add(1, mode="drop")
    return _stratum_weight(sizes[clusters], draws[clusters], size).astype(jnp.float32)


def stratified_sample(
    key: jax.Array,
    assignments: ArrayLike,
    *,
    num_clusters: int,
    batch_size: int,
    allocation: str = "equal",
    replace: bool = True,
) -> Sample:
    r"""A stratified mini-batch: ``n_k`` uniform draws from each cluster, weighted ``N_k/(N n_k)``.

    .. math::

       \hat g = \sum_{k: N_k > 0} \frac{N_k}{N\, n_k} \sum_{j=1}^{n_k} g_{i_{kj}}, \qquad
       i_{kj} \sim U(\text{cluster } k), \qquad \mathbb{E}[\hat g] = \frac1N \sum_i g_i,

    with ``n_k`` from :func:`slots_per_cluster`. Its variance (:func:`stratified_variance`)
    is ``Σ_k (N_k/N)² σ_k² / n_k``: only the spread *within* clusters counts, so clusters of
    similar gradients give a low-variance estimator (gradient clustering, Faghri et al.
    2020).

    * ``replace=True``: the ``n_k`` draws are independent.
    * ``replace=False``: cluster ``k``'s slots take a random permutation of its members in
      turn, cycling when ``n_k > N_k``, so every member is drawn ``⌊n_k/N_k⌋`` or
      ``⌈n_k/N_k⌉`` times and ``E[count_i] = n_k / N_k``: still unbiased, and lower variance.
    * Fewer slots than non-empty clusters (``b < K'``, known only from the values of
      ``assignments``, so not an error under jit): ``b`` distinct non-empty clusters are
      drawn uniformly, one member from each, weighted ``N_k K' / (N b)``: unbiased since
      each cluster is drawn with probability ``b / K'``, but no longer stratified over all
      clusters.

    Slots come grouped by cluster in increasing cluster order. Jittable; ``O(N log N)``
    (a sort of the assignments) per call.

    Args:
      key: a PRNG key.
      assignments: ``(N,)`` integer cluster ids in ``[0, K)``. Concrete values are
        checked; traced out-of-range values give NaN weights.
      num_clusters: ``K`` (static).
      batch_size: ``b`` (static).
      allocation: ``"equal"`` or ``"proportional"`` (see :func:`slots_per_cluster`).
      replace: draw with replacement within each cluster, or cycle a random permutation.

    Returns:
      A :class:`jaxeff.gvar.Sample` of ``(b,)`` int32 indices and float32 weights.

    Example::

      assignments = jnp.array([0, 0, 0, 1, 1, 2])
      sample = stratified_sample(jax.random.key(0), assignments, num_clusters=3,
                                 batch_size=3)       # one example from each cluster
      # sample.weights == [3/6, 2/6, 1/6]

    References:
      Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
      https://arxiv.org/abs/2007.04532.
    """
    _check_positive_int(num_clusters, "num_clusters")
    _check_positive_int(batch_size, "batch_size")
    _check_allocation(allocation)
    if not isinstance(replace, bool):
        raise TypeError(f"`replace` must be a bool, got {replace!r}.")
    assignments = _check_assignments(assignments, num_clusters)
    return _stratified_sample(
        key,
        assignments,
        num_clusters=int(num_clusters),
        batch_size=int(batch_size),
        allocation=allocation,
        replace=replace,
    )


@functools.partial(jax.jit, static_argnames=("num_clusters", "batch_size", "allocation", "replace"))
def _stratified_sample(key, assignments, *, num_clusters, batch_size, allocation, replace):
    size = assignments.shape[0]
    valid = jnp.all((assignments >= 0) & (assignments < num_clusters))
    key_members, key_clusters = jax.random.split(key)

    # -- clusters and their slots --------------------------------------------------------
    sizes = jnp.zeros((num_clusters,), jnp.int32).at[assignments].add(1, mode="drop")
    num_nonempty = jnp.sum(sizes > 0)
    slots = _allocate(sizes, batch_size, allocation, jnp)
    ends = jnp.cumsum(slots)
    positions = jnp.arange(batch_size)
    slot_cluster = jnp.searchsorted(ends, positions, side="right").astype(jnp.int32)
    slot_cluster = jnp.minimum(slot_cluster, num_clusters - 1)
    slot_rank = positions - (ends - slots)[slot_cluster]
    slot_draws = slots[slot_cluster]
    inclusion = jnp.ones((), jnp.float32)  # probability that a slot's cluster is drawn
    if batch_size < num_clusters:  # b < K' is possible: draw b clusters, one slot each
        fallback = num_nonempty > batch_size
        keys = jnp.where(sizes > 0, jax.random.uniform(key_clusters, (num_clusters,)), 2.0)
        drawn = jnp.argsort(keys)[:batch_size].astype(jnp.int32)
        slot_cluster = jnp.where(fallback, drawn, slot_cluster)
        slot_rank = jnp.where(fallback, 0, slot_rank)
        slot_draws = jnp.where(fallback, 1, slot_draws)
        inclusion = jnp.where(fallback, batch_size / num_nonempty, 1.0)

    # -- members: uniform within each cluster -----------------------------------------------
    starts = jnp.cumsum(sizes) - sizes
    slot_size = sizes[slot_cluster]
    if replace:
        order = jnp.argsort(assignments, stable=True)
        offset = jax.random.randint(key_members, (batch_size,), 0, jnp.maximum(slot_size, 1))
    else:  # a random permutation within each cluster, cycled
        ties = jax.random.uniform(key_members, (size,))
        order = jnp.lexsort((ties, assignments))
        offset = slot_rank % jnp.maximum(slot_size, 1)
    indices = order[starts[slot_cluster] + offset].astype(jnp.int32)
    weights = _stratum_weight(slot_size, slot_draws, size) / inclusion
    weights = jnp.where(valid, weights, jnp.nan).astype(jnp.float32)
    return Sample(indices, weights)


def stratified_variance(
    x: ArrayLike,
    assignments: ArrayLike,
    *,
    num_clusters: int,
    batch_size: int,
    allocation: str = "equal",
    replace: bool = True,
) -> jax.Array:
    r"""Exact variance of :func:`stratified_sample`'s estimate ``Σ_j w_j x_{i_j}``.

    Summed over coordinates (the trace of the covariance). With ``σ_k²`` the within-cluster
    variance ``(1/N_k) Σ_{i∈k} ||x_i - μ_k||²`` and ``n_k`` from :func:`slots_per_cluster`:

    .. math::

       V = \sum_k \Big(\frac{N_k}{N}\Big)^2 \frac{\sigma_k^2}{n_k}
       \quad\text{(with replacement)}, \qquad
       V = \sum_k \Big(\frac{N_k}{N n_k}\Big)^2 \frac{r_k (N_k - r_k)}{N_k - 1}\, \sigma_k^2
       \quad\text{(without; } r_k = n_k \bmod N_k),

    the second reducing to ``(N_k/N)² σ_k²/n_k · (N_k - n_k)/(N_k - 1)`` when
    ``n_k <= N_k`` (full cycles through a cluster add no variance). When ``b < K'`` (``b``
    clusters drawn out of ``K'`` non-empty ones, one member each), with
    ``a_k = (N_k/N) μ_k``:

    .. math::

       V = \frac{K'}{b} \sum_k \Big(\frac{N_k}{N}\Big)^2 \sigma_k^2
         + \Big(\frac{K'}{b}\Big)^2 \frac{b (K' - b)}{K' - 1}\,
           \frac{1}{K'} \sum_{k: N_k > 0} \lVert a_k - \bar a \rVert^2 .

    Plain SGD is the case ``K = 1``: ``σ²/b``. Zero when every cluster holds identical
    vectors (and ``b >= K'``).

    Args:
      x: ``(N, ...)`` per-example vectors (e.g. flattened per-example gradients).
      assignments: ``(N,)`` integer cluster ids in ``[0, K)``.
      num_clusters: ``K`` (static).
      batch_size: ``b`` (static).
      allocation: ``"equal"`` or ``"proportional"``.
      replace: as in :func:`stratified_sample`.

    Returns:
      A scalar, the variance summed over the coordinates of ``x``.

    Example::

      x = jax.random.normal(jax.random.key(0), (100, 5))
      a = jnp.arange(100) % 4
      stratified_variance(x, a, num_clusters=4, batch_size=8)
    """
    _check_positive_int(num_clusters, "num_clusters")
    _check_positive_int(batch_size, "batch_size")
    _check_allocation(allocation)
    assignments = _check_assignments(assignments, num_clusters)
    x = _check_vectors(x, assignments.shape[0])
    return _stratified_variance(
        x,
        assignments,
        num_clusters=int(num_clusters),
        batch_size=int(batch_size),
        allocation=allocation,
        replace=bool(replace),
    )


@functools.partial(jax.jit, static_argnames=("num_clusters", "batch_size", "allocation", "replace"))
def _stratified_variance(x, assignments, *, num_clusters, batch_size, allocation, replace):
    size = assignments.shape[0]
    sizes = jnp.zeros((num_clusters,), x.dtype).at[assignments].add(1.0, mode="drop")
    safe_sizes = jnp.maximum(sizes, 1.0)
    means = jax.ops.segment_sum(x, assignments, num_clusters) / safe_sizes[:, None]
    deviations = jnp.sum((x - means[assignments]) ** 2, axis=1)
    within = jax.ops.segment_sum(deviations, assignments, num_clusters) / safe_sizes
    fractions = sizes / size

    slots = jnp.maximum(_allocate(sizes.astype(jnp.int32), batch_size, allocation, jnp), 1)
    slots = slots.astype(x.dtype)
    if replace:
        per_cluster = fractions**2 * within / slots
    else:
        remainder = jnp.mod(slots, safe_sizes)
        correction = remainder * (sizes - remainder) / jnp.maximum(sizes - 1.0, 1.0)
        per_cluster = (fractions / slots) ** 2 * correction * within
    stratified = jnp.sum(jnp.where(sizes > 0, per_cluster, 0.0))

    num_nonempty = jnp.sum(sizes > 0).astype(x.dtype)
    if batch_size >= num_clusters:
        return stratified
    ratio = num_nonempty / batch_size
    totals = fractions[:, None] * means
    mean_total = jnp.sum(totals, axis=0) / num_nonempty
    spread = jnp.sum(jnp.where(sizes[:, None] > 0, (totals - mean_total) ** 2, 0.0))
    between = ratio**2 * batch_size * (num_nonempty - batch_size)
    between = between / jnp.maximum(num_nonempty - 1, 1) * spread / num_nonempty
    fallback = ratio * jnp.sum(fractions**2 * within) + between
    return jnp.where(num_nonempty > batch_size, fallback, stratified)


# -- importance sampling -----------------------------------------------------------------
def importance_probabilities(scores: ArrayLike, *, smoothing: float = 0.0) -> jax.Array:
    r"""Sampling probabilities proportional to scores, mixed with uniform.

    .. math::

       p_i = (1 - \lambda) \frac{s_i}{\sum_l s_l} + \frac{\lambda}{N},

    uniform ``1/N`` when every score is zero. Scores are per-example gradient norms
    (norm-proportional sampling, the variance-optimal choice for one draw) or losses.

    Args:
      scores: ``(N,)`` non-negative finite scores (concrete values checked).
      smoothing: ``λ`` in ``[0, 1]``; ``1`` is uniform sampling.

    Returns:
      ``(N,)`` float32 probabilities summing to one.

    Example::

      importance_probabilities(jnp.array([1.0, 3.0]), smoothing=0.5)   # [0.375, 0.625]
    """
    smoothing = _check_smoothing(smoothing)
    scores = _check_scores(scores)
    return _importance_probability(scores, jnp.sum(scores), scores.shape[0], smoothing)


def importance_sample(
    key: jax.Array, scores: ArrayLike, *, batch_size: int, smoothing: float = 0.0
) -> Sample:
    r"""``b`` independent draws with probabilities ``p_i``, weighted ``1 / (N b p_i)``.

    .. math::

       i_j \sim p, \qquad w_j = \frac{1}{N\, b\, p_{i_j}}, \qquad
       \mathbb{E}\Big[\sum_j w_j x_{i_j}\Big] = \frac{1}{N} \sum_{i: p_i > 0} x_i,

    with ``p`` from :func:`importance_probabilities`: unbiased whenever every example has
    ``p_i > 0`` (``λ > 0`` or all scores positive), and for scores that vanish only where
    ``x_i = 0`` (gradient norms). Variance: :func:`importance_variance`.

    Args:
      key: a PRNG key.
      scores: ``(N,)`` non-negative finite scores. Concrete values are checked; traced
        negative or non-finite scores give NaN weights.
      batch_size: ``b`` (static).
      smoothing: ``λ`` in ``[0, 1]`` (static).

    Returns:
      A :class:`jaxeff.gvar.Sample` of ``(b,)`` int32 indices and float32 weights.

    Example::

      norms = per_example_stats(...).sq_norms ** 0.5
      sample = importance_sample(key, norms, batch_size=32, smoothing=0.1)

    References:
      Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
      https://arxiv.org/abs/2007.04532 (norm- and loss-proportional sampling, compared
      with gradient clustering).
    """
    _check_positive_int(batch_size, "batch_size")
    smoothing = _check_smoothing(smoothing)
    scores = _check_scores(scores)
    return _importance_sample(key, scores, batch_size=int(batch_size), smoothing=smoothing)


@functools.partial(jax.jit, static_argnames=("batch_size", "smoothing"))
def _importance_sample(key, scores, *, batch_size, smoothing):
    size = scores.shape[0]
    valid = jnp.all(jnp.isfinite(scores) & (scores >= 0))
    probs = _importance_probability(scores, jnp.sum(scores), size, smoothing)
    probs = jnp.where(valid, probs, 1.0 / size)
    indices = jax.random.choice(key, size, (batch_size,), p=probs).astype(jnp.int32)
    weights = 1.0 / (size * batch_size * probs[indices])
    weights = jnp.where(valid, weights, jnp.nan).astype(jnp.float32)
    return Sample(indices, weights)


def importance_variance(
    x: ArrayLike, scores: ArrayLike, *, batch_size: int, smoothing: float = 0.0
) -> jax.Array:
    r"""Exact variance of :func:`importance_sample`'s estimate ``Σ_j w_j x_{i_j}``.

    Summed over coordinates; ``b`` independent draws:

    .. math::

       V = \frac{1}{b} \Big( \sum_{i: p_i > 0} \frac{\lVert x_i \rVert^2}{N^2 p_i}
           - \Big\lVert \frac{1}{N} \sum_{i: p_i > 0} x_i \Big\rVert^2 \Big),

    zero when ``p_i ∝ ||x_i||`` and all ``x_i`` point the same way; ``σ²/b`` (SGD) for
    uniform ``p``.

    Args:
      x: ``(N, ...)`` per-example vectors.
      scores: ``(N,)`` non-negative finite scores.
      batch_size: ``b`` (static).
      smoothing: ``λ`` in ``[0, 1]``.

    Returns:
      A scalar, the variance summed over the coordinates of ``x``.

    Example::

      importance_variance(x, jnp.linalg.norm(x, axis=1), batch_size=8)
    """
    _check_positive_int(batch_size, "batch_size")
    probs = importance_probabilities(scores, smoothing=smoothing)
    size = probs.shape[0]
    x = _check_vectors(x, size)
    drawn = probs > 0
    second = jnp.sum(jnp.where(drawn, jnp.sum(x**2, axis=1) / jnp.where(drawn, probs, 1.0), 0.0))
    mean = jnp.sum(jnp.where(drawn[:, None], x, 0.0), axis=0) / size
    return (second / size**2 - jnp.sum(mean**2)) / batch_size
