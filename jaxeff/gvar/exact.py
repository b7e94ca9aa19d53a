r"""Exact gradient variance over the whole dataset, from per-example sums of squares.

For the ``N`` per-example gradients ``g_i`` at ``θ``, the per-coordinate mean and second
moment

.. math::

   \mu_c = \frac1N \sum_i g_{i,c}, \qquad M_c = \frac1N \sum_i g_{i,c}^2, \qquad
   \sigma^2_c = M_c - \mu_c^2

give the exact variance ``σ²`` of a single uniformly drawn example's gradient, with no
per-example gradient formed where the loss allows: :func:`jaxeff.pergrad.value_grad_and_stats`
returns ``Σ_i g_i`` and ``Σ_i g_{i,c}²`` (``sum_sq``) of any ``loss_fn(params, batch)`` from
each parameter use's inputs and backprop signals, in one pass. The mean of ``b`` examples
drawn with replacement has variance ``σ²/b``; drawn without replacement,
``σ²/b · (N - b)/(N - 1)``. :func:`exact_variance` turns these into the statistics that
:func:`jaxeff.gvar.measure_variance` estimates from draws (their limit for many draws
around the exact mean).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.gvar.estimators import num_examples
from jaxeff.gvar.measure import VarianceStats
from jaxeff.pergrad import value_grad_and_stats

__all__ = ["GradientMoments", "exact_variance", "gradient_moments"]


class GradientMoments(NamedTuple):
    """Per-coordinate moments of the per-example gradients over a whole dataset (float64).

    Attributes:
      mean: ``μ = (1/N) Σ_i g_i``, shaped like the parameters.
      second_moment: ``M = (1/N) Σ_i g_i²``, same structure.
      num_examples: ``N``.
      mean_loss: ``(1/N) Σ_i ℓ_i``.
    """

    mean: Any
    second_moment: Any
    num_examples: int
    mean_loss: float


def gradient_moments(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: chex.ArrayTree,
    data: chex.ArrayTree,
    *,
    chunk_size: int | None = None,
) -> GradientMoments:
    r"""Mean and second moment of the per-example gradients over all of ``data``.

    Per chunk, one pass of :func:`jaxeff.pergrad.value_grad_and_stats` with unit weights
    gives ``Σ_i g_i`` and ``Σ_i g_i²`` per coordinate (exact rules where the loss allows,
    ``vmap`` for any other leaf); the sums are accumulated in float64 on the host.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (b,)`` per-example losses (a model with batch
        norm in eval mode).
      params: the parameter pytree.
      data: arrays with ``N`` examples along the leading axis.
      chunk_size: examples per pass (``None``: all at once). A last, smaller chunk
        compiles once more.

    Returns:
      :class:`GradientMoments`.

    Example::

      moments = gradient_moments(loss_fn, params, data, chunk_size=1024)
      exact_variance(moments, batch_size=128).variance   # SGD-128's exact variance
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    size = num_examples(data)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}.")
    chunk = size if chunk_size is None else min(chunk_size, size)
    to64 = functools.partial(jax.tree.map, lambda x: np.asarray(x, np.float64))
    sum_grad = sum_sq = None
    loss_total = 0.0
    for start in range(0, size, chunk):
        batch = jax.tree.map(lambda x, s=start: x[s : s + chunk], data)
        ones = jnp.ones((num_examples(batch),), jnp.float32)
        _, grads, stats = value_grad_and_stats(loss_fn, params, batch, weights=ones)
        grads, squares = to64(grads), to64(stats.sum_sq)
        if sum_grad is None:
            sum_grad, sum_sq = grads, squares
        else:
            sum_grad = jax.tree.map(np.add, sum_grad, grads)
            sum_sq = jax.tree.map(np.add, sum_sq, squares)
        loss_total += float(np.sum(np.asarray(stats.losses, np.float64)))
    mean = jax.tree.map(lambda s: s / size, sum_grad)
    second = jax.tree.map(lambda s: s / size, sum_sq)
    bad = [
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_flatten_with_path((mean, second))[0]
        if not np.all(np.isfinite(x))
    ]
    if bad or not np.isfinite(loss_total):
        raise FloatingPointError(
            f"Per-example gradients are not finite (loss total {loss_total}; leaves {bad})."
        )
    return GradientMoments(mean, second, size, loss_total / size)


def exact_variance(
    moments: GradientMoments, *, batch_size: int = 1, replace: bool = True
) -> VarianceStats:
    r"""The exact :class:`VarianceStats` of SGD with ``batch_size`` examples.

    With ``σ²_c = M_c - μ_c²`` (clipped at 0 against rounding) and
    ``s = 1/b`` (with replacement) or ``s = (N - b)/(b (N - 1))`` (without), the
    estimator's per-coordinate variance is ``v_c = s σ²_c`` and its second moment
    ``v_c + μ_c²``, so

    .. math::

       V = \frac1P \sum_c v_c, \quad
       NV = \operatorname{mean}_{c: M_c > 0} \frac{v_c}{v_c + \mu_c^2}, \quad
       \text{SNR} = \frac{\lVert\mu\rVert}{\sqrt{\sum_c v_c}}, \quad
       \text{grad\_norm} = \lVert\mu\rVert.

    ``batch_size=1`` gives the variance of a single example's gradient.

    Args:
      moments: from :func:`gradient_moments`.
      batch_size: ``b``.
      replace: with replacement (default) or without (``b <= N``).

    Returns:
      :class:`VarianceStats` of numpy float64 scalars.
    """
    if not isinstance(moments, GradientMoments):
        raise TypeError(f"`moments` must be GradientMoments, got {type(moments).__name__}.")
    n = moments.num_examples
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if replace:
        scale = 1.0 / batch_size
    elif batch_size > n:
        raise ValueError(
            f"`batch_size` ({batch_size}) must not exceed N ({n}) without replacement."
        )
    else:
        scale = (n - batch_size) / (batch_size * (n - 1)) if n > 1 else 0.0
    mean = [np.asarray(x, np.float64) for x in jax.tree.leaves(moments.mean)]
    second = [np.asarray(x, np.float64) for x in jax.tree.leaves(moments.second_moment)]
    size = sum(x.size for x in mean)
    var = [scale * np.maximum(m2 - mu**2, 0.0) for mu, m2 in zip(mean, second, strict=True)]
    total_var = sum(float(np.sum(v)) for v in var)
    num_active = sum(int(np.sum(m2 > 0)) for m2 in second)
    ratio_sum = 0.0
    for v, mu, m2 in zip(var, mean, second, strict=True):
        active = m2 > 0
        denom = np.where(active, v + mu**2, 1.0)
        ratio_sum += float(np.sum(np.where(active, v / denom, 0.0)))
    grad_norm = float(np.sqrt(sum(float(np.sum(mu**2)) for mu in mean)))
    if grad_norm == 0:
        snr = 0.0
    elif total_var == 0:
        snr = np.inf
    else:
        snr = grad_norm / np.sqrt(total_var)
    return VarianceStats(
        variance=np.float64(total_var / size),
        normalized_variance=np.float64(ratio_sum / max(num_active, 1)),
        snr=np.float64(snr),
        grad_norm=np.float64(grad_norm),
        active_fraction=np.float64(num_active / size),
    )
