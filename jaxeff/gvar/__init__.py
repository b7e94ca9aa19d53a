"""Gradient variance during training: estimators, their measured variance, exact variance.

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532.

* Estimators (:mod:`jaxeff.gvar.estimators`): :class:`GradientEstimator`, a pair of pure
  functions ``init(params, data) -> state`` and ``estimate(state, params, data, key) ->
  (grad, state)``; :func:`sgd_estimator`, :func:`svrg_estimator`, and
  :func:`sampling_estimator` for any sampler of indices and per-example weights
  (:class:`Sample`), whose gradient is :func:`weighted_gradient`.
* Measurement (:mod:`jaxeff.gvar.measure`): :func:`measure_variance` and :func:`measure`
  give :class:`VarianceStats` (average variance, normalised variance, SNR, gradient norm)
  from ``m`` draws for the mean and ``m`` more for the spread, jit-compiled and
  deterministic given a key.
* Exact variance (:mod:`jaxeff.gvar.exact`): :func:`gradient_moments` over the whole
  dataset from :func:`jaxeff.pergrad.per_example_stats`, and :func:`exact_variance` of SGD
  with any batch size.
* Records (:mod:`jaxeff.gvar.records`): JSON lines per step and estimator, and
  :func:`plot_records`.
"""

from jaxeff.gvar.estimators import (
    GradientEstimator,
    Sample,
    SVRGState,
    mean_gradient,
    num_examples,
    sampling_estimator,
    sgd_estimator,
    svrg_estimator,
    uniform_sample,
    weighted_gradient,
)
from jaxeff.gvar.exact import GradientMoments, exact_variance, gradient_moments
from jaxeff.gvar.measure import (
    STATISTICS,
    VarianceStats,
    draw_keys,
    estimator_key,
    measure,
    measure_variance,
    variance_statistics,
)
from jaxeff.gvar.records import append_records, plot_records, read_records, stats_record

__all__ = [
    "STATISTICS",
    "GradientEstimator",
    "GradientMoments",
    "SVRGState",
    "Sample",
    "VarianceStats",
    "append_records",
    "draw_keys",
    "estimator_key",
    "exact_variance",
    "gradient_moments",
    "mean_gradient",
    "measure",
    "measure_variance",
    "num_examples",
    "plot_records",
    "read_records",
    "sampling_estimator",
    "sgd_estimator",
    "stats_record",
    "svrg_estimator",
    "uniform_sample",
    "variance_statistics",
    "weighted_gradient",
]
