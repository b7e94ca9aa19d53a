r"""Gradient clustering and importance sampling as estimators of the variance suite.

Both are :class:`jaxeff.gvar.GradientEstimator` s built on
:func:`jaxeff.gvar.sampling_estimator`, so they are measured by
:func:`jaxeff.gvar.measure` on the same trajectory as SGD, SGD with twice the batch and
SVRG:

* :func:`gc_estimator`: ``init`` clusters the whole dataset at the current parameters
  (batch mode, :func:`cluster_examples`); ``estimate`` draws a stratified mini-batch with
  weights ``N_k/(N n_k)`` (:func:`jaxeff.clustering.stratified_sample`);
* :func:`importance_estimator`: ``init`` scores every example by its gradient norm
  ``||g_i||`` (fast path) or its loss; ``estimate`` draws ``p_i ∝`` score with weights
  ``1/(N b p_i)`` (:func:`jaxeff.clustering.importance_sample`).

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxeff import gvar
from jaxeff.clustering.batch_mode import _on_host, clustering_pass, init_clusters
from jaxeff.clustering.centres import ClusterState
from jaxeff.clustering.sampling import (
    _check_allocation,
    _check_positive_int,
    _check_smoothing,
    importance_sample,
    stratified_sample,
)
from jaxeff.clustering.sums import check_min_fraction
from jaxeff.pergrad import per_example_stats
from jaxeff.pergrad.chunks import take_rows

__all__ = [
    "GCEstimatorState",
    "cluster_examples",
    "example_scores",
    "gc_estimator",
    "importance_estimator",
]

ExampleLoss = Callable[[Any, Any], jax.Array]  # loss_fn(params, batch) -> (B,)


class GCEstimatorState(NamedTuple):
    """State of :func:`gc_estimator`: the clustering and every example's cluster."""

    clusters: ClusterState
    assignments: jax.Array  # (N,) int32


def _chunks(data: chex.ArrayTree, chunk_size: int) -> Iterator[dict[str, Any]]:
    """``data`` in consecutive chunks of ``chunk_size`` rows; the last is padded and masked."""
    size = gvar.num_examples(data)
    for start in range(0, size, chunk_size):
        stop = min(start + chunk_size, size)
        rows = np.arange(start, start + chunk_size) % size  # pad with the first rows
        chunk = jax.tree.map(lambda x, rows=rows: take_rows(x, rows), data)
        yield {"batch": chunk, "mask": np.arange(start, start + chunk_size) < stop}


def _check_pass_options(num_passes: Any, min_fraction: Any, chunk_size: Any) -> None:
    """The checks of :func:`cluster_examples`'s options, naming the argument."""
    if isinstance(num_passes, bool) or not isinstance(num_passes, int) or num_passes < 0:
        raise ValueError(f"`num_passes` must be a non-negative integer, got {num_passes!r}.")
    check_min_fraction(min_fraction, static=True)
    _check_positive_int(chunk_size, "chunk_size")


@functools.lru_cache(maxsize=64)
def _unwrap(loss_fn: ExampleLoss) -> ExampleLoss:
    """The loss of ``{"batch", "mask"}`` chunks; one object per ``loss_fn``, so the jitted
    pass compiles once."""

    def loss(params, wrapped):
        return loss_fn(params, wrapped["batch"])

    return loss


def cluster_examples(
    loss_fn: ExampleLoss,
    params: chex.ArrayTree,
    data: chex.ArrayTree,
    *,
    num_clusters: int,
    key: jax.Array,
    num_passes: int = 3,
    min_fraction: float = 0.0,
    chunk_size: int = 1024,
    leaves: str | Sequence[str] | None = None,
    state: ClusterState | None = None,
) -> tuple[ClusterState, np.ndarray]:
    """Batch-mode clustering of a whole in-memory dataset: ``num_passes`` passes, then the
    assignment of every example under the final centres.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      params: the parameters to cluster the gradients at.
      data: pytree of arrays with the ``N`` examples on the leading axis.
      num_clusters: ``K``.
      key: PRNG key for the seeds (unused with ``state``).
      num_passes: assign/update passes (Lloyd iterations).
      min_fraction: ``[0, 1)``, see :func:`jaxeff.clustering.clustering_pass`.
      chunk_size: examples per pass step (the last chunk is padded and masked).
      leaves: the parameter paths to cluster on (``None``: every leaf that can be, see
        :func:`jaxeff.clustering.cluster_leaves`).
      state: continue from this clustering (e.g. the previous snapshot) instead of seeding.

    Returns:
      ``(state, assignments)``: the clustering after the passes and the ``(N,)`` host
      assignments under it, the clusters a stratified sampler should draw from.
    """
    _check_pass_options(num_passes, min_fraction, chunk_size)
    size = gvar.num_examples(data)
    chunk = min(chunk_size, size)
    loss = _unwrap(loss_fn)
    if state is None:
        rows = np.asarray(jax.random.permutation(key, size))[: max(chunk, num_clusters)]
        seed_batch = {"batch": jax.tree.map(lambda x: take_rows(x, rows), data)}
        state = init_clusters(
            loss, params, seed_batch, num_clusters=num_clusters, key=key, leaves=leaves
        )
    for _ in range(num_passes):
        state, _ = clustering_pass(
            loss, params, _chunks(data, chunk), state, min_fraction=min_fraction
        )
    # The assignment under the final centres: a pass whose update is discarded.
    _, assignments = clustering_pass(loss, params, _chunks(data, chunk), state)
    return state, assignments


def gc_estimator(
    loss_fn: ExampleLoss,
    *,
    batch_size: int,
    num_clusters: int,
    num_passes: int = 3,
    min_fraction: float = 0.0,
    allocation: str = "equal",
    replace: bool = True,
    chunk_size: int = 1024,
    leaves: str | Sequence[str] | None = None,
    seed: int = 0,
) -> gvar.GradientEstimator:
    r"""The gradient-clustering estimator: stratified draws over gradient clusters.

    .. math::

       \hat g = \sum_k \frac{N_k}{N n_k} \sum_{j=1}^{n_k} g_{i_{kj}}, \qquad
       \operatorname{Var} = \sum_k \Big(\frac{N_k}{N}\Big)^2 \frac{\sigma_k^2}{n_k},

    unbiased for the mean gradient; lower variance than SGD with the same batch when
    the clusters are tight. ``init(params, data)`` clusters ``data`` at ``params``
    (:func:`cluster_examples`, seeded from ``seed``) and returns a
    :class:`GCEstimatorState`; ``estimate`` is one stratified draw
    (:func:`jaxeff.clustering.stratified_sample`) and one weighted backward pass.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      batch_size: ``b``, draws per estimate.
      num_clusters: ``K``.
      num_passes, min_fraction, chunk_size, leaves: see :func:`cluster_examples`.
      allocation, replace: see :func:`jaxeff.clustering.stratified_sample`.
      seed: seeds the clustering's initial centres.

    Returns:
      A :class:`jaxeff.gvar.GradientEstimator`.

    Raises:
      ValueError, TypeError: naming the argument for a bad ``batch_size``,
        ``num_clusters``, ``num_passes``, ``min_fraction``, ``allocation``, ``replace`` or
        ``chunk_size``, when the estimator is made.

    Example::

      estimators = {"sgd": gvar.sgd_estimator(loss_fn, batch_size=32),
                    "gc": gc_estimator(loss_fn, batch_size=32, num_clusters=8)}
      states = {name: est.init(params, data) for name, est in estimators.items()}
      stats = gvar.measure(estimators, states, params, data, key)
    """
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(num_clusters, "num_clusters")
    _check_pass_options(num_passes, min_fraction, chunk_size)
    _check_allocation(allocation)
    if not isinstance(replace, bool):
        raise TypeError(f"`replace` must be a bool, got {replace!r}.")

    def init(params, data):
        clusters, assignments = cluster_examples(
            loss_fn,
            params,
            data,
            num_clusters=num_clusters,
            key=jax.random.key(seed),
            num_passes=num_passes,
            min_fraction=min_fraction,
            chunk_size=chunk_size,
            leaves=leaves,
        )
        return GCEstimatorState(clusters, jnp.asarray(assignments))

    def sample_fn(state, key, size):
        del size
        return stratified_sample(
            key,
            state.assignments,
            num_clusters=num_clusters,
            batch_size=batch_size,
            allocation=allocation,
            replace=replace,
        )

    return gvar.sampling_estimator(loss_fn, sample_fn, init_fn=init)


def _check_score_options(score: Any, chunk_size: Any) -> None:
    if score not in ("grad_norm", "loss"):
        raise ValueError(f"`score` must be 'grad_norm' or 'loss', got {score!r}.")
    _check_positive_int(chunk_size, "chunk_size")


def example_scores(
    loss_fn: ExampleLoss,
    params: chex.ArrayTree,
    data: chex.ArrayTree,
    *,
    score: str = "grad_norm",
    chunk_size: int = 1024,
) -> jax.Array:
    """``(N,)`` per-example scores: gradient norms ``||g_i||`` (fast path) or losses ``ℓ_i``."""
    _check_score_options(score, chunk_size)
    size = gvar.num_examples(data)
    parts = []
    for part in _chunks(data, min(chunk_size, size)):
        stats = per_example_stats(loss_fn, params, part["batch"], with_sum_sq=False)
        values = jnp.sqrt(stats.total_sq_norms) if score == "grad_norm" else stats.losses
        parts.append(_on_host(values)[part["mask"]])  # also when spread over processes
    return jnp.asarray(np.concatenate(parts))


def importance_estimator(
    loss_fn: ExampleLoss,
    *,
    batch_size: int,
    score: str = "grad_norm",
    smoothing: float = 0.0,
    chunk_size: int = 1024,
) -> gvar.GradientEstimator:
    r"""Importance sampling: ``p_i ∝`` the gradient norm (or loss), weights ``1/(N b p_i)``.

    .. math::

       \hat g = \sum_{j=1}^{b} \frac{g_{i_j}}{N b p_{i_j}}, \qquad
       p_i = (1-\lambda)\frac{s_i}{\sum_l s_l} + \frac{\lambda}{N},

    unbiased; with ``s_i = ||g_i||`` (scored at ``init``'s parameters) it is the
    variance-optimal sampling distribution at those parameters (Needell, Srebro, Ward,
    "Stochastic Gradient Descent, Weighted Sampling, and the Randomized Kaczmarz
    Algorithm", 2014; Katharopoulos & Fleuret, "Not All Samples Are Created Equal", 2018).
    ``init(params, data)`` scores every example (:func:`example_scores`); ``estimate``
    draws ``b`` examples (:func:`jaxeff.clustering.importance_sample`).

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      batch_size: ``b``.
      score: ``"grad_norm"`` or ``"loss"``.
      smoothing: ``λ`` in ``[0, 1]``, mixing in the uniform distribution.
      chunk_size: examples per scoring step.

    Returns:
      A :class:`jaxeff.gvar.GradientEstimator` whose state is the ``(N,)`` scores.

    Raises:
      ValueError, TypeError: naming the argument for a bad ``batch_size``, ``score``,
        ``smoothing`` (outside ``[0, 1]``, NaN, or traced: it is static) or
        ``chunk_size``, when the estimator is made.
    """
    _check_positive_int(batch_size, "batch_size")
    _check_score_options(score, chunk_size)
    smoothing = _check_smoothing(smoothing)

    def init(params, data):
        return example_scores(loss_fn, params, data, score=score, chunk_size=chunk_size)

    def sample_fn(scores, key, size):
        del size
        return importance_sample(key, scores, batch_size=batch_size, smoothing=smoothing)

    return gvar.sampling_estimator(loss_fn, sample_fn, init_fn=init)
