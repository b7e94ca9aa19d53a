r"""Variance of a gradient estimator at fixed parameters: mean, then spread, from ``2m`` draws.

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532. At parameters ``θ`` with ``P`` coordinates, an
estimator is drawn ``m`` times to estimate the mean and ``m`` more times to measure the
spread around it (the keys are :func:`draw_keys`):

.. math::

   \bar g = \frac1m \sum_{j=1}^m \hat g_j, \qquad
   v_c = \frac1m \sum_{j=m+1}^{2m} (\hat g_{j,c} - \bar g_c)^2,

and the statistics (:class:`VarianceStats`) are

* average variance ``V = (1/P) Σ_c v_c``, the mean over draws of the mean squared
  deviation per coordinate, ``(1/m) Σ_j ||ĝ_j - ḡ||² / P``;
* normalised variance ``NV = mean_{c ∈ A} v_c / (v_c + ḡ_c²)``: the per-coordinate variance
  over the per-coordinate second moment ``E[ĝ_c²] = Var[ĝ_c] + E[ĝ_c]²`` (estimated as
  ``v_c + ḡ_c²``), averaged over the coordinates ``A = {c: v_c + ḡ_c² > 0}`` that some
  draw moved (``0/0`` coordinates, e.g. weights of always-zero input pixels, are left
  out; ``active_fraction = |A|/P`` is reported). Each ratio lies in ``[0, 1]``. The
  study's code divided by ``Σ_j ĝ_{j,c}² + 10⁻⁷`` instead, a ratio without bound for
  coordinates that are rarely non-zero (sparse inputs), and averaged over all ``P``;
* ``SNR = ||ḡ|| / sqrt(Σ_c v_c) = ||ḡ|| / sqrt(P V)``, the norm of the mean over the
  square root of the total variance (``+inf`` when the variance is exactly 0, e.g. SVRG
  at its snapshot; 0 when ``ḡ = 0``). The study's code logged a per-coordinate variant,
  ``mean_c log(Σ_j ĝ_{j,c}² / (m v_c))``, which is not reported here;
* ``grad_norm = ||ḡ||``. With ``ḡ`` a mean of ``m`` draws,
  ``E||ḡ||² = ||∇f||² + P σ²_est / m``: noisy estimators read high.

With the mean estimated from ``m`` independent draws, ``E[V] = (1 + 1/m) σ²_est`` where
``σ²_est`` is the estimator's true average variance; pass ``mean=`` (e.g. the full
gradient) to measure around a known mean instead (``E[V] = σ²_est``). The factor is the
same for every unbiased estimator, so ratios between estimators are unaffected.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.gvar.estimators import GradientEstimator

__all__ = [
    "STATISTICS",
    "VarianceStats",
    "draw_keys",
    "estimator_key",
    "measure",
    "measure_variance",
    "variance_statistics",
]


class VarianceStats(NamedTuple):
    """Statistics of a gradient estimator at one point (see the module docstring).

    Attributes:
      variance: average variance per coordinate ``V``.
      normalized_variance: ``NV``, variance over second moment (in ``[0, 1]`` per
        coordinate), averaged over the active coordinates.
      snr: ``||ḡ|| / sqrt(P V)``.
      grad_norm: ``||ḡ||``, the norm of the estimated mean gradient.
      active_fraction: fraction of coordinates that some draw moved (non-zero second
        moment).

    Each is a scalar: a float32 ``jax.Array`` when measured from draws
    (:func:`measure_variance`), a numpy float64 from the exact moments
    (:func:`jaxeff.gvar.exact_variance`).
    """

    variance: jax.Array | np.floating
    normalized_variance: jax.Array | np.floating
    snr: jax.Array | np.floating
    grad_norm: jax.Array | np.floating
    active_fraction: jax.Array | np.floating


#: The names of the statistics, in :class:`VarianceStats` order.
STATISTICS = VarianceStats._fields


def draw_keys(key: jax.Array, num_draws: int) -> tuple[jax.Array, jax.Array]:
    """The keys of the ``m`` mean draws and the ``m`` variance draws of one measurement.

    ``keys = jax.random.split(key, 2 m)``: the first ``m`` estimate the mean, the last
    ``m`` the spread. A loop over ``estimator.estimate(state, params, data, k)`` with these
    keys reproduces :func:`measure_variance` draw by draw.
    """
    keys = jax.random.split(key, 2 * num_draws)
    return keys[:num_draws], keys[num_draws:]


def estimator_key(key: jax.Array, name: str) -> jax.Array:
    """The key :func:`measure` gives estimator ``name``: ``fold_in(key, crc32(name))``.

    Derived from the name, not the position, so adding an estimator to a run changes no
    other estimator's draws.
    """
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _sum_all(tree: chex.ArrayTree) -> jax.Array:
    return sum((jnp.sum(x) for x in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


def variance_statistics(mean: chex.ArrayTree, coordinate_variance: chex.ArrayTree) -> VarianceStats:
    r"""The :class:`VarianceStats` from a mean and a per-coordinate variance.

    Args:
      mean: ``ḡ``, a pytree like the parameters.
      coordinate_variance: ``v_c`` per coordinate, a pytree like ``mean``.

    Returns:
      The :class:`VarianceStats` (float32 scalars).
    """
    size = sum(int(jnp.size(x)) for x in jax.tree.leaves(mean))
    total_variance = _sum_all(coordinate_variance)
    second = jax.tree.map(lambda v, mu: v + jnp.square(mu), coordinate_variance, mean)
    active = jax.tree.map(lambda q: q > 0, second)
    num_active = _sum_all(jax.tree.map(lambda a: a.astype(jnp.float32), active))
    ratios = jax.tree.map(
        lambda v, q, a: jnp.where(a, v / jnp.where(a, q, 1.0), 0.0),
        coordinate_variance,
        second,
        active,
    )
    normalized = _sum_all(ratios) / jnp.maximum(num_active, 1.0)
    grad_norm = jnp.sqrt(_sum_all(jax.tree.map(jnp.square, mean)))
    snr = jnp.where(grad_norm == 0, 0.0, grad_norm / jnp.sqrt(total_variance))
    return VarianceStats(
        variance=total_variance / size,
        normalized_variance=normalized,
        snr=snr,
        grad_norm=grad_norm,
        active_fraction=num_active / size,
    )


def _as_float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)


def _measure(estimator, state, params, data, key, mean, *, num_draws):
    mean_keys, variance_keys = draw_keys(key, num_draws)

    def draw(k):
        grad, _ = estimator.estimate(state, params, data, k)
        return _as_float32(grad)

    zeros = jax.tree.map(jnp.zeros_like, _as_float32(params))
    if mean is None:

        def add(total, k):
            return jax.tree.map(jnp.add, total, draw(k)), None

        total, _ = jax.lax.scan(add, zeros, mean_keys)
        mean = jax.tree.map(lambda t: t / num_draws, total)
    else:
        mean = _as_float32(mean)

    def accumulate(dev, k):
        return jax.tree.map(lambda d, g, mu: d + jnp.square(g - mu), dev, draw(k), mean), None

    dev, _ = jax.lax.scan(accumulate, zeros, variance_keys)
    return variance_statistics(mean, jax.tree.map(lambda d: d / num_draws, dev))


_measure_jit = jax.jit(_measure, static_argnames=("estimator", "num_draws"))


def measure_variance(
    estimator: GradientEstimator,
    state: Any,
    params: chex.ArrayTree,
    data: chex.ArrayTree,
    key: jax.Array,
    *,
    num_draws: int = 10,
    mean: chex.ArrayTree | None = None,
) -> VarianceStats:
    r"""Average variance, normalised variance, SNR and norm of one estimator at ``params``.

    Draws ``ĝ_j = estimator.estimate(state, params, data, k_j)`` for the ``2m`` keys of
    :func:`draw_keys`; the first ``m`` give the mean ``ḡ``, the last ``m`` the spread (see
    the module docstring for the formulas). Every draw uses the same ``state``, so the
    draws are i.i.d. and the estimator's state is not advanced. Jit-compiled
    (``estimator`` and ``num_draws`` are static; reuse the same estimator object to reuse
    the compiled function); memory is a few copies of the parameters, whatever ``m``.

    Args:
      estimator: a :class:`jaxeff.gvar.GradientEstimator`.
      state: its state (from ``estimator.init``).
      params: the parameters to measure at.
      data: the dataset, arrays with ``N`` examples along the leading axis.
      key: a PRNG key; the measurement is a deterministic function of it.
      num_draws: ``m``, draws for the mean and again for the spread.
      mean: optional known mean (a pytree like ``params``, e.g. the full gradient); the
        first ``m`` draws are then skipped.

    Returns:
      :class:`VarianceStats` of float32 scalars.

    Example::

      est = sgd_estimator(loss_fn, batch_size=128)
      stats = measure_variance(est, est.init(params, data), params, data, key)
      stats.variance, stats.normalized_variance
    """
    if not isinstance(estimator, GradientEstimator):
        raise TypeError(
            f"`estimator` must be a jaxeff.gvar.GradientEstimator, got {type(estimator).__name__}."
        )
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"`num_draws` must be a positive integer, got {num_draws!r}.")
    # mypy cannot compare two PyTreeDefs: jaxlib's have no type stubs.
    if mean is not None and jax.tree.structure(mean) != jax.tree.structure(params):  # type: ignore[operator]
        raise ValueError(
            "`mean` must have the structure of `params`; got "
            f"{jax.tree.structure(mean)} vs {jax.tree.structure(params)}."
        )
    if not jax.tree.leaves(params):
        raise ValueError("`params` has no arrays; there is no gradient to measure.")
    return _measure_jit(estimator, state, params, data, key, mean, num_draws=num_draws)


def measure(
    estimators: Mapping[str, GradientEstimator],
    states: Mapping[str, Any],
    params: chex.ArrayTree,
    data: chex.ArrayTree,
    key: jax.Array,
    *,
    num_draws: int = 10,
) -> dict[str, VarianceStats]:
    """:func:`measure_variance` for several named estimators at the same parameters.

    Estimator ``name`` draws with :func:`estimator_key` ``(key, name)``.

    Args:
      estimators: ``{name: GradientEstimator}``.
      states: ``{name: state}`` for the same names.
      params: the parameters to measure at.
      data: the dataset.
      key: a PRNG key, separate from any key that training uses.
      num_draws: ``m``.

    Returns:
      ``{name: VarianceStats}`` in the order of ``estimators``.

    Example::

      estimators = {
          "sgd": sgd_estimator(loss_fn, batch_size=B),
          "sgd_2b": sgd_estimator(loss_fn, batch_size=2 * B),
      }
      states = {name: est.init(params, data) for name, est in estimators.items()}
      stats = measure(estimators, states, params, data, jax.random.key(step))
    """
    missing = sorted(set(estimators) - set(states))
    if missing:
        raise ValueError(f"`states` has no state for estimators {missing}.")
    return {
        name: measure_variance(
            est, states[name], params, data, estimator_key(key, name), num_draws=num_draws
        )
        for name, est in estimators.items()
    }
