r"""The four training samplers: what each draws at step ``t``, and what it refreshes.

Every sampler gives the step a :class:`jaxeff.gvar.Sample` of ``b`` indices and weights
with

.. math::

   \mathbb{E}\Big[\sum_{j=1}^{b} w_j\, g_{i_j}\Big] = \frac{1}{N} \sum_{i=1}^{N} g_i ,

so every run descends the same objective, the mean loss over the training set:

* ``uniform`` / ``uniform_2b``: rows of a seeded permutation per epoch (random
  reshuffling, the usual baseline), ``b`` or ``2b`` of them, weights ``1/b``;
  ``uniform_iid``: ``b`` independent uniform draws (with replacement, as GC's draws within
  a cluster), weights ``1/b``;
* ``gc``: stratified over gradient clusters. Every ``refresh_every`` steps the training
  set is clustered at the current parameters (:func:`jaxeff.clustering.clustering_pass`,
  from the previous centres); cluster ``k`` of size ``N_k`` gets ``n_k`` slots
  (:func:`jaxeff.clustering.slots_per_cluster`), each weighted ``N_k/(N n_k)``
  (:func:`jaxeff.clustering.stratified_weights`); the slots walk through a shuffled copy of
  each cluster step after step (random reshuffling within the clusters, as uniform's
  epochs; ``gc.replace``: independent draws instead). The clustering is stale between
  refreshes; the weights keep the estimate
  unbiased for any partition, so staleness costs variance, never bias;
* ``importance``: ``p_i`` proportional to each example's gradient norm at the last refresh
  (:func:`jaxeff.clustering.example_scores`), mixed with ``smoothing`` of uniform, weights
  ``1/(N b p_i)`` (:func:`jaxeff.clustering.importance_sample`): unbiased because every
  ``p_i > 0``.

The draws run inside the jitted training scan (``draw(state, x)``, ``x`` the per-step
input from :meth:`inputs`). GC draws from a :class:`StratifiedTable` built once per
clustering: the slots, their weights and the members sorted by cluster do not change
between clusterings, so a draw is ``b`` gathers, ``O(b)``, where
:func:`jaxeff.clustering.stratified_sample` sorts the ``N`` assignments at every call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.gvar.train import EpochBatches
from jaxeff import clustering, gvar

__all__ = [
    "SAMPLERS",
    "GCSampler",
    "IIDSampler",
    "ImportanceSampler",
    "StratifiedTable",
    "UniformSampler",
    "batch_size_of",
    "make_sampler",
    "stratified_table",
]

#: The samplers a study may compare, in table order; "uniform" is the reference.
#: ``uniform_iid`` (independent uniform draws, with replacement) is a diagnostic, not in
#: the default study: it separates what GC's draws with replacement cost from what its
#: stratification gains.
SAMPLERS = ("uniform", "uniform_2b", "uniform_iid", "gc", "importance")


def batch_size_of(name: str, batch_size: int) -> int:
    """Examples per step: twice ``batch_size`` for ``uniform_2b``."""
    return 2 * batch_size if name == "uniform_2b" else batch_size


# -- uniform: seeded epochs (experiments.gvar.train.EpochBatches) --------------------------


@dataclasses.dataclass(frozen=True)
class UniformDraw:
    """``x`` is the step's row indices; weights ``1/b``."""

    batch_size: int

    def __call__(self, state: Any, x: jax.Array) -> gvar.Sample:
        del state
        return gvar.Sample(x, jnp.full((self.batch_size,), 1.0 / self.batch_size, jnp.float32))


class UniformSampler:
    """Seeded epochs of ``batch_size`` rows; nothing to refresh."""

    refreshes = False

    def __init__(self, size: int, *, batch_size: int, seed: int):
        self.order = EpochBatches(size, batch_size, seed)
        self.draw = UniformDraw(batch_size)
        self.state = ()

    def inputs(self, start: int, num_steps: int) -> np.ndarray:
        return np.stack([self.order.indices(t) for t in range(start, start + num_steps)])


@dataclasses.dataclass(frozen=True)
class IIDDraw:
    """``x`` is the step; ``b`` independent uniform draws, weights ``1/b``."""

    batch_size: int
    size: int

    def __call__(self, state: jax.Array, x: jax.Array) -> gvar.Sample:
        indices = jax.random.randint(jax.random.fold_in(state, x), (self.batch_size,), 0, self.size)
        return gvar.Sample(
            indices, jnp.full((self.batch_size,), 1.0 / self.batch_size, jnp.float32)
        )


class IIDSampler:
    """Independent uniform draws; nothing to refresh."""

    refreshes = False

    def __init__(self, size: int, *, batch_size: int, seed: int):
        self.draw = IIDDraw(batch_size, size)
        self.state = jax.random.key(seed)

    def inputs(self, start: int, num_steps: int) -> np.ndarray:
        return np.arange(start, start + num_steps, dtype=np.int32)


# -- gc: stratified over gradient clusters ---------------------------------------------------
class StratifiedTable(NamedTuple):
    """One clustering's stratified slots. Cluster ``k``'s members are
    ``order[start_k : start_k + N_k]``, in a random order; slot ``j`` belongs to the cluster
    ``k`` starting at ``slot_start[j]``, is the ``slot_rank[j]``-th of its ``n_k`` slots and
    weighs ``weights[j] = N_k/(N n_k)``."""

    order: jax.Array  # (N,) example indices grouped by cluster, shuffled within each
    slot_start: jax.Array  # (b,) int32
    slot_size: jax.Array  # (b,) int32, N_k of the slot's cluster
    slot_rank: jax.Array  # (b,) int32, in [0, n_k)
    slot_draws: jax.Array  # (b,) int32, n_k
    weights: jax.Array  # (b,) float32


def stratified_table(
    assignments: np.ndarray,
    *,
    num_clusters: int,
    batch_size: int,
    allocation: str,
    rng: np.random.Generator,
) -> StratifiedTable:
    """The :class:`StratifiedTable` of ``assignments``: ``n_k`` slots per cluster from
    :func:`jaxeff.clustering.slots_per_cluster`, weights from
    :func:`jaxeff.clustering.stratified_weights`, each cluster's members shuffled by
    ``rng``. Needs ``b`` at least the number of non-empty clusters
    (``config.batch_size >= config.gc.num_clusters`` ensures it)."""
    assignments = np.asarray(assignments, np.int32)
    slots = np.asarray(
        clustering.slots_per_cluster(
            assignments, num_clusters=num_clusters, batch_size=batch_size, allocation=allocation
        )
    )
    if slots.sum() != batch_size:
        raise ValueError(
            f"{np.count_nonzero(np.bincount(assignments))} non-empty clusters do not fit a "
            f"batch of {batch_size}; config.batch_size must be >= config.gc.num_clusters."
        )
    order = np.lexsort((rng.random(len(assignments)), assignments)).astype(np.int32)
    sizes = np.bincount(assignments, minlength=num_clusters)
    starts = np.cumsum(sizes) - sizes
    slot_cluster = np.repeat(np.arange(num_clusters), slots)
    slot_rank = np.arange(batch_size) - (np.cumsum(slots) - slots)[slot_cluster]
    first_members = order[starts[slot_cluster]]  # one member per slot: its cluster's n_k
    weights = clustering.stratified_weights(assignments, first_members, num_clusters=num_clusters)
    return StratifiedTable(
        *(
            jnp.asarray(a, jnp.int32)
            for a in (order, starts[slot_cluster], sizes[slot_cluster], slot_rank)
        ),
        jnp.asarray(slots[slot_cluster], jnp.int32),
        jnp.asarray(weights, jnp.float32),
    )


@dataclasses.dataclass(frozen=True)
class GCDraw:
    """``x`` is the step. ``replace=False``: at step ``t`` slot ``j`` takes position
    ``(rank_j + t n_k) mod N_k`` of its cluster's shuffled members, so the slots walk
    through each cluster without replacement, step after step (random reshuffling within
    the clusters; each position holds a uniform member, so every step is unbiased).
    ``replace=True``: each slot an independent uniform member of its cluster."""

    batch_size: int
    replace: bool

    def __call__(self, state: tuple[StratifiedTable, jax.Array], x: jax.Array) -> gvar.Sample:
        table, key = state
        if self.replace:
            positions = jax.random.randint(
                jax.random.fold_in(key, x), (self.batch_size,), 0, table.slot_size
            )
        else:
            positions = (table.slot_rank + x * table.slot_draws) % table.slot_size
        return gvar.Sample(table.order[table.slot_start + positions], table.weights)


class GCSampler:
    """Re-clusters at :meth:`refresh`: ``gc.num_passes`` batch-mode passes over the training
    set at the current parameters (:func:`jaxeff.clustering.clustering_pass`), from the
    previous centres (the first time from ``K`` seeds, :func:`jaxeff.clustering.init_clusters`);
    the batches stratify over the last pass's assignments."""

    refreshes = True

    def __init__(self, loss_fn, data, *, batch_size: int, seed: int, options, chunks):
        self.loss_fn, self.data, self.options, self.chunks = loss_fn, data, options, chunks
        self.batch_size = batch_size
        self.seed, self.key = seed, jax.random.key(seed)
        self.draw = GCDraw(batch_size, bool(options.gc.replace))
        self.clusters = None
        self.state = None
        self.count = 0  # refreshes so far: each shuffles the clusters with its own seed

    def refresh(self, params) -> dict:
        gc = self.options.gc
        if self.clusters is None:
            count = max(len(self.chunks[0]["mask"]), gc.num_clusters)
            rows = jax.random.permutation(self.key, gvar.num_examples(self.data))[:count]
            seeds = jax.tree.map(lambda x: x[rows], self.data)  # the seeds are drawn from these
            self.clusters = clustering.init_clusters(
                self.loss_fn, params, seeds, num_clusters=gc.num_clusters, key=self.key
            )
        for _ in range(gc.num_passes):
            self.clusters, assignments = clustering.clustering_pass(
                self.loss_fn, params, self.chunks, self.clusters, min_fraction=gc.min_fraction
            )
        table = stratified_table(
            assignments,
            num_clusters=gc.num_clusters,
            batch_size=self.batch_size,
            allocation=gc.allocation,
            rng=np.random.default_rng([self.seed, self.count]),
        )
        self.count += 1
        self.state = jax.block_until_ready((table, self.key))
        return {"cluster_sizes": np.bincount(assignments, minlength=gc.num_clusters).tolist()}

    def inputs(self, start: int, num_steps: int) -> np.ndarray:
        return np.arange(start, start + num_steps, dtype=np.int32)


# -- importance: p_i ∝ ||g_i|| -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImportanceDraw:
    """``x`` is the step; ``b`` draws ``p_i ∝`` score, mixed with ``smoothing`` of uniform."""

    batch_size: int
    smoothing: float

    def __call__(self, state: tuple[jax.Array, jax.Array], x: jax.Array) -> gvar.Sample:
        scores, key = state
        return clustering.importance_sample(
            jax.random.fold_in(key, x),
            scores,
            batch_size=self.batch_size,
            smoothing=self.smoothing,
        )


class ImportanceSampler:
    """Re-scores every example at :meth:`refresh` (one pass of per-example norms)."""

    refreshes = True

    def __init__(self, loss_fn, data, *, batch_size: int, seed: int, options):
        self.loss_fn, self.data, self.options = loss_fn, data, options
        self.key = jax.random.key(seed)
        self.draw = ImportanceDraw(batch_size, float(options.importance.smoothing))
        self.state = None

    def refresh(self, params) -> dict:
        scores = clustering.example_scores(
            self.loss_fn,
            params,
            self.data,
            score=self.options.importance.score,
            chunk_size=self.options.chunk_size,
        )
        self.state = jax.block_until_ready((scores, self.key))
        return {}

    def inputs(self, start: int, num_steps: int) -> np.ndarray:
        return np.arange(start, start + num_steps, dtype=np.int32)


def make_sampler(name: str, loss_fn, data, *, config, seed: int, chunks=None):
    """The sampler ``name`` of :data:`SAMPLERS` over the device-resident ``data``; ``chunks``
    (GC) are its rows in ``config.chunk_size`` pieces, dicts with a boolean ``"mask"`` of the
    padding (:func:`experiments.sampling_speed.train.chunk_list`)."""
    size = gvar.num_examples(data)
    batch_size = batch_size_of(name, config.batch_size)
    if name in ("uniform", "uniform_2b"):
        return UniformSampler(size, batch_size=batch_size, seed=seed)
    if name == "uniform_iid":
        return IIDSampler(size, batch_size=batch_size, seed=seed)
    if name == "gc":
        return GCSampler(
            loss_fn, data, batch_size=batch_size, seed=seed, options=config, chunks=chunks
        )
    return ImportanceSampler(loss_fn, data, batch_size=batch_size, seed=seed, options=config)
