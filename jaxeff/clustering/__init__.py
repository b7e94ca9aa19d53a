"""Gradient clustering: stratified, unbiased, lower-variance mini-batches.

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532. Examples whose gradients look alike are redundant; GC
groups them into ``K`` clusters with rank-1 centres per Dense/Conv layer (distances from
the fast-path per-example statistics of :mod:`jaxeff.pergrad`, no per-example gradient
formed), and mini-batches drawn stratified over the clusters with weights
``N_k/(N n_k)`` give an unbiased gradient estimate with lower variance.

* State and assignment (:mod:`~jaxeff.clustering.centres`): :class:`ClusterState`,
  :func:`distances`, :func:`assign` (``argmin_k (N_k + 1)||g_i − C_k||²``).
* Batch mode (:mod:`~jaxeff.clustering.batch_mode`): :func:`init_clusters`,
  :func:`clustering_pass` (assign a pass, then update), :func:`batch_update`.
* Online mode (:mod:`~jaxeff.clustering.online`): :func:`online_update`, and as an optax
  transformation riding along a training step, :func:`gradient_clustering`.
* Per-cluster sums (:mod:`~jaxeff.clustering.sums`): :class:`ClusterSums`,
  :func:`cluster_sums`, :func:`add_sums`, :func:`split_small_clusters`.
"""

from jaxeff.clustering.batch_mode import batch_update, clustering_pass, init_clusters
from jaxeff.clustering.centres import (
    ClusterState,
    assign,
    cluster_layers,
    distances,
    init_from_stats,
    layer_name,
    zero_directions,
)
from jaxeff.clustering.online import online_update
from jaxeff.clustering.sums import (
    ClusterSums,
    add_sums,
    cluster_sums,
    empty_sums,
    split_small_clusters,
)
from jaxeff.clustering.transform import GradientClusteringState, gradient_clustering

__all__ = [
    "ClusterState",
    "ClusterSums",
    "GradientClusteringState",
    "add_sums",
    "assign",
    "batch_update",
    "cluster_layers",
    "cluster_sums",
    "clustering_pass",
    "distances",
    "empty_sums",
    "gradient_clustering",
    "init_clusters",
    "init_from_stats",
    "layer_name",
    "online_update",
    "split_small_clusters",
    "zero_directions",
]
