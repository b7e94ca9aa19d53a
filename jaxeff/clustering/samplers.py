r"""Host-side weighted samplers for input pipelines: stratified by cluster, or by score.

The training-time counterparts of :mod:`jaxeff.clustering.sampling`, in numpy, for data
that does not fit on the device: they hold only per-example cluster ids (or scores) and
an index built from them, never the data. Each sampler draws a global batch of ``b``
example indices and unbiasing weights per step ``t``,

.. math::

   \mathbb{E}\Big[\sum_{j=1}^{b} w_j\, g_{i_j}\Big] = \frac{1}{N} \sum_{i=1}^{N} g_i ,

with the allocation and weight formulas of :func:`jaxeff.clustering.stratified_sample`
and :func:`jaxeff.clustering.importance_sample`:

* :class:`StratifiedSampler` -- ``n_k`` uniform draws from each cluster, weight
  ``N_k / (N n_k)``; a draw costs ``O(b + K)`` and updating the cluster of ``m`` examples
  ``O(m)``;
* :class:`ImportanceSampler` -- draws with probability ``(1 - λ) s_i / Σ s + λ / N``,
  weight ``1 / (N b p_i)``, from a sum tree; a draw costs ``O(b log N)`` and updating
  ``m`` scores ``O(m log N)``.

Both follow the same contract:

* ``batch(t)`` is a pure function of the seed, ``t`` and the assignments (scores) in
  force when batch ``t`` is first drawn: a drawn batch is kept (the most recent ones),
  so every record of it agrees, and ``update`` acts from the next batch not yet drawn.
* ``update(values, indices=None)`` sets the values of all examples, or of ``indices``
  only (as training sees them); later repeats of an index win.
* ``get_state()`` is a small dict of numpy arrays (assignments or scores, the order the
  draws use, the seed and the next step) that checkpoints with orbax
  (:class:`jaxeff.train.Checkpointer`) bit for bit; ``set_state`` in a fresh sampler
  resumes exactly: the batches from the saved step on are those the uninterrupted
  sampler draws, given the same later updates.
* Multi-host: with ``shard_options`` (``grain.sharding.ShardOptions(p, P)``), ``batch(t)``
  is this process's rows ``[p b/P, (p+1) b/P)`` of the global batch
  (``global_batch(t)``), weights unchanged, so the union over processes is the global
  batch. Every process must make the same ``update`` calls (e.g. with values gathered
  from all processes for ``global_batch(t).indices``).
* grain: the sampler is a ``grain.samplers.Sampler``: record ``i·P + p`` of the stream
  (what ``grain.DataLoader`` of process ``p`` reads) is slot ``i mod (b/P)`` of this
  process's share of batch ``⌊i/(b/P)⌋``. A ``grain.DataLoader`` yields the records only,
  not the weights; read those from ``batch(t).weights``. Its reader threads draw batches
  ahead of the training step, so updates reach the loader's batches late: use
  :func:`weighted_batches` when the assignments change during training.

:func:`weighted_batches` reads the sampled records from any random-access source and
yields ``{**fields, "weights", "indices"}`` one step at a time.
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from jaxeff._extras import require
from jaxeff.clustering.sampling import (
    ALLOCATIONS,
    _allocate,
    _importance_probability,
    _stratum_weight,
)
from jaxeff.gvar import Sample

if TYPE_CHECKING:
    import grain
else:
    grain = require("grain", extra="data", feature="jaxeff.clustering's grain samplers")

__all__ = ["ImportanceSampler", "StratifiedSampler", "weighted_batches"]

_NO_SHARDING = grain.sharding.NoSharding()
_MAX_EXAMPLES = np.iinfo(np.int32).max
_KEPT_RECORDS = 1 << 16  # drawn batches kept: enough for grain's read-ahead buffer


# -- checks ----------------------------------------------------------------------------
def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"`seed` must be an int, got {seed!r}.")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"`seed` must be a 32-bit non-negative int, got {seed!r}.")
    return int(seed)


def _check_indices(indices: ArrayLike, num_examples: int, name: str = "indices") -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"`{name}` must be a 1-D integer array, got {indices.dtype}{indices.shape}."
        )
    if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
        raise ValueError(
            f"`{name}` must lie in [0, num_examples={num_examples}), got "
            f"[{indices.min()}, {indices.max()}]."
        )
    return indices.astype(np.int64)


def _check_assignments(
    assignments: ArrayLike, num_clusters: int, size: int, name: str = "assignments"
) -> np.ndarray:
    assignments = np.asarray(assignments)
    if assignments.shape != (size,):
        raise ValueError(f"`{name}` must have shape ({size},), got {assignments.shape}.")
    if not np.issubdtype(assignments.dtype, np.integer):
        raise TypeError(f"`{name}` must hold integer cluster ids, got {assignments.dtype}.")
    if size and (assignments.min() < 0 or assignments.max() >= num_clusters):
        raise ValueError(
            f"`{name}` must hold cluster ids in [0, num_clusters={num_clusters}), got "
            f"values in [{assignments.min()}, {assignments.max()}]."
        )
    return assignments.astype(np.int32)


def _check_scores(scores: ArrayLike, size: int, name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores)
    if scores.shape != (size,):
        raise ValueError(f"`{name}` must have shape ({size},), got {scores.shape}.")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise TypeError(f"`{name}` must hold real numbers, got {scores.dtype}.")
    scores = scores.astype(np.float32)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"`{name}` must be finite; found NaN or inf.")
    if size and scores.min() < 0:
        raise ValueError(f"`{name}` must be non-negative, got minimum {scores.min()}.")
    return scores


def _last_occurrences(indices: np.ndarray) -> np.ndarray:
    """Positions of the last occurrence of each distinct index (later repeats win)."""
    _, first_from_end = np.unique(indices[::-1], return_index=True)
    return len(indices) - 1 - first_from_end


def _state_array(
    state: Mapping[str, Any], key: str, shape: tuple[int, ...], dtype: Any
) -> np.ndarray:
    if not isinstance(state, Mapping) or key not in state:
        keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"`state` must be a dict with {key!r}; got {keys}.")
    value = np.asarray(state[key])
    if value.shape != shape:
        raise ValueError(f"`state[{key!r}]` must have shape {shape}, got {value.shape}.")
    return value.astype(dtype)


# -- the shared batch stream -----------------------------------------------------------
class _BatchStream:
    """Step-indexed global batches, kept once drawn; this process's rows; grain records."""

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        shard_options: grain.sharding.ShardOptions,
    ):
        self.num_examples = _check_positive_int(num_examples, "num_examples")
        if self.num_examples > _MAX_EXAMPLES:
            raise ValueError(f"`num_examples` must be below 2**31, got {num_examples}.")
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.seed = _check_seed(seed)
        if not isinstance(shard_options, grain.sharding.ShardOptions):
            raise TypeError(
                f"`shard_options` must be a grain.sharding.ShardOptions, got {shard_options!r}."
            )
        if self.batch_size % shard_options.shard_count:
            raise ValueError(
                f"`batch_size` ({batch_size}) must be divisible by the shard count of "
                f"`shard_options` ({shard_options.shard_count})."
            )
        self._shard_options = shard_options
        self.local_batch_size = self.batch_size // shard_options.shard_count
        self._next_step = 0
        self._drawn: collections.OrderedDict[int, Sample] = collections.OrderedDict()
        self._keep = max(2, _KEPT_RECORDS // self.batch_size)
        self._lock = threading.RLock()

    # Subclasses: `_draw(rng) -> (indices, weights)` of the global batch, and state.
    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def next_step(self) -> int:
        """The first step whose batch has not been drawn (where a resumed run starts)."""
        return self._next_step

    @property
    def shard_options(self) -> grain.sharding.ShardOptions:
        return self._shard_options

    def global_batch(self, step: int) -> Sample:
        """The whole ``b``-example batch of ``step`` (all processes' rows), numpy arrays."""
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"`step` must be a non-negative int, got {step!r}.")
        step = int(step)
        with self._lock:
            if step in self._drawn:
                self._drawn.move_to_end(step)
                return self._drawn[step]
            rng = np.random.default_rng([self.seed, step])
            indices, weights = self._draw(rng)
            sample = Sample(indices.astype(np.int32), weights.astype(np.float32))
            self._drawn[step] = sample
            if len(self._drawn) > self._keep:
                self._drawn.popitem(last=False)
            self._next_step = max(self._next_step, step + 1)
            return sample

    def batch(self, step: int) -> Sample:
        """This process's rows ``[p b/P, (p+1) b/P)`` of :meth:`global_batch` ``(step)``."""
        sample = self.global_batch(step)
        start = self._shard_options.shard_index * self.local_batch_size
        rows = slice(start, start + self.local_batch_size)
        return Sample(sample.indices[rows], sample.weights[rows])

    def _forget_drawn(self) -> None:
        with self._lock:
            self._drawn.clear()

    # grain.samplers.Sampler
    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        """Record ``index = i·P + p``: slot ``i mod (b/P)`` of process ``p``'s share of batch
        ``⌊i/(b/P)⌋`` (with ``P = 1``: slot ``index mod b`` of batch ``⌊index/b⌋``)."""
        if index < 0:
            raise IndexError(f"Record index must be non-negative, got {index}.")
        shards = self._shard_options.shard_count
        if index % shards != self._shard_options.shard_index:
            raise IndexError(
                f"Record {index} belongs to shard {index % shards}, but this sampler is "
                f"shard {self._shard_options.shard_index} of {shards}."
            )
        step, slot = divmod(index // shards, self.local_batch_size)
        record_key = int(self.batch(step).indices[slot])
        return grain.RecordMetadata(index=index, record_key=record_key, rng=None)

    def _base_state(self) -> dict[str, np.ndarray]:
        return {"seed": np.asarray(self.seed, np.uint32), "step": np.asarray(self._next_step)}

    def _set_base_state(self, state: Mapping[str, Any]) -> None:
        seed = int(_state_array(state, "seed", (), np.int64))
        if seed != self.seed:
            raise ValueError(
                f"`state` was saved by a sampler with seed {seed}; this one has {self.seed}."
            )
        step = int(_state_array(state, "step", (), np.int64))
        if step < 0:
            raise ValueError(f"`state['step']` must be non-negative, got {step}.")
        self._forget_drawn()
        self._next_step = step


class StratifiedSampler(_BatchStream):
    r"""Stratified batches over gradient clusters for a grain input pipeline.

    Each step draws ``n_k`` of the ``b`` examples uniformly from cluster ``k`` (``n_k`` by
    ``allocation``, as :func:`jaxeff.clustering.slots_per_cluster`) with weights

    .. math::

       w = \frac{N_k}{N\, n_k}, \qquad
       \mathbb{E}\Big[\sum_j w_j g_{i_j}\Big] = \frac1N \sum_i g_i,

    and variance ``Σ_k (N_k/N)² σ_k²/n_k`` (:func:`jaxeff.clustering.stratified_variance`).
    With fewer slots than non-empty clusters, ``b`` of them are drawn uniformly, one
    example each, weighted ``N_k K'/(N b)``. The slots are shuffled, so each process's
    share of a multi-host batch mixes clusters.

    Until the first :meth:`update` every example is in cluster 0 (uniform sampling). Only
    the ``(N,)`` cluster ids and each cluster's member list are held: a draw costs
    ``O(b + K)``, an update of ``m`` examples ``O(m)`` and a full update ``O(N log N)``.

    Args:
      num_examples: ``N``.
      batch_size: ``b``, the global batch size; divisible by the shard count.
      num_clusters: ``K``.
      seed: a 32-bit int; batch ``t`` draws from ``numpy.random.default_rng([seed, t])``.
      allocation: ``"equal"`` or ``"proportional"``.
      replace: draw with replacement within a cluster, or cycle a random permutation of
        it (each member ``⌊n_k/N_k⌋`` or ``⌈n_k/N_k⌉`` times).
      shard_options: this process's shard (``grain.sharding.ShardOptions``).

    Example::

      sampler = StratifiedSampler(len(source), batch_size=128, num_clusters=10, seed=0)
      for batch in weighted_batches(source, sampler):
        ...                                  # train on batch, weighted by batch["weights"]
        sampler.update(new_ids, batch["indices"])   # the clusters of the seen examples

    References:
      Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
      https://arxiv.org/abs/2007.04532.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        batch_size: int,
        num_clusters: int,
        seed: int,
        allocation: str = "equal",
        replace: bool = True,
        shard_options: grain.sharding.ShardOptions = _NO_SHARDING,
    ):
        super().__init__(num_examples, batch_size, seed, shard_options)
        self.num_clusters = _check_positive_int(num_clusters, "num_clusters")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"`allocation` must be one of {ALLOCATIONS}, got {allocation!r}.")
        if not isinstance(replace, bool):
            raise TypeError(f"`replace` must be a bool, got {replace!r}.")
        self.allocation = allocation
        self.replace = replace
        self._rebuild(np.zeros((self.num_examples,), np.int32), positions=None)

    def __repr__(self) -> str:
        return (
            f"StratifiedSampler(num_examples={self.num_examples}, batch_size="
            f"{self.batch_size}, num_clusters={self.num_clusters}, seed={self.seed}, "
            f"allocation={self.allocation!r}, replace={self.replace}, "
            f"shard_options={self._shard_options!r})"
        )

    # -- the member index: cluster k's members are _members[k][:_sizes[k]] --------------
    def _rebuild(self, assignments: np.ndarray, positions: np.ndarray | None) -> None:
        """Member lists from assignments (canonical order) or from saved positions."""
        sizes = np.bincount(assignments, minlength=self.num_clusters).astype(np.int64)
        starts = np.cumsum(sizes) - sizes
        if positions is None:
            order = np.argsort(assignments, kind="stable")
            positions = np.empty_like(assignments)
            positions[order] = np.arange(self.num_examples) - starts[assignments[order]]
            flat = starts[assignments] + positions
        else:
            if np.any(positions < 0) or np.any(positions >= sizes[assignments]):
                raise ValueError("`state['positions']` must index each cluster's members.")
            flat = starts[assignments] + positions
            if np.bincount(flat, minlength=self.num_examples).max() > 1:
                raise ValueError("`state['positions']` repeat a position within a cluster.")
        order = np.empty(self.num_examples, np.int32)
        order[flat] = np.arange(self.num_examples, dtype=np.int32)
        self._assignments = assignments.astype(np.int32)
        self._positions = positions.astype(np.int32)
        self._sizes = sizes
        self._members = [order[s : s + n].copy() for s, n in zip(starts, sizes, strict=True)]

    def _move(self, example: int, cluster: int) -> None:
        """Swap-remove ``example`` from its cluster and append it to ``cluster``: O(1)."""
        old = int(self._assignments[example])
        if old == cluster:
            return
        position, last = int(self._positions[example]), int(self._sizes[old]) - 1
        moved = int(self._members[old][last])
        self._members[old][position] = moved
        self._positions[moved] = position
        self._sizes[old] -= 1
        members, size = self._members[cluster], int(self._sizes[cluster])
        if size == len(members):
            members = np.resize(members, max(4, 2 * size))
            self._members[cluster] = members
        members[size] = example
        self._positions[example] = size
        self._sizes[cluster] += 1
        self._assignments[example] = cluster

    @property
    def assignments(self) -> np.ndarray:
        """The ``(N,)`` cluster ids in force (a read-only view)."""
        view = self._assignments.view()
        view.flags.writeable = False
        return view

    @property
    def cluster_sizes(self) -> np.ndarray:
        """``(K,)`` ``N_k``."""
        return self._sizes.copy()

    def update(self, assignments: ArrayLike, indices: ArrayLike | None = None) -> None:
        """Sets the clusters of all examples, or of ``indices`` only, from the next batch.

        Args:
          assignments: ``(N,)`` cluster ids in ``[0, K)``, or ``(m,)`` with ``indices``.
          indices: ``(m,)`` example indices whose clusters change (repeats: the last
            wins); ``None`` for all.
        """
        with self._lock:
            if indices is None:
                assignments = _check_assignments(assignments, self.num_clusters, self.num_examples)
                self._rebuild(assignments, positions=None)
                return
            indices = _check_indices(indices, self.num_examples)
            assignments = _check_assignments(assignments, self.num_clusters, len(indices))
            last = _last_occurrences(indices)
            moved = last[assignments[last] != self._assignments[indices[last]]]
            for j in moved:  # only the examples whose cluster changes
                self._move(int(indices[j]), int(assignments[j]))

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        sizes, size, b = self._sizes, self.num_examples, self.batch_size
        nonempty = np.flatnonzero(sizes)
        if len(nonempty) > b:  # fewer slots than clusters: b clusters, one example each
            clusters = np.sort(rng.choice(nonempty, b, replace=False))
            slots = np.ones(b, np.int64)
            inclusion = b / len(nonempty)
        else:
            allocated = _allocate(sizes, b, self.allocation, np)
            clusters = np.flatnonzero(allocated)
            slots = allocated[clusters]
            inclusion = 1.0
        indices = np.empty(b, np.int64)
        weights = np.empty(b, np.float64)
        start = 0
        for cluster, draws in zip(clusters, slots, strict=True):
            members = self._members[cluster][: sizes[cluster]]
            if self.replace:
                chosen = members[rng.integers(0, len(members), draws)]
            elif draws <= len(members):
                chosen = members[rng.choice(len(members), draws, replace=False)]
            else:  # cycle a random permutation
                chosen = np.resize(members[rng.permutation(len(members))], draws)
            indices[start : start + draws] = chosen
            weights[start : start + draws] = _stratum_weight(sizes[cluster], draws, size)
            start += int(draws)
        order = rng.permutation(b)
        return indices[order], weights[order] / inclusion

    def get_state(self) -> dict[str, np.ndarray]:
        """``{"assignments", "positions", "seed", "step"}``: all that fixes future batches.

        ``positions[i]`` is example ``i``'s place in its cluster's member list (the order
        incremental updates leave and the draws index).
        """
        with self._lock:
            return {
                "assignments": self._assignments.copy(),
                "positions": self._positions.copy(),
                **self._base_state(),
            }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`get_state`'s dict (numpy or JAX arrays, e.g. from orbax)."""
        size = self.num_examples
        assignments = _check_assignments(
            _state_array(state, "assignments", (size,), np.int64),
            self.num_clusters,
            size,
            name="state['assignments']",
        )
        positions = _state_array(state, "positions", (size,), np.int64)
        with self._lock:
            self._set_base_state(state)
            self._rebuild(assignments, positions=positions)


class _SumTree:
    """Leaf values and every subtree's sum, each node recomputed from its two children.

    So the tree is a function of the leaves alone (not of the order of updates), which
    keeps a restored sampler's draws identical to the uninterrupted one's.
    """

    def __init__(self, values: np.ndarray):
        self._width = 1 << max(0, int(len(values) - 1).bit_length())
        self._nodes = np.zeros(2 * self._width, values.dtype)
        self._nodes[self._width : self._width + len(values)] = values
        level = self._width
        while level > 1:
            parents = np.arange(level // 2, level)
            self._nodes[parents] = self._nodes[2 * parents] + self._nodes[2 * parents + 1]
            level //= 2

    @property
    def total(self) -> Any:
        return self._nodes[1]

    def set(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Sets distinct leaves and recomputes their ancestors: ``O(m log N)``."""
        nodes = indices + self._width
        self._nodes[nodes] = values
        while nodes[0] > 1:
            nodes = np.unique(nodes // 2)
            self._nodes[nodes] = self._nodes[2 * nodes] + self._nodes[2 * nodes + 1]

    def find(self, targets: np.ndarray) -> np.ndarray:
        """The leaf whose cumulative range holds each target in ``[0, total)``: O(log N)."""
        nodes = np.ones(len(targets), np.int64)
        targets = targets.copy()
        while nodes[0] < self._width:
            left, right = self._nodes[2 * nodes], self._nodes[2 * nodes + 1]
            go_right = ((targets >= left) & (right > 0)) | (left <= 0)
            targets = np.where(go_right, targets - left, targets)
            nodes = 2 * nodes + go_right
        return nodes - self._width


class ImportanceSampler(_BatchStream):
    r"""Batches drawn in proportion to per-example scores, for a grain input pipeline.

    ``b`` independent draws with

    .. math::

       p_i = (1 - \lambda) \frac{s_i}{\sum_l s_l} + \frac{\lambda}{N}, \qquad
       w = \frac{1}{N\, b\, p_i},

    as :func:`jaxeff.clustering.importance_sample`. Scores come from training
    (:meth:`update` with the gradient norms or losses of the examples just seen); an
    example never scored counts with the mean of the known scores (1 before any), so the
    sampler starts uniform. Uniform when all scores are zero. A draw costs ``O(b log N)``
    (sum trees over the known scores and over the unscored examples) and an update of
    ``m`` scores ``O(m log N)``.

    Args:
      num_examples: ``N``.
      batch_size: ``b``, the global batch size; divisible by the shard count.
      seed: a 32-bit int; batch ``t`` draws from ``numpy.random.default_rng([seed, t])``.
      smoothing: ``λ`` in ``[0, 1]``; ``λ > 0`` keeps every ``p_i > 0`` (unbiased for any
        gradients, and bounded weights ``<= 1/(b λ)``).
      shard_options: this process's shard (``grain.sharding.ShardOptions``).

    Example::

      sampler = ImportanceSampler(len(source), batch_size=128, seed=0, smoothing=0.1)
      for batch in weighted_batches(source, sampler):
        ...
        sampler.update(per_example_norms, batch["indices"])
    """

    def __init__(
        self,
        num_examples: int,
        *,
        batch_size: int,
        seed: int,
        smoothing: float = 0.0,
        shard_options: grain.sharding.ShardOptions = _NO_SHARDING,
    ):
        super().__init__(num_examples, batch_size, seed, shard_options)
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float | np.floating):
            raise ValueError(f"`smoothing` must be a float in [0, 1], got {smoothing!r}.")
        if not 0.0 <= float(smoothing) <= 1.0:
            raise ValueError(f"`smoothing` must be a float in [0, 1], got {smoothing!r}.")
        self.smoothing = float(smoothing)
        self._rebuild(np.zeros(self.num_examples, np.float32), np.zeros(self.num_examples, bool))

    def __repr__(self) -> str:
        return (
            f"ImportanceSampler(num_examples={self.num_examples}, batch_size="
            f"{self.batch_size}, seed={self.seed}, smoothing={self.smoothing}, "
            f"shard_options={self._shard_options!r})"
        )

    def _rebuild(self, scores: np.ndarray, scored: np.ndarray) -> None:
        self._scores = scores.astype(np.float32)
        self._scored = scored.astype(bool)
        self._known = _SumTree(np.where(self._scored, self._scores, 0).astype(np.float64))
        self._unknown = _SumTree((~self._scored).astype(np.int64))

    @property
    def scores(self) -> np.ndarray:
        """``(N,)`` scores in force, the unscored ones at their current stand-in value."""
        return np.where(self._scored, self._scores, self._initial_score()).astype(np.float32)

    def _initial_score(self) -> float:
        num_known = self.num_examples - int(self._unknown.total)
        return float(self._known.total) / num_known if num_known else 1.0

    def update(self, scores: ArrayLike, indices: ArrayLike | None = None) -> None:
        """Sets the scores of all examples, or of ``indices`` only, from the next batch.

        Args:
          scores: ``(N,)`` non-negative finite scores, or ``(m,)`` with ``indices``.
          indices: ``(m,)`` example indices (repeats: the last wins); ``None`` for all.
        """
        with self._lock:
            if indices is None:
                scores = _check_scores(scores, self.num_examples)
                self._rebuild(scores, np.ones(self.num_examples, bool))
                return
            rows = _check_indices(indices, self.num_examples)
            values = _check_scores(scores, len(rows))
            if not len(rows):
                return
            last = _last_occurrences(rows)
            rows, values = rows[last], values[last]
            self._scores[rows] = values
            self._scored[rows] = True
            self._known.set(rows, values.astype(np.float64))
            self._unknown.set(rows, np.zeros(len(rows), np.int64))

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size, b, smoothing = self.num_examples, self.batch_size, self.smoothing
        num_unknown = int(self._unknown.total)
        initial = self._initial_score()
        known_total = float(self._known.total)
        total = known_total + num_unknown * initial
        # p = λ·uniform + (1-λ)·(known scores | unscored examples at the initial score)
        if total > 0:
            known_share = (1.0 - smoothing) * known_total / total
            unknown_share = (1.0 - smoothing) * num_unknown * initial / total
        else:
            known_share = unknown_share = 0.0
        component = rng.random(b)
        indices = rng.integers(0, size, b)
        from_known = component < known_share
        from_unknown = (component >= known_share) & (component < known_share + unknown_share)
        if from_known.any():
            targets: np.ndarray = rng.random(int(from_known.sum())) * known_total
            indices[from_known] = self._known.find(targets)
        if from_unknown.any():
            targets = rng.integers(0, num_unknown, int(from_unknown.sum()))
            indices[from_unknown] = self._unknown.find(targets)
        chosen = np.where(self._scored[indices], self._scores[indices], initial)
        probs = _importance_probability(chosen.astype(np.float64), total, size, smoothing)
        return indices, 1.0 / (size * b * probs)

    def get_state(self) -> dict[str, np.ndarray]:
        """``{"scores", "scored", "seed", "step"}``: all that fixes future batches."""
        with self._lock:
            return {
                "scores": self._scores.copy(),
                "scored": self._scored.copy(),
                **self._base_state(),
            }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`get_state`'s dict (numpy or JAX arrays, e.g. from orbax)."""
        size = self.num_examples
        scores = _check_scores(
            _state_array(state, "scores", (size,), np.float32), size, "state['scores']"
        )
        scored = _state_array(state, "scored", (size,), bool)
        with self._lock:
            self._set_base_state(state)
            self._rebuild(scores, scored)


def weighted_batches(
    source: Sequence[Mapping[str, Any]],
    sampler: StratifiedSampler | ImportanceSampler,
    *,
    start: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """An iterator over this process's batch of each step, read from a random-access source.

    Step ``t`` reads ``sampler.batch(t)`` from ``source`` (``source.__getitems__`` when it
    has one, e.g. ``tfds.data_source``, else one ``source[i]`` per example, e.g. a list or
    a ``grain.MapDataset``) and yields the stacked record fields with the sample:
    ``{**fields, "weights": (b/P,) float32, "indices": (b/P,) int32}``.

    Synchronous on purpose: batch ``t + 1`` is drawn only when the caller asks for it,
    after it has called ``sampler.update`` with what step ``t`` learned, so every batch is
    drawn with the assignments in force at its step and a sampler state saved between
    steps resumes exactly. Prefetching (reading ahead in threads) would draw batches
    before the updates that should shape them.

    Args:
      source: random-access records (``len`` and ``__getitem__``), each a dict of arrays.
      sampler: a :class:`StratifiedSampler` or :class:`ImportanceSampler`.
      start: the first step; default ``sampler.next_step`` (0 for a new sampler, the saved
        step for a restored one).

    Returns:
      An endless iterator of dicts, one per step.

    Example::

      sampler.set_state(saved)                         # resume
      for step, batch in zip(range(sampler.next_step, num_steps),
                             weighted_batches(source, sampler)):
        ...
    """
    if not hasattr(source, "__getitem__") or not hasattr(source, "__len__"):
        raise TypeError(f"`source` must support len() and [], got {type(source).__name__}.")
    if len(source) != sampler.num_examples:
        raise ValueError(
            f"`source` has {len(source)} records but the sampler was built for "
            f"{sampler.num_examples}."
        )
    step = sampler.next_step if start is None else start
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"`start` must be a non-negative int, got {start!r}.")
    return _read_batches(source, sampler, int(step))


def _read_batches(
    source: Sequence[Mapping[str, Any]],
    sampler: StratifiedSampler | ImportanceSampler,
    step: int,
) -> Iterator[dict[str, np.ndarray]]:
    while True:
        sample = sampler.batch(step)
        keys = [int(i) for i in sample.indices]
        if hasattr(source, "__getitems__"):
            records = source.__getitems__(keys)
        else:
            records = [source[i] for i in keys]
        if not all(isinstance(r, Mapping) for r in records):
            raise TypeError("`source` records must be dicts of arrays.")
        fields = {name: np.stack([r[name] for r in records]) for name in records[0]}
        clash = {"weights", "indices"} & set(fields)
        if clash:
            raise ValueError(f"`source` records must not have the reserved fields {clash}.")
        # The sampler's numpy arrays themselves (np.asarray copies nothing).
        weights, indices = np.asarray(sample.weights), np.asarray(sample.indices)
        yield {**fields, "weights": weights, "indices": indices}
        step += 1
