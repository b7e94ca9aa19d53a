"""Exact adversarial robustness of linear classifiers, in closed form.

Binary: weights ``w`` (one example's shape ``S``), bias ``b``, labels ``y ∈ {±1}``,
``f(x) = <w, x> + b``. Against ``||δ||_p <= ε`` the worst case lowers the margin by exactly
``ε ||w||_q`` (``q`` the dual of ``p``), attained at ``δ* = -ε y d*(w)`` with
``d*(w) = argmax_{||d||_p <= 1} <w, d>`` (:func:`jaxeff.robust.maximizing_direction`):

.. math::

  \\min_{||\\delta||_p \\le \\epsilon} y\\,(\\langle w, x + \\delta\\rangle + b)
  = y\\,(\\langle w, x\\rangle + b) - \\epsilon\\, ||w||_q

Multi-class: weights ``W`` of shape ``S + (K,)``, biases ``b`` (``K``), integer labels,
prediction ``argmax_k <W_k, x> + b_k``. A point stays correct under every ``||δ||_p <= ε``
iff every pairwise margin survives its own worst case:

.. math::

  \\min_{j \\ne y} \\big[(W_y - W_j)^\\top x + b_y - b_j - \\epsilon\\, ||W_y - W_j||_q\\big] > 0

(the minimum over ``δ`` and over ``j`` commute), so this robust margin is exact, not a
bound. Each point's certified radius is the ``ε`` at which it reaches 0, and the robust
accuracy curve over any number of ``ε`` values is one comparison, with no attack.

The classifier kind is read from the shapes: ``w.shape == x.shape[1:]`` is binary,
``w.shape[:-1] == x.shape[1:]`` multi-class. An example may have any shape for Lp norms
and rank 1 to 3 for the Fourier norms (:mod:`jaxeff.robust.fourier`).

Faghri, Gowal, Vasconcelos, Fleet, Pedregosa, Le Roux, `Bridging the Gap Between
Adversarial Robustness and Optimization Bias <https://arxiv.org/abs/2102.08868>`_, 2021.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxeff.robust.norms import check_norm, dual_exponent, maximizing_direction, norm, replicated
from jaxeff.robust.projections import check_eps

__all__ = [
    "certified_radius",
    "max_eps_at_accuracy",
    "normalized_margin",
    "robust_accuracy",
    "robust_margin",
    "worst_case_perturbation",
]


class _Pairs(NamedTuple):
    """Each point's margins against every other class and the dual norms that scale ε.

    ``margins[i, j]`` and ``costs[i, j]`` are ``(W_y - W_j)ᵀx_i + b_y - b_j`` and
    ``||W_y - W_j||_q``; ``valid[i, j]`` is false for ``j = y_i``. Binary is one column.
    """

    margins: jax.Array
    costs: jax.Array
    valid: jax.Array


def _is_concrete(x):
    return not isinstance(x, jax.core.Tracer)


def _kind(w, x):
    x_shape, w_shape = jnp.shape(x), jnp.shape(w)
    if len(x_shape) < 1:
        raise ValueError(f"`x` must have a leading batch axis, got shape {x_shape}.")
    if w_shape == x_shape[1:]:
        return "binary"
    if len(w_shape) >= 1 and w_shape[:-1] == x_shape[1:]:
        return "multiclass"
    raise ValueError(
        f"`w` must have shape x.shape[1:] = {x_shape[1:]} (binary) or x.shape[1:] + (K,) "
        f"(multi-class), got {w_shape}."
    )


def _check_labels(kind, w, x, y):
    n = jnp.shape(x)[0]
    if jnp.shape(y) != (n,):
        raise ValueError(
            f"`y` must have shape ({n},), one label per row of `x`, got {jnp.shape(y)}."
        )
    if kind == "binary":
        if _is_concrete(y) and not np.all(np.isin(np.asarray(y), (-1, 1))):
            raise ValueError("`y` must hold binary labels in {-1, +1} (binary `w`).")
        return
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise ValueError(
            f"`y` must hold integer class labels for a multi-class `w`, got dtype "
            f"{jnp.result_type(y)}."
        )
    k = jnp.shape(w)[-1]
    if _is_concrete(y) and n and not (np.min(y) >= 0 and np.max(y) < k):
        raise ValueError(f"`y` must hold class labels in [0, {k}) for `w` with {k} classes.")


def _check_bias(kind, w, b):
    shape = jnp.shape(b)
    allowed = [()] if kind == "binary" else [(), (jnp.shape(w)[-1],)]
    if shape not in allowed:
        expected = "a scalar" if kind == "binary" else f"a scalar or shape ({jnp.shape(w)[-1]},)"
        raise ValueError(f"`b` must be {expected}, got shape {shape}.")


def _check_finite(**arrays):
    for name, a in arrays.items():
        if not _is_concrete(a):
            continue
        with jax.ensure_compile_time_eval():
            finite = bool(jnp.all(jnp.isfinite(jnp.asarray(a))))
        if not finite:
            raise ValueError(f"`{name}` must be finite (it holds NaN or inf).")


def _validate(w, x, y, p, b):
    """Checks the classifier, data and norm; returns the classifier kind and the norm."""
    p = check_norm(p)
    kind = _kind(w, x)
    _check_labels(kind, w, x, y)
    _check_bias(kind, w, b)
    _check_finite(w=w, x=x, b=b)
    return kind, p


def _as_arrays(w, x, y, b):
    w = jnp.asarray(w)
    x = jnp.asarray(x)
    dtype = jnp.result_type(w, x, float)
    return w.astype(dtype), x.astype(dtype), jnp.asarray(y), jnp.asarray(b, dtype)


@functools.partial(jax.jit, static_argnames=("p", "kind"))
def _pairs(w, x, y, b, p, kind):
    """The pairwise margins and costs of validated inputs."""
    q = dual_exponent(p)
    if kind == "binary":
        scores = jnp.tensordot(x, w, axes=w.ndim) + b
        margins = (y.astype(x.dtype) * scores)[:, None]
        costs = jnp.broadcast_to(norm(w, q), margins.shape)
        return _Pairs(margins, costs, jnp.ones(margins.shape, bool))
    scores = jnp.tensordot(x, w, axes=w.ndim - 1) + b
    classes = jnp.moveaxis(w, -1, 0)
    pairwise = jax.lax.map(lambda c: norm(c - classes, q, batch_dims=1), classes)
    # Rows picked by one-hot products rather than gathers: with the batch sharded on an
    # explicit-axes mesh, indexing a replicated table by sharded labels is not allowed.
    true_class = jax.nn.one_hot(y, scores.shape[1], dtype=scores.dtype)
    margins = jnp.sum(true_class * scores, axis=1, keepdims=True) - scores
    return _Pairs(margins, true_class @ pairwise, true_class == 0)


def _eps_values(eps):
    check_eps(eps)
    if jnp.ndim(eps) > 1:
        raise ValueError(
            f"`eps` must be a scalar or a 1-D array of values, got shape {jnp.shape(eps)}."
        )
    return jnp.asarray(eps)


def robust_margin(
    w: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps: ArrayLike,
    p: float | str,
    b: ArrayLike = 0.0,
) -> jax.Array:
    """Each point's exact worst-case margin under ``||δ||_p <= ε``.

    .. math::

      m_i(\\epsilon) = y_i(\\langle w, x_i\\rangle + b) - \\epsilon\\,||w||_q
      \\quad\\text{(binary)},\\qquad
      m_i(\\epsilon) = \\min_{j \\ne y_i} (W_{y_i} - W_j)^\\top x_i + b_{y_i} - b_j
      - \\epsilon\\,||W_{y_i} - W_j||_q

    The point is correctly classified under every such perturbation iff ``m_i(ε) > 0``.

    Args:
      w: ``(*S,)`` binary weights or ``(*S, K)`` multi-class weights.
      x: ``(n, *S)`` points.
      y: ``(n,)`` labels: ``±1`` (binary) or integers in ``[0, K)``.
      eps: radius ``>= 0``, a scalar or a 1-D array of ``E`` radii.
      p: norm of the perturbation: ``1``, ``2``, ``jnp.inf``, any number ``>= 1``,
        ``"fourier_1"`` or ``"fourier_inf"``.
      b: bias, a scalar (binary) or ``(K,)`` (multi-class).

    Returns:
      ``(n,)`` margins for a scalar ``eps``, ``(E, n)`` for a vector.

    Raises:
      ValueError: naming the argument for mismatched shapes, labels outside ``{±1}`` or
        ``[0, K)``, non-finite ``w``, ``x`` or ``b``, an invalid ``p`` or a negative
        ``eps`` (values are checked unless traced).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import robust_margin
      >>> w, x, y = jnp.array([1.0, -2.0]), jnp.array([[3.0, 0.0]]), jnp.array([1])
      >>> print(robust_margin(w, x, y, eps=0.5, p=jnp.inf))
      [1.5]
    """
    kind, p = _validate(w, x, y, p, b)
    eps = _eps_values(eps)
    return _robust_margin(*_as_arrays(w, x, y, b), eps, p, kind)


@functools.partial(jax.jit, static_argnames=("p", "kind"))
def _robust_margin(w, x, y, b, eps, p, kind):
    pairs = _pairs(w, x, y, b, p, kind)
    e = eps[..., None, None]
    worst = jnp.where(pairs.valid, pairs.margins - e * pairs.costs, jnp.inf)
    return jnp.min(worst, axis=-1)


def robust_accuracy(
    w: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps: ArrayLike,
    p: float | str,
    b: ArrayLike = 0.0,
) -> jax.Array:
    """Exact accuracy under the worst perturbation ``||δ||_p <= ε`` of each point.

    ``mean_i [m_i(ε) > 0]`` with the robust margin of :func:`robust_margin`; a vector of
    ``ε`` gives the whole robust-accuracy curve in one call (no attack loop). At ``ε = 0``
    it is the clean accuracy, a point on the decision boundary counting as an error.

    Args:
      w, x, y, p, b: as :func:`robust_margin`.
      eps: radius ``>= 0``, a scalar or a 1-D array of ``E`` radii.

    Returns:
      Scalar, or ``(E,)`` for a vector ``eps``.

    Raises:
      ValueError: as :func:`robust_margin`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import robust_accuracy
      >>> w = jnp.array([1.0, 0.0])
      >>> x, y = jnp.array([[1.0, 5.0], [-3.0, 1.0]]), jnp.array([1, -1])
      >>> print(robust_accuracy(w, x, y, eps=jnp.array([0.0, 2.0, 4.0]), p=2))
      [1.  0.5 0. ]
    """
    kind, p = _validate(w, x, y, p, b)
    eps = _eps_values(eps)
    return _robust_accuracy(*_as_arrays(w, x, y, b), eps, p, kind)


@functools.partial(jax.jit, static_argnames=("p", "kind"))
def _robust_accuracy(w, x, y, b, eps, p, kind):
    return jnp.mean(_robust_margin(w, x, y, b, eps, p, kind) > 0, axis=-1)


def worst_case_perturbation(
    w: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps: ArrayLike,
    p: float | str,
    b: ArrayLike = 0.0,
) -> jax.Array:
    """The perturbation ``||δ||_p <= ε`` of each point that minimises its margin.

    .. math::

      \\delta_i^* = -\\epsilon\\, y_i\\, d^*(w)\\quad\\text{(binary)},\\qquad
      \\delta_i^* = -\\epsilon\\, d^*(W_{y_i} - W_{j^*})\\quad\\text{(multi-class)}

    with ``d*(v) = argmax_{||d||_p <= 1} <v, d>`` (:func:`jaxeff.robust.maximizing_direction`:
    ``sign(w)`` for L∞, ``w / ||w||_2`` for L2, all of ε on the largest ``|w_i|`` for L1,
    ``F⁻¹(W / |W|)`` for Fourier-L∞) and ``j*`` the class with the smallest robust pairwise
    margin. The margin of ``x_i + δ_i*`` is exactly :func:`robust_margin`.

    Args:
      w, x, y, p, b: as :func:`robust_margin`.
      eps: radius ``>= 0``, a scalar.

    Returns:
      ``(n, *S)`` perturbations, the shape of ``x``.

    Raises:
      ValueError: as :func:`robust_margin`, and for a non-scalar ``eps``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import worst_case_perturbation
      >>> w, x, y = jnp.array([1.0, -2.0]), jnp.array([[3.0, 0.0]]), jnp.array([1])
      >>> print(worst_case_perturbation(w, x, y, eps=0.5, p=jnp.inf))
      [[-0.5  0.5]]
    """
    kind, p = _validate(w, x, y, p, b)
    if jnp.ndim(eps) != 0:
        raise ValueError(f"`eps` must be a scalar, got shape {jnp.shape(eps)}.")
    eps = _eps_values(eps)
    return _worst_case_perturbation(*_as_arrays(w, x, y, b), eps, p, kind)


@functools.partial(jax.jit, static_argnames=("p", "kind"))
def _worst_case_perturbation(w, x, y, b, eps, p, kind):
    if kind == "binary":
        y = y.astype(x.dtype).reshape((-1,) + (1,) * w.ndim)
        return (-eps * y * maximizing_direction(w, p)).astype(x.dtype)
    pairs = _pairs(w, x, y, b, p, kind)
    worst = jnp.where(pairs.valid, pairs.margins - eps * pairs.costs, jnp.inf)
    other = jnp.argmin(worst, axis=-1)
    k = w.shape[-1]
    pair = jax.nn.one_hot(y, k, dtype=w.dtype) - jax.nn.one_hot(other, k, dtype=w.dtype)
    difference = (pair @ w.reshape(-1, k).T).reshape(x.shape)
    return (-eps * maximizing_direction(difference, p, batch_dims=1)).astype(x.dtype)


def certified_radius(
    w: ArrayLike, x: ArrayLike, y: ArrayLike, *, p: float | str, b: ArrayLike = 0.0
) -> jax.Array:
    """Each point's exact robust radius: the ``ε`` at which its robust margin reaches 0.

    .. math::

      r_i = \\frac{y_i(\\langle w, x_i\\rangle + b)}{||w||_q}\\quad\\text{(binary)},\\qquad
      r_i = \\min_{j \\ne y_i}
      \\frac{(W_{y_i} - W_j)^\\top x_i + b_{y_i} - b_j}{||W_{y_i} - W_j||_q}

    the ``p``-distance from ``x_i`` to the decision boundary, signed: point ``i`` is
    correct under every ``||δ||_p <= ε`` iff ``ε < r_i``, so ``r_i <= 0`` marks a point
    misclassified (or on the boundary) already at ``ε = 0``. A pair of classes with equal
    weights contributes ``+inf`` if its bias margin is positive, ``-inf`` if negative, 0 if
    zero.

    Args:
      w, x, y, p, b: as :func:`robust_margin`.

    Returns:
      ``(n,)`` signed radii.

    Raises:
      ValueError: as :func:`robust_margin`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import certified_radius
      >>> w, x, y = jnp.array([3.0, -4.0]), jnp.array([[2.0, -1.0]]), jnp.array([1])
      >>> print(certified_radius(w, x, y, p=2), certified_radius(w, x, y, p=jnp.inf))
      [2.] [1.4285715]
    """
    kind, p = _validate(w, x, y, p, b)
    return _certified_radius(*_as_arrays(w, x, y, b), p, kind)


@functools.partial(jax.jit, static_argnames=("p", "kind"))
def _certified_radius(w, x, y, b, p, kind):
    pairs = _pairs(w, x, y, b, p, kind)
    m, c = pairs.margins, pairs.costs
    ratio = jnp.where(c > 0, m / jnp.where(c > 0, c, 1), jnp.sign(m) * jnp.inf)
    ratio = jnp.where(jnp.isnan(ratio), 0, ratio)
    return jnp.min(jnp.where(pairs.valid, ratio, jnp.inf), axis=-1)


def max_eps_at_accuracy(
    w: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    *,
    accuracy: ArrayLike,
    p: float | str,
    b: ArrayLike = 0.0,
) -> jax.Array:
    """The largest radius ``ε`` at which the robust accuracy is still ``>= accuracy``.

    Robust accuracy at ``ε`` is the fraction of points with certified radius ``r_i > ε``
    (:func:`certified_radius`), a non-increasing step function of ``ε``. It stays
    ``>= a`` exactly for ``ε < r_(k)``, the ``k``-th largest radius with
    ``k = ceil(a n)``; this returns that supremum. ``accuracy = 0`` gives ``inf``; a
    value ``<= 0`` means the accuracy is not reached even at ``ε = 0``.

    Args:
      w, x, y, p, b: as :func:`robust_margin`.
      accuracy: target accuracy in ``[0, 1]``, a number or a 1-D array (static values).

    Returns:
      Scalar, or one radius per target accuracy.

    Raises:
      ValueError: as :func:`robust_margin`, and for an ``accuracy`` outside ``[0, 1]``,
        traced, or of rank above 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import max_eps_at_accuracy
      >>> w = jnp.array([1.0, 0.0])
      >>> x, y = jnp.array([[1.0, 5.0], [-3.0, 1.0]]), jnp.array([1, -1])
      >>> print(max_eps_at_accuracy(w, x, y, accuracy=jnp.array([0.5, 1.0]), p=2))
      [3. 1.]
    """
    if isinstance(accuracy, jax.core.Tracer):
        raise ValueError("`accuracy` must be a static value (not traced): it sets an index.")
    target = np.asarray(accuracy, dtype=np.float64)
    if target.ndim > 1 or not np.all((target >= 0) & (target <= 1)):
        raise ValueError(f"`accuracy` must be a number or 1-D array in [0, 1], got {accuracy!r}.")
    radii = certified_radius(w, x, y, p=p, b=b)
    n = radii.shape[0]
    if n == 0:
        raise ValueError("`x` must hold at least one point.")
    # Accuracies given in float32 (e.g. read back from a curve) carry a relative error of
    # about 1e-7; a target within 1e-6 of k/n counts as k/n.
    k = np.ceil(target * n * (1 - 1e-6)).astype(np.int64)
    ordered = -jnp.sort(-replicated(radii))
    return jnp.where(k == 0, math.inf, ordered[np.maximum(k, 1) - 1])


def normalized_margin(
    w: ArrayLike, x: ArrayLike, y: ArrayLike, *, norm: float | str, b: ArrayLike = 0.0
) -> jax.Array:
    """The smallest margin of the data measured in the norm on the weights.

    .. math::

      \\gamma_{||\\cdot||}(w) = \\min_i \\frac{y_i(\\langle w, x_i\\rangle + b)}{||w||}

    (multi-class: the smallest pairwise margin over ``||W_y - W_j||``). This is the
    quantity the max-margin classifier in ``norm`` maximises
    (:func:`jaxeff.robust.max_margin`), and the radius of the largest ``ε``-ball in the dual
    norm that leaves every point correct: ``min_i`` of :func:`certified_radius` with
    ``p = dual_exponent(norm)``.

    Args:
      w, x, y, b: as :func:`robust_margin`.
      norm: the norm on the weights (``1``, ``2``, ``jnp.inf``, any number ``>= 1``,
        ``"fourier_1"``, ``"fourier_inf"``).

    Returns:
      Scalar margin (negative when some point is misclassified).

    Raises:
      ValueError: as :func:`robust_margin`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.robust import normalized_margin
      >>> w, x, y = jnp.array([3.0, -4.0]), jnp.array([[2.0, -1.0]]), jnp.array([1])
      >>> print(normalized_margin(w, x, y, norm=1))
      1.4285715
    """
    return jnp.min(certified_radius(w, x, y, p=dual_exponent(check_norm(norm, "norm")), b=b))
