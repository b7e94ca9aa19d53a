"""Gradient clustering: stratified, unbiased, lower-variance mini-batches.

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532. Examples whose gradients look alike are redundant; GC
groups them into ``K`` clusters with factored centres per parameter leaf (rank 1 on a
kernel; distances from the per-example statistics of :mod:`jaxeff.pergrad`, for any
``loss_fn(params, batch)``, no per-example gradient formed), and mini-batches drawn
stratified over the clusters with weights ``N_k/(N n_k)`` give an unbiased gradient
estimate with lower variance.

* State and assignment (:mod:`~jaxeff.clustering.centres`): :class:`ClusterState`,
  :func:`cluster_leaves` (what can be clustered), :func:`distances`, :func:`assign`
  (``argmin_k (N_k + 1)||g_i − C_k||²``).
* Batch mode (:mod:`~jaxeff.clustering.batch_mode`): :func:`init_clusters`,
  :func:`clustering_pass` (assign a pass, then update), :func:`batch_update`.
* Online mode (:mod:`~jaxeff.clustering.online`): :func:`online_update`, and as an optax
  transformation riding along a training step, :func:`gradient_clustering`.
* Per-cluster sums (:mod:`~jaxeff.clustering.sums`): :class:`ClusterSums`,
  :func:`cluster_sums`, :func:`add_sums`, :func:`split_small_clusters`.
* Sampling in JAX (:mod:`~jaxeff.clustering.sampling`): :func:`stratified_sample` with
  weights ``N_k/(N n_k)`` and its exact :func:`stratified_variance`;
  :func:`importance_sample` with weights ``1/(N b p_i)``.
* Samplers for input pipelines (:mod:`~jaxeff.clustering.samplers`, grain's ``Sampler``
  protocol, checkpointable state): :class:`StratifiedSampler`, :class:`ImportanceSampler`,
  :func:`weighted_batches`.
* Variance-suite estimators (:mod:`~jaxeff.clustering.estimators`): :func:`gc_estimator`,
  :func:`importance_estimator`, :func:`cluster_examples`.
"""

import importlib
from typing import TYPE_CHECKING

from jaxeff.clustering.batch_mode import batch_update, clustering_pass, init_clusters
from jaxeff.clustering.centres import (
    AssignmentCounts,
    ClusterState,
    assign,
    cluster_leaves,
    distances,
    init_from_stats,
    size_weighted_argmin,
    zero_directions,
)
from jaxeff.clustering.estimators import (
    GCEstimatorState,
    cluster_examples,
    example_scores,
    gc_estimator,
    importance_estimator,
)
from jaxeff.clustering.online import online_update
from jaxeff.clustering.sampling import (
    ALLOCATIONS,
    importance_probabilities,
    importance_sample,
    importance_variance,
    slots_per_cluster,
    stratified_sample,
    stratified_variance,
    stratified_weights,
)
from jaxeff.clustering.sums import (
    ClusterSums,
    add_sums,
    cluster_sums,
    empty_sums,
    split_small_clusters,
)
from jaxeff.clustering.transform import GradientClusteringState, gradient_clustering

if TYPE_CHECKING:
    from jaxeff.clustering.samplers import ImportanceSampler, StratifiedSampler, weighted_batches

__all__ = [
    "AssignmentCounts",
    "ALLOCATIONS",
    "ClusterState",
    "ClusterSums",
    "GCEstimatorState",
    "GradientClusteringState",
    "ImportanceSampler",
    "StratifiedSampler",
    "add_sums",
    "assign",
    "batch_update",
    "cluster_examples",
    "cluster_leaves",
    "cluster_sums",
    "clustering_pass",
    "distances",
    "empty_sums",
    "example_scores",
    "gc_estimator",
    "gradient_clustering",
    "importance_estimator",
    "importance_probabilities",
    "importance_sample",
    "importance_variance",
    "init_clusters",
    "init_from_stats",
    "online_update",
    "slots_per_cluster",
    "size_weighted_argmin",
    "split_small_clusters",
    "stratified_sample",
    "stratified_variance",
    "stratified_weights",
    "weighted_batches",
    "zero_directions",
]


_SAMPLERS = ("ImportanceSampler", "StratifiedSampler", "weighted_batches")


def __getattr__(name: str):
    """The grain samplers, imported on first use (grain is the ``[data]`` extra)."""
    if name in _SAMPLERS:
        module = importlib.import_module("jaxeff.clustering.samplers")
        globals().update({n: getattr(module, n) for n in _SAMPLERS})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
