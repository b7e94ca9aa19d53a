"""Max-margin linear classifiers in any weight norm, solved exactly with cvxpy.

The classifier most robust to ``||δ||_p <= ε`` perturbations is the max-margin classifier
in the dual norm ``q`` (Faghri et al. 2021, arXiv 2102.08868, Sec. 3):

.. math::

  \\min_{w, b} ||w||_q \\quad\\text{s.t.}\\quad y_i(\\langle w, x_i\\rangle + b) \\ge 1,

whose robust radius (the largest ``ε`` that leaves every point correct) is
``1 / ||w*||_q``. It is also the direction steepest descent in the norm ``q`` converges to
on separable data with the logistic loss, so it is the reference for
:func:`jaxeff.robust.steepest_descent`.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from jaxeff._extras import require
from jaxeff.robust.fourier import fourier_axes
from jaxeff.robust.norms import _FOURIER_EXPONENT, check_norm

cp = require("cvxpy", extra="robust", feature="jaxeff.robust.max_margin")

__all__ = ["MaxMarginSolution", "max_margin"]

# Linear programs (L1, L∞) go to HiGHS, everything else (QP, SOCP, power cone) to CLARABEL;
# both are interior-point or simplex solvers that install with cvxpy from the registry.
_LP_SOLVER = "HIGHS"
_CONE_SOLVER = "CLARABEL"


class MaxMarginSolution(NamedTuple):
    """The max-margin linear classifier in a weight norm.

    Attributes:
      w: ``np.ndarray`` (float64) of one example's shape: the minimum-norm weights.
      b: the bias as a Python float (``0.0`` when fitted without bias).
      margin: ``1 / ||w||_q`` as a Python float: the largest normalised margin
        ``min_i y_i(<w, x_i> + b) / ||w||_q`` of any linear classifier, i.e. the robust
        radius against perturbations in the dual norm.
    """

    w: np.ndarray
    b: float
    margin: float


def _dft_matrix(example_shape):
    """Real and imaginary parts of the orthonormal DFT as ``(coefficients, d)`` matrices."""
    d = math.prod(example_shape)
    basis = np.eye(d).reshape((d,) + tuple(example_shape))
    axes = fourier_axes(len(example_shape))
    if len(example_shape) == 0:
        basis = basis[..., None]
    if len(axes) == 1:
        coefficients = np.fft.fft(basis, axis=-1, norm="ortho")
    else:
        coefficients = np.fft.fft2(basis, axes=axes, norm="ortho")
    matrix = coefficients.reshape(d, -1).T
    return matrix.real, matrix.imag


def _weight_norm(w, q, example_shape):
    """``||w||_q`` in float64 (numpy), for a canonical norm."""
    if isinstance(q, str):
        real, imag = _dft_matrix(example_shape)
        return float(np.linalg.norm(np.hypot(real @ w, imag @ w), _FOURIER_EXPONENT[q]))
    return float(np.linalg.norm(w, q))


def _objective(w, q, example_shape):
    if q == 1:
        return cp.norm1(w)
    if q == math.inf:
        return cp.norm_inf(w)
    if q == 2:
        return cp.sum_squares(w)
    if isinstance(q, str):
        real, imag = _dft_matrix(example_shape)
        moduli = cp.norm(cp.vstack([real @ w, imag @ w]), 2, axis=0)
        return cp.sum(moduli) if q == "fourier_1" else cp.max(moduli)
    return cp.pnorm(w, q)


def _check_data(x: ArrayLike, y: ArrayLike, bias: bool) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"`x` must be a non-empty (n, ...) batch of points, got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("`x` must be finite (it holds NaN or inf).")
    y = np.asarray(y)
    if y.shape != (x.shape[0],):
        raise ValueError(
            f"`y` must have shape ({x.shape[0]},), one label per row of `x`, got {y.shape}."
        )
    if not np.all(np.isin(y, (-1, 1))):
        raise ValueError("`y` must hold binary labels in {-1, +1}.")
    if bias and np.all(y == y[0]):
        raise ValueError(
            "`y` holds a single class: with `bias=True` every weight vector separates it "
            "with an infinite margin (w = 0, b = ±1); give both classes or `bias=False`."
        )
    return x, y.astype(np.float64)


def max_margin(
    x: ArrayLike, y: ArrayLike, *, norm: float | str, bias: bool = False, solver: str | None = None
) -> MaxMarginSolution:
    """The max-margin linear classifier of separable data in the weight norm ``norm``.

    .. math::

      w^*, b^* = \\arg\\min_{w, b} ||w||_q \\quad\\text{s.t.}\\quad
      y_i(\\langle w, x_i\\rangle + b) \\ge 1,\\qquad \\gamma^* = 1 / ||w^*||_q

    ``norm = q`` is the norm on the weights; the classifier most robust to ``p``
    perturbations is the one with ``norm = dual_exponent(p)`` (L1 weights ↔ L∞
    perturbations, L2 ↔ L2, L∞ ↔ L1, Fourier-L1 ↔ Fourier-L∞). L1 and L∞ are linear
    programs (solved by HiGHS), L2 a quadratic program (``min ||w||²``, CLARABEL), general
    ``p`` a power-cone and the Fourier norms second-order-cone programs (CLARABEL).

    Args:
      x: ``(n, *S)`` points (any example shape for Lp, rank 1 to 3 for Fourier norms).
      y: ``(n,)`` labels in ``{-1, +1}``.
      norm: the weight norm ``q``: ``1``, ``2``, ``jnp.inf``, any number ``>= 1``,
        ``"fourier_1"`` or ``"fourier_inf"``.
      bias: also fit a bias ``b`` (not penalised).
      solver: a cvxpy solver name to override the default (HiGHS for L1/L∞, CLARABEL
        otherwise).

    Returns:
      :class:`MaxMarginSolution` ``(w, b, margin)``, host-side float64 values.

    Raises:
      ValueError: naming the argument for a bad shape, non-finite ``x``, labels outside
        ``{±1}``, a single class with ``bias=True`` or an invalid ``norm``; and when the
        data is not linearly separable (the problem is infeasible).
      RuntimeError: when the solver fails for another reason (its status is in the
        message).

    Example:
      >>> import numpy as np
      >>> from jaxeff.robust import max_margin
      >>> x = np.array([[2.0, 1.0], [-1.0, -3.0]])
      >>> sol = max_margin(x, np.array([1, -1]), norm=np.inf)
      >>> print(np.round(sol.w, 3), round(sol.margin, 3))
      [0.333 0.333] 3.0
    """
    q = check_norm(norm, "norm")
    x, y = _check_data(x, y, bias)
    example_shape = x.shape[1:]
    if isinstance(q, str):
        fourier_axes(len(example_shape))
    features = x.reshape(x.shape[0], -1)
    w = cp.Variable(features.shape[1])
    b = cp.Variable() if bias else None
    constraints = [cp.multiply(y, features @ w + (0.0 if b is None else b)) >= 1]
    problem = cp.Problem(cp.Minimize(_objective(w, q, example_shape)), constraints)
    lp = not isinstance(q, str) and q in (1.0, math.inf)
    chosen = solver or (_LP_SOLVER if lp else _CONE_SOLVER)
    try:
        problem.solve(solver=chosen)
    except cp.error.SolverError as error:
        raise RuntimeError(f"max_margin: the solver {chosen} failed ({error}).") from error
    if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        with_bias = "with" if bias else "without"
        raise ValueError(
            f"`x`, `y` are not linearly separable {with_bias} a bias: the max-margin problem "
            f"min ||w||_{norm} s.t. y_i (w·x_i + b) >= 1 is infeasible (solver {chosen})."
        )
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or w.value is None:
        raise RuntimeError(f"max_margin: the solver {chosen} ended with status {problem.status!r}.")
    if problem.status == cp.OPTIMAL_INACCURATE:
        warnings.warn(
            f"max_margin: the solver {chosen} reports an inaccurate solution.",
            RuntimeWarning,
            stacklevel=2,
        )
    weights = np.asarray(w.value, dtype=np.float64)
    margin = 1.0 / _weight_norm(weights, q, example_shape)
    bias_value = 0.0 if b is None else float(b.value)
    return MaxMarginSolution(weights.reshape(example_shape), bias_value, margin)
