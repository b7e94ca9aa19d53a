"""Logistic regression penalised by a norm, along a decreasing path of the penalty.

Explicit regularisation reaches the same robust classifiers as the implicit bias of
steepest descent: as ``λ → 0`` the minimiser of the logistic loss plus ``λ ||w||_q``
turns, in direction, into the max-margin classifier in ``q`` (Rosset, Zhu, Hastie 2004),
the classifier most robust to perturbations in the dual norm
(:func:`jaxeff.robust.max_margin`).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxeff.robust.norms import check_norm, dual_exponent
from jaxeff.robust.projections import project

__all__ = ["regularization_path"]

# Backtracking: each step first tries twice the last accepted step size, then halves it
# until the sufficient-decrease test holds; the step stays within 2^±_STEP_RANGE of
# 1 / max_i ||x_i||², the inverse smoothness of the mean logistic loss within a factor 4.
_STEP_RANGE = 40
# Slack of the sufficient-decrease test, in units of the rounding error of its two sides.
_ROUNDING_SLACK = 16
# Above this margin, log softplus(-m) is -m to float32 precision (the rest is e^-m / 2).
_LARGE_MARGIN = 15.0


def _check_inputs(x, y, log_lambdas, steps_per_lambda):
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"`x` must be a non-empty (n, ...) batch of points, got shape {x.shape}.")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("`x` must be finite (it holds NaN or inf).")
    n = x.shape[0]
    if jnp.shape(y) != (n,):
        raise ValueError(
            f"`y` must have shape ({n},), one label per row of `x`, got {jnp.shape(y)}."
        )
    if not isinstance(y, jax.core.Tracer) and not np.all(np.isin(np.asarray(y), (-1, 1))):
        raise ValueError("`y` must hold binary labels in {-1, +1}.")
    if jnp.ndim(log_lambdas) != 1 or jnp.shape(log_lambdas)[0] == 0:
        raise ValueError(
            f"`log_lambdas` must be a non-empty 1-D array, got shape {jnp.shape(log_lambdas)}."
        )
    if not isinstance(log_lambdas, jax.core.Tracer):
        path = np.asarray(log_lambdas, np.float64)
        if not np.all(np.isfinite(path)) or np.any(np.diff(path) > 0):
            raise ValueError(
                f"`log_lambdas` must be finite and non-increasing (λ decreasing), got {path}."
            )
    if (
        isinstance(steps_per_lambda, bool)
        or not isinstance(steps_per_lambda, numbers.Integral)
        or steps_per_lambda < 1
    ):
        raise ValueError(
            f"`steps_per_lambda` must be a positive integer, got {steps_per_lambda!r}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x, jnp.asarray(y, x.dtype), jnp.asarray(log_lambdas, x.dtype)


def _log_logistic(margins):
    """``log softplus(-m)`` per margin, finite for any margin (it tends to ``-m``)."""
    large = margins > _LARGE_MARGIN
    safe = jnp.where(large, 0.0, margins)
    return jnp.where(large, -margins, jnp.log(jax.nn.softplus(-safe)))


def _log_logistic_change(margins, change):
    """``log softplus(-m - δ) - log softplus(-m)`` to relative precision however small ``δ``.

    ``softplus(a + h) - softplus(a) = log1p(σ(a) expm1(h))``, so no two nearly equal values
    are subtracted; where both margins are large the change is ``-δ`` exactly.
    """
    large = (margins > _LARGE_MARGIN) & (margins + change > _LARGE_MARGIN)
    m, d = jnp.where(large, 0.0, margins), jnp.where(large, 0.0, change)
    ratio = jnp.log1p(jax.nn.sigmoid(-m) * jnp.expm1(-d)) / jax.nn.softplus(-m)
    return jnp.where(large, -change, jnp.log1p(jnp.maximum(ratio, -1.0)))


@functools.partial(jax.jit, static_argnames=("norm", "steps_per_lambda"))
def _path(x, y, log_lambdas, *, norm, steps_per_lambda):
    dual = dual_exponent(norm)
    n = x.shape[0]
    base = 1 / jnp.max(jnp.sum(jnp.square(x.reshape(n, -1)), axis=1))
    lowest, highest = base * 2.0**-_STEP_RANGE, base * 2.0**_STEP_RANGE
    tolerance = _ROUNDING_SLACK * jnp.finfo(x.dtype).eps

    def margins_of(w):
        return y * jnp.tensordot(x, w, axes=w.ndim)

    def log_loss(w):  # log L(w)
        return jax.nn.logsumexp(_log_logistic(margins_of(w))) - jnp.log(n)

    def prox(v, t):  # argmin_u t||u|| + ||u - v||² / 2, by Moreau's decomposition
        return v - project(v, dual, t)

    def solve(carry, log_lambda):
        kappa = -log_lambda

        def step(carry, _):
            w, t = carry
            log_value, log_grad = jax.value_and_grad(log_loss)(w)
            value = jnp.exp(kappa + log_value)  # e^κ L(w) = L(w) / λ
            grad = value * log_grad
            margins = margins_of(w)
            shares = jax.nn.softmax(_log_logistic(margins))  # ℓ_i / Σ_j ℓ_j

            def rejected(trial):
                t, _, accepted = trial
                return ~accepted & (t > lowest)

            def shrink(trial):
                t = trial[0] / 2
                candidate = prox(w - t * grad, t)
                move = candidate - w
                # e^κ L(w + move) - e^κ L(w) = e^κ L(w) Σ_i (ℓ_i / Σ_j ℓ_j)(e^{Δ log ℓ_i} - 1):
                # from the change of each margin, without subtracting two nearly equal losses.
                change = _log_logistic_change(margins, margins_of(move))
                terms = jnp.where(shares > 0, shares * jnp.expm1(change), 0.0)
                increase = value * jnp.sum(terms)
                linear, quadratic = jnp.vdot(grad, move), jnp.vdot(move, move) / (2 * t)
                slack = tolerance * (jnp.abs(increase) + jnp.abs(linear) + quadratic)
                accepted = increase <= linear + quadratic + slack
                return t, candidate, accepted & jnp.isfinite(increase)

            first = (jnp.minimum(4 * t, 2 * highest), w, jnp.array(False))
            t, w, _ = jax.lax.while_loop(rejected, shrink, first)
            return (w, t), None

        carry = jax.lax.scan(step, carry, None, length=steps_per_lambda)[0]
        return carry, carry[0]

    w = jnp.zeros(x.shape[1:], x.dtype)
    return jax.lax.scan(solve, (w, base), log_lambdas)[1]


def regularization_path(
    x: ArrayLike,
    y: ArrayLike,
    *,
    norm: float | str,
    log_lambdas: ArrayLike,
    steps_per_lambda: int = 60,
) -> jax.Array:
    """Minimisers of the logistic loss plus ``λ ||w||_q`` along a decreasing path of ``λ``.

    .. math::

      w_\\lambda = \\arg\\min_w \\frac1n \\sum_i
      \\log\\big(1 + e^{-y_i \\langle w, x_i\\rangle}\\big) + \\lambda\\, ||w||_q,
      \\qquad
      \\lim_{\\lambda \\to 0} \\frac{w_\\lambda}{||w_\\lambda||_q}
      = \\arg\\max_{||w||_q \\le 1} \\min_i y_i \\langle w, x_i\\rangle

    on separable data (when the max-margin direction is unique; Rosset, Zhu, Hastie 2004).
    At small ``λ`` the smallest margin of ``w_λ`` is about ``log(1/λ)``: the loss is then a
    soft minimum of the margins, and the normalised margin of ``w_λ`` falls short of the
    max-margin ``γ*_q`` of :func:`jaxeff.robust.max_margin` by a fraction of order
    ``log n / log(1/λ)``. The path reaches the robust classifiers only where ``λ`` itself
    underflows (0.99 of ``γ*`` near ``λ = e^-100`` for Gaussian data with ``d = 100``), so
    ``λ`` is given by its logarithm.

    Each ``λ = e^{-κ}`` is solved in the equivalent form ``min_w e^κ L(w) + ||w||_q``,
    whose smooth part ``exp(κ + log L(w))`` stays finite for any ``κ`` (``log L`` from the
    margins without forming ``L``), by proximal gradient steps (ISTA with backtracking,
    Beck & Teboulle 2009), warm-started from the previous ``λ``:

    .. math::

      w \\leftarrow \\mathrm{prox}_{t||\\cdot||_q}\\big(w - t\\, \\nabla(e^\\kappa L)(w)\\big),
      \\qquad
      \\mathrm{prox}_{t||\\cdot||_q}(v) = v - \\Pi_{\\{||u||_{q^*} \\le t\\}}(v)

    (Moreau's decomposition; ``Π`` is :func:`jaxeff.robust.project` onto the dual-norm
    ball: soft thresholding for L1, shrinking for L2, the L1-ball projection for L∞, the
    same in Fourier coefficients for the Fourier norms). Warm starts keep each solve short:
    from one ``λ`` to the next the smooth part grows by ``e^{Δκ}``, so steps of
    ``log λ`` of a few units suit the default ``steps_per_lambda``.

    Args:
      x: ``(n, *S)`` points (any example shape for Lp, rank 1 to 3 for Fourier norms).
      y: ``(n,)`` labels in ``{-1, +1}``.
      norm: the penalty ``q``: ``1``, ``2``, ``jnp.inf``, any number ``>= 1``,
        ``"fourier_1"`` or ``"fourier_inf"``.
      log_lambdas: ``(K,)`` natural logarithms of ``λ``, non-increasing (e.g.
        ``jnp.linspace(0, -100, 51)``).
      steps_per_lambda: proximal-gradient steps at each ``λ``.

    Returns:
      ``(K, *S)`` the weights at each ``λ``, in the dtype of ``x`` (float32 unless x64 is
      enabled).

    Raises:
      ValueError: naming the argument for a bad shape, non-finite ``x``, labels outside
        ``{±1}``, an invalid ``norm``, a ``log_lambdas`` that is not a finite
        non-increasing 1-D array, or a bad ``steps_per_lambda``.
      RuntimeError: when the weights come out non-finite (a path whose first ``λ`` is
        far below ``||∇L(0)||_*``, or whose steps of ``log λ`` are too large).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import normalized_margin, regularization_path
      >>> x, y = jnp.array([[2.0, 1.0], [-1.0, -3.0]]), jnp.array([1.0, -1.0])
      >>> path = regularization_path(x, y, norm=1, log_lambdas=jnp.linspace(0, -40, 21))
      >>> margin = normalized_margin(path[-1], x, y, norm=1)  # the L1 max-margin is 5/3
      >>> print(path.shape, round(float(margin), 2))
      (21, 2) 1.66

    References:
      Rosset, Zhu, Hastie, `Margin Maximizing Loss Functions
      <https://proceedings.neurips.cc/paper/2003/hash/0fe473396242072e84af286632d3f0ff-Abstract.html>`_,
      NeurIPS 2003 (proceedings 2004).

      Beck, Teboulle, `A Fast Iterative Shrinkage-Thresholding Algorithm for Linear
      Inverse Problems <https://doi.org/10.1137/080716542>`_, SIAM J. Imaging Sciences 2009.
    """
    norm = check_norm(norm, "norm")
    x, y, log_lambdas = _check_inputs(x, y, log_lambdas, steps_per_lambda)
    path = _path(x, y, log_lambdas, norm=norm, steps_per_lambda=int(steps_per_lambda))
    if not isinstance(path, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(path))):
        raise RuntimeError(
            "regularization_path: the weights are not finite; start `log_lambdas` nearer 0 "
            "or take smaller steps along it."
        )
    return path
