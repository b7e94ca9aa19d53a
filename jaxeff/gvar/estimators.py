r"""Mini-batch estimators of the mean gradient, as pairs of pure functions (optax style).

The objective is a finite sum over a dataset of ``N`` examples,

.. math::

   f(\theta) = \frac{1}{N} \sum_{i=1}^N \ell_i(\theta), \qquad
   \nabla f(\theta) = \frac{1}{N} \sum_{i=1}^N g_i(\theta), \quad g_i = \nabla \ell_i,

and an estimator returns a random ``ĝ`` with ``E[ĝ] = ∇f(θ)``. Every estimator here is a
:class:`GradientEstimator`, a NamedTuple of two pure functions:

* ``init(params, data) -> state``: whatever the estimator precomputes at a snapshot
  (SVRG's anchor and full gradient; a clustering; sampling probabilities), a pytree;
* ``estimate(state, params, data, key) -> (grad, state)``: one draw of ``ĝ`` at
  ``params``, deterministic given ``key``.

``data`` is a pytree of arrays with the ``N`` examples along the leading axis; it is an
argument (not captured in a closure) so that jit-compiled callers trace it instead of
embedding the dataset in the program. ``loss_fn(params, batch) -> (b,)`` returns one loss
per example of ``batch``; for a flax nnx model, close over its graph::

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss_fn = lambda params, batch: per_example_loss(nnx.merge(graphdef, params, rest), batch)

Estimators that draw examples (SGD, stratified sampling over gradient clusters,
importance sampling) share one form: ``sample_fn`` picks indices and per-example weights
(:class:`Sample`), and the estimate is the weighted sum of per-example gradients,
computed with ONE backward pass of the weighted loss (:func:`weighted_gradient`):

.. math::

   \hat g = \sum_{j=1}^{b} w_j\, g_{i_j}(\theta) = \nabla_\theta \sum_j w_j \ell_{i_j}(\theta).

Uniform sampling has ``w_j = 1/b``; stratified sampling from clusters of sizes ``N_k``
with ``n_k`` draws from cluster ``k`` has ``w = N_k / (N n_k)``; importance sampling with
probabilities ``p_i`` has ``w = 1 / (N b p_i)``. :func:`sampling_estimator` turns any such
sampler into a :class:`GradientEstimator`; per-example statistics the sampler needs (norms,
cluster assignments, from :func:`jaxeff.pergrad.per_example_stats`) are computed by its
``init_fn`` and kept in the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeff.pergrad.chunks import take_rows

__all__ = [
    "GradientEstimator",
    "SVRGState",
    "Sample",
    "mean_gradient",
    "num_examples",
    "sampling_estimator",
    "sgd_estimator",
    "svrg_estimator",
    "uniform_sample",
    "weighted_gradient",
]

LossFn = Callable[[Any, Any], jax.Array]


class Sample(NamedTuple):
    """Examples drawn for one gradient estimate.

    Attributes:
      indices: ``(b,)`` integer indices into the dataset (repeats allowed).
      weights: ``(b,)`` float weights; the estimate is ``Σ_j weights[j] g_{indices[j]}``.

    JAX arrays from the samplers in JAX; numpy arrays from the host-side samplers of
    input pipelines (:mod:`jaxeff.clustering.samplers`).
    """

    indices: jax.Array | np.ndarray
    weights: jax.Array | np.ndarray


class GradientEstimator(NamedTuple):
    """A stochastic estimator of the mean gradient: ``init`` and ``estimate``, both pure.

    Attributes:
      init: ``init(params, data) -> state``.
      estimate: ``estimate(state, params, data, key) -> (grad, new_state)``; ``grad`` is
        shaped like ``params``. Estimators that adapt online return an updated state;
        the measurement (:func:`jaxeff.gvar.measure_variance`) gives every draw the same
        state, so its draws are independent and identically distributed.
    """

    init: Callable[[Any, Any], Any]
    estimate: Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]


class SVRGState(NamedTuple):
    """SVRG's snapshot: the anchor parameters ``θ̃`` and the full gradient ``∇f(θ̃)``."""

    params: Any
    mean_grad: Any


def num_examples(data: chex.ArrayTree) -> int:
    """``N``, the common leading-axis size of the arrays of ``data`` (static)."""
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError(f"`data` must hold at least one array, got {data!r}.")
    if any(not jnp.ndim(x) for x in leaves):
        raise ValueError("`data` leaves must have a leading example axis; found a scalar.")
    sizes = {jnp.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
        shapes = jax.tree.map(jnp.shape, data)
        raise ValueError(f"`data` leaves must share the leading axis size N, got {shapes}.")
    (size,) = sizes
    if size < 1:
        raise ValueError("`data` must hold at least one example.")
    return size


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def weighted_gradient(
    loss_fn: LossFn, params: chex.ArrayTree, data: chex.ArrayTree, sample: Sample
) -> chex.ArrayTree:
    r"""``Σ_j w_j ∇ℓ_{i_j}(θ)``: the gradient of the weighted loss of the sampled examples.

    .. math::

       \nabla_\theta \sum_{j=1}^{b} w_j\, \ell_{i_j}(\theta)

    One forward and backward pass over the ``b`` gathered examples; no per-example gradient
    is formed.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses.
      params: pytree of parameters.
      data: pytree of arrays with ``N`` examples along the leading axis.
      sample: the :class:`Sample` of indices and weights.

    Returns:
      A pytree like ``params``.
    """
    indices = jnp.asarray(sample.indices)
    weights = jnp.asarray(sample.weights)
    if indices.ndim != 1 or weights.shape != indices.shape:
        raise ValueError(
            f"`sample` indices and weights must both have shape (b,), got "
            f"{indices.shape} and {weights.shape}."
        )
    batch = jax.tree.map(lambda x: take_rows(x, indices), data)

    def weighted_loss(params):
        losses = loss_fn(params, batch)
        if jnp.shape(losses) != indices.shape:
            raise ValueError(
                f"`loss_fn` must return one loss per example, shape {indices.shape}, got "
                f"{jnp.shape(losses)}."
            )
        return jnp.sum(weights.astype(losses.dtype) * losses)

    return jax.grad(weighted_loss)(params)


def mean_gradient(
    loss_fn: LossFn, params: chex.ArrayTree, data: chex.ArrayTree, *, chunk_size: int | None = None
) -> chex.ArrayTree:
    r"""The full gradient ``∇f(θ) = (1/N) Σ_i ∇ℓ_i(θ)`` over all of ``data``.

    Runs over chunks of ``chunk_size`` examples one after another (``lax.scan``); the last
    chunk is padded with zero-weight copies of example 0. Pure and jittable.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses.
      params: pytree of parameters.
      data: pytree of arrays with ``N`` examples along the leading axis.
      chunk_size: examples per backward pass (``None``: all ``N`` at once).

    Returns:
      A pytree like ``params``.
    """
    size = num_examples(data)
    if chunk_size is not None:
        _check_positive_int(chunk_size, "chunk_size")
    chunk = size if chunk_size is None else min(chunk_size, size)
    num_chunks = -(-size // chunk)
    padded = num_chunks * chunk
    indices = jnp.concatenate([jnp.arange(size), jnp.zeros(padded - size, jnp.int32)])
    weights = jnp.concatenate(
        [jnp.full((size,), 1.0 / size, jnp.float32), jnp.zeros(padded - size, jnp.float32)]
    )
    if num_chunks == 1:
        return weighted_gradient(loss_fn, params, data, Sample(indices, weights))
    chunks = Sample(indices.reshape(num_chunks, chunk), weights.reshape(num_chunks, chunk))

    def add_chunk(total, part):
        grad = weighted_gradient(loss_fn, params, data, part)
        return jax.tree.map(jnp.add, total, grad), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(add_chunk, zeros, chunks)
    return total


def uniform_sample(key: jax.Array, size: int, batch_size: int, *, replace: bool = True) -> Sample:
    """``batch_size`` indices drawn uniformly from ``range(size)``, each with weight ``1/b``.

    Args:
      key: a PRNG key.
      size: the number of examples ``N``.
      batch_size: ``b``.
      replace: draw with replacement (i.i.d. draws; the variance of the mean of ``b``
        draws is exactly ``σ²/b``) or without (a random subset, as one step of an epoch
        of shuffled batches; variance ``σ²/b · (N - b)/(N - 1)``).

    Returns:
      A :class:`Sample`.
    """
    _check_positive_int(batch_size, "batch_size")
    if not replace and batch_size > size:
        raise ValueError(
            f"`batch_size` ({batch_size}) must not exceed the number of examples ({size}) "
            "when sampling without replacement."
        )
    if replace:
        indices = jax.random.randint(key, (batch_size,), 0, size)
    else:
        indices = jax.random.choice(key, size, (batch_size,), replace=False)
    return Sample(indices.astype(jnp.int32), jnp.full((batch_size,), 1.0 / batch_size))


def sampling_estimator(
    loss_fn: LossFn,
    sample_fn: Callable[[Any, jax.Array, int], Sample],
    *,
    init_fn: Callable[[Any, Any], Any] | None = None,
) -> GradientEstimator:
    r"""An estimator that draws weighted examples and returns their weighted gradient.

    .. math::

       (i, w) \sim \text{sample\_fn}(\text{state}, \text{key}, N), \qquad
       \hat g = \sum_j w_j\, g_{i_j}(\theta).

    It is unbiased when ``E[Σ_j w_j g_{i_j}] = (1/N) Σ_i g_i``, e.g. uniform draws with
    ``w = 1/b``, stratified draws with ``w = N_k/(N n_k)`` or importance sampling with
    ``w = 1/(N b p_i)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses.
      sample_fn: ``sample_fn(state, key, N) -> Sample`` (``N`` is static).
      init_fn: ``init_fn(params, data) -> state``; default an ``optax.EmptyState``.

    Returns:
      A :class:`GradientEstimator`; ``estimate`` returns the state unchanged.

    Example::

      def sample_fn(state, key, size):         # importance sampling, p in the state
        idx = jax.random.choice(key, size, (32,), p=state)
        return Sample(idx, 1.0 / (size * 32 * state[idx]))

      est = sampling_estimator(loss_fn, sample_fn, init_fn=lambda params, data: probs)
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    if not callable(sample_fn):
        raise TypeError(f"`sample_fn` must be callable, got {type(sample_fn).__name__}.")

    def init(params, data):
        del params
        num_examples(data)
        return optax.EmptyState()

    def estimate(state, params, data, key):
        sample = sample_fn(state, key, num_examples(data))
        return weighted_gradient(loss_fn, params, data, sample), state

    return GradientEstimator(init_fn if init_fn is not None else init, estimate)


def sgd_estimator(loss_fn: LossFn, *, batch_size: int, replace: bool = True) -> GradientEstimator:
    r"""Plain mini-batch SGD: the mean gradient of ``b`` uniformly drawn examples.

    .. math::

       \hat g = \frac{1}{b} \sum_{j=1}^{b} g_{i_j}(\theta), \qquad i_j \sim U\{1..N\}.

    With replacement its per-coordinate variance is ``σ²/b`` (``σ²`` the variance of a
    single example's gradient, :func:`jaxeff.gvar.exact_variance`), so SGD with ``2b``
    has half the variance of SGD with ``b``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses.
      batch_size: ``b``.
      replace: see :func:`uniform_sample`.

    Returns:
      A :class:`GradientEstimator` with an empty state.

    Example::

      est = sgd_estimator(loss_fn, batch_size=128)
      state = est.init(params, data)
      grad, state = est.estimate(state, params, data, jax.random.key(0))
    """
    _check_positive_int(batch_size, "batch_size")

    def sample_fn(state, key, size):
        del state
        return uniform_sample(key, size, batch_size, replace=replace)

    return sampling_estimator(loss_fn, sample_fn)


def svrg_estimator(
    loss_fn: LossFn, *, batch_size: int, replace: bool = True, chunk_size: int | None = None
) -> GradientEstimator:
    r"""SVRG: a mini-batch gradient with a control variate from a full-gradient snapshot.

    .. math::

       \hat g(\theta) = \frac{1}{b} \sum_{j=1}^{b}
         \big(g_{i_j}(\theta) - g_{i_j}(\tilde\theta)\big) + \nabla f(\tilde\theta),

    unbiased for ``∇f(θ)`` at any ``θ``. ``init(params, data)`` takes the snapshot:
    ``θ̃ = params`` and ``∇f(θ̃)`` over the whole data (:func:`mean_gradient`). At the
    snapshot itself (``θ = θ̃``) every draw equals ``∇f(θ̃)`` exactly: zero variance; the
    variance grows as ``θ`` moves away from ``θ̃``. Each draw costs two backward passes.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses.
      batch_size: ``b``.
      replace: see :func:`uniform_sample`.
      chunk_size: examples per backward pass of the snapshot's full gradient.

    Returns:
      A :class:`GradientEstimator` whose state is an :class:`SVRGState`.

    References:
      Johnson & Zhang, "Accelerating Stochastic Gradient Descent using Predictive
      Variance Reduction", NeurIPS 2013.
    """
    _check_positive_int(batch_size, "batch_size")
    if chunk_size is not None:
        _check_positive_int(chunk_size, "chunk_size")

    def init(params, data):
        anchor = jax.tree.map(jnp.copy, params)
        return SVRGState(anchor, mean_gradient(loss_fn, params, data, chunk_size=chunk_size))

    def estimate(state, params, data, key):
        sample = uniform_sample(key, num_examples(data), batch_size, replace=replace)
        current = weighted_gradient(loss_fn, params, data, sample)
        anchored = weighted_gradient(loss_fn, state.params, data, sample)
        grad = jax.tree.map(lambda g, a, m: g - a + m, current, anchored, state.mean_grad)
        return grad, state

    return GradientEstimator(init, estimate)
