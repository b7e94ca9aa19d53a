"""The sum of per-example clipped gradients of any JAX loss, at about the cost of one backward pass.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
https://arxiv.org/abs/1607.00133) bounds each example's influence on a step by clipping its
gradient ``g_i = ∇_θ ℓ_i`` to L2 norm ``C`` before summing,

.. math::

  \\bar g = \\frac{1}{n} \\sum_i c_i\\, g_i, \\qquad
  c_i = \\min\\Big(1, \\frac{C}{\\|g_i\\|_2}\\Big),

so that adding or removing one example moves ``ḡ`` by at most ``C / n`` (the sensitivity
that the Gaussian noise is scaled to). ``‖g_i‖`` is the norm over all parameter leaves.
With group-wise clipping each group ``G`` of leaves has its own threshold,
``c_{i,G} = min(1, C_G / ‖g_{i,G}‖)``, and the sensitivity is ``sqrt(Σ_G C_G²) / n``.

Nothing per example of the parameters' size is formed where the per-example engine
(:mod:`jaxeff.pergrad.engine`) has an exact rule. Two algorithms:

* ``"book-keeping"`` (Bu et al., "Differentially Private Optimization on Large Model at
  Small Cost", ICML 2023, https://arxiv.org/abs/2210.00038): one forward and one backward
  pass record each parameter use's operand ``a_i`` and cotangent ``δ_i``; the norms
  ``‖g_i‖`` come from them, and then the clipped sum ``Σ_i c_i a_i δ_iᵀ`` from the same
  records, one contraction per use, as an ordinary backward pass forms its weight gradient.
* ``"ghost"`` (Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", ICLR 2022, https://arxiv.org/abs/2110.05679): the norms pass, then one
  ordinary backward pass of ``Σ_i c_i ℓ_i`` with ``c`` held fixed. It needs no records
  beyond the norms pass, so it holds less memory at once, at the cost of a second
  forward and backward pass; it has no group-wise form.

Leaves the engine sends to the ``vmap`` path (no exact rule, or asked for by
``vmap_leaves``) are clipped together with the fast ones: the norm includes both.

Padding and failures: an example marked ``is_padding_example`` (a Poisson-sampled batch
padded to a fixed shape) contributes nothing, and neither does a real example whose
gradient norm is NaN or inf: its rows are set to zero (not multiplied by zero) before any
sum, so no NaN reaches the other examples' sum. The report says which examples failed.

Assumption checked: examples do not interact (the engine raises
:class:`~jaxeff.pergrad.CouplingError` for a loss that couples them, e.g. BatchNorm in
training mode, whose per-example clipping would not bound the sensitivity).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxeff._extras import require
from jaxeff.pergrad import engine

if TYPE_CHECKING:
    from jax_privacy.clipping import BoundedSensitivityCallable
else:
    _jax_privacy_clipping = require(
        "jax_privacy.clipping", extra="privacy", feature="jaxeff.privacy"
    )
    BoundedSensitivityCallable = _jax_privacy_clipping.BoundedSensitivityCallable

__all__ = ["METHODS", "ClipReport", "clipped_grad"]

METHODS = ("book-keeping", "ghost")


class ClipReport(NamedTuple):
    """Per-example facts of one clipped-gradient call (not privatised: handle with care).

    Attributes:
      values: ``(B,)`` per-example losses ``ℓ_i``.
      grad_norms: ``(B,)`` ``‖g_i‖₂`` before clipping (NaN or inf where it failed).
      group_norms: ``{group: (B,) ‖g_{i,G}‖₂}`` with group-wise clipping, else ``None``.
      non_finite: ``(B,)`` bool: a real (not padding) example whose gradient norm was
        NaN or inf, left out of the sum.
      aux: the loss's auxiliary output with ``has_aux``, else ``None``.
    """

    values: jax.Array
    grad_norms: jax.Array
    group_norms: dict[str, jax.Array] | None
    non_finite: jax.Array
    aux: Any


def _check_norm(value, name: str, allow_inf: bool = False) -> float:
    kind = "a positive number or inf" if allow_inf else "a positive finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {kind}, got {value!r}.")
    number = float(value)
    if not (number > 0 and (allow_inf or math.isfinite(number))):  # NaN fails `number > 0`
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")
    return number


def _check_thresholds(l2_clip_norm):
    """``((prefix, C), ...)`` sorted by prefix, or a float for all-layer clipping."""
    if isinstance(l2_clip_norm, Mapping):
        if not l2_clip_norm:
            raise ValueError("`l2_clip_norm` as a mapping must name at least one group.")
        out = []
        for prefix, c in l2_clip_norm.items():
            if not isinstance(prefix, str):
                raise TypeError(
                    f"`l2_clip_norm` keys must be parameter path prefixes (str), got {prefix!r}."
                )
            out.append(
                (prefix.strip("/"), _check_norm(c, f"l2_clip_norm[{prefix!r}]", allow_inf=True))
            )
        return tuple(sorted(out))
    return _check_norm(l2_clip_norm, "l2_clip_norm", allow_inf=True)


def _group_of(path: str, prefixes) -> str | None:
    """The longest prefix (whole path components) of ``path``; ``""`` matches every path."""
    best = None
    for p in prefixes:
        if (p == "" or path == p or path.startswith(p + "/")) and (
            best is None or len(p) > len(best)
        ):
            best = p
    return best


def _leaf_groups(params, thresholds) -> tuple[list[str], dict[str, float]]:
    """Each leaf's group and each group's threshold (one group ``""`` for a float)."""
    paths = engine.param_paths(params)
    if not isinstance(thresholds, tuple):
        return [""] * len(paths), {"": thresholds}
    prefixes = [p for p, _ in thresholds]
    found = [_group_of(path, prefixes) for path in paths]
    missing = [path for path, g in zip(paths, found, strict=True) if g is None]
    if missing:
        raise ValueError(
            f"`l2_clip_norm` gives no threshold for the parameters {missing}; add their "
            'prefix, or "" for every parameter not named otherwise.'
        )
    groups = [g for g in found if g is not None]
    unused = sorted(set(prefixes) - set(groups))
    if unused:
        raise ValueError(
            f"`l2_clip_norm` names the groups {unused}, which hold no parameter (the "
            f"sensitivity counts every group); parameter paths are {paths}."
        )
    return groups, dict(thresholds)


def _scale(sq_norm, threshold):
    """``min(1, C / ‖g‖)`` from ``‖g‖²``, without dividing by a zero norm."""
    norm = jnp.sqrt(sq_norm)
    return jnp.where(norm > threshold, threshold / jnp.where(norm > 0, norm, 1.0), 1.0)


def _check_padding(is_padding_example, size):
    if is_padding_example is None:
        return jnp.zeros((size,), bool)
    if jnp.shape(is_padding_example) != (size,):
        raise ValueError(
            f"`is_padding_example` must hold one flag per example, shape ({size},), got "
            f"{jnp.shape(is_padding_example)}."
        )
    if jnp.result_type(is_padding_example) != jnp.bool_:
        raise ValueError(
            f"`is_padding_example` must be bool, got {jnp.result_type(is_padding_example)}."
        )
    return jnp.asarray(is_padding_example)


def _norms_and_keep(leaf_sq, groups, thresholds, valid):
    """Group norms², the examples kept and each group's clip factor (0 where not kept)."""
    names = sorted(thresholds)
    group_sq = {g: sum(n for n, lg in zip(leaf_sq, groups, strict=True) if lg == g) for g in names}
    total_sq = sum(group_sq.values())
    finite = jnp.isfinite(total_sq)
    keep = valid & finite
    scales = {g: jnp.where(keep, _scale(group_sq[g], thresholds[g]), 0.0) for g in names}
    return group_sq, total_sq, finite, keep, scales


def _book_keeping(loss_fn, has_aux, chunk_size, vmap_leaves, params, batch, valid, spec):
    groups, thresholds, divisor = spec[0], dict(spec[1]), spec[2]
    col = engine.collect(loss_fn, has_aux, chunk_size, vmap_leaves, params, batch)
    leaf_sq = engine.leaf_sq_norms(col)
    if col.padded:  # B = 1 ran as two rows; the second is a copy with no cotangent
        valid = jnp.concatenate([valid, jnp.zeros((1,), bool)])
    group_sq, total_sq, finite, keep, scales = _norms_and_keep(leaf_sq, groups, thresholds, valid)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    grads = []
    for k, x in enumerate(leaves):
        if col.forms[k]:
            w = scales[groups[k]] / divisor
            g = engine.leaf_weighted_grad(col.forms[k], col.shapes[k], w, keep)
        else:
            g = jnp.zeros(col.shapes[k], jnp.float32)
        grads.append(g.astype(x.dtype))
    rows = slice(0, 1) if col.padded else slice(None)
    report = (col.losses[rows], total_sq[rows], {g: v[rows] for g, v in group_sq.items()})
    return jax.tree_util.tree_unflatten(treedef, grads), report, (~finite & valid)[rows], col.aux


def _ghost(loss_fn, has_aux, chunk_size, vmap_leaves, params, batch, valid, spec):
    groups, thresholds, divisor = spec[0], dict(spec[1]), spec[2]
    stats, aux, _ = engine.one_pass(
        loss_fn, has_aux, False, chunk_size, vmap_leaves, params, batch, None, None
    )
    leaf_sq = jax.tree_util.tree_leaves(stats.sq_norms)
    group_sq, total_sq, finite, keep, scales = _norms_and_keep(leaf_sq, groups, thresholds, valid)
    scale = jax.lax.stop_gradient(scales[""] / divisor)
    # The rows left out are replaced by a kept example (weight 0), so that their NaN or
    # inf values never enter the backward pass's sums (0 * NaN is NaN).
    first = jnp.argmax(keep)

    def fill(x):
        return jnp.where(keep.reshape(-1, *([1] * (x.ndim - 1))), x, x[first])

    safe = jax.tree.map(fill, batch)

    def weighted(p):
        out = loss_fn(p, safe)
        return jnp.sum(scale * (out[0] if has_aux else out).astype(jnp.float32))

    grads = jax.grad(weighted)(params)
    any_kept = jnp.any(keep)
    grads = jax.tree.map(lambda g: jnp.where(any_kept, g, jnp.zeros_like(g)), grads)
    report = (stats.losses, total_sq, group_sq)
    return grads, report, ~finite & valid, aux


_STATIC = ("loss_fn", "has_aux", "chunk_size", "vmap_leaves", "method", "spec")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _clipped_jit(params, batch, valid, *, method, **static):
    run = _book_keeping if method == "book-keeping" else _ghost
    grads, (values, total_sq, group_sq), non_finite, aux = run(
        params=params, batch=batch, valid=valid, **static
    )
    grouped = len(group_sq) > 1 or "" not in group_sq
    report = ClipReport(
        values=values,
        grad_norms=jnp.sqrt(total_sq),
        group_norms={g: jnp.sqrt(v) for g, v in group_sq.items()} if grouped else None,
        non_finite=non_finite,
        aux=aux,
    )
    return grads, report


def clipped_grad(
    loss_fn: Callable[[Any, Any], Any],
    *,
    l2_clip_norm: float | Mapping[str, float],
    method: str = "book-keeping",
    normalize_by: float = 1.0,
    rescale_to_unit_norm: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
    vmap_leaves: Sequence[str] = (),
) -> BoundedSensitivityCallable:
    """A function of ``(params, batch)`` returning the sum of clipped per-example gradients.

    .. math::

      \\frac{1}{n} \\sum_i \\min\\Big(1, \\frac{C}{\\|\\nabla_\\theta \\ell_i\\|_2}\\Big)
      \\nabla_\\theta \\ell_i

    with ``n = normalize_by`` (times ``C`` with ``rescale_to_unit_norm``; the module
    docstring has the algorithms and group-wise clipping). The returned object is
    jax-privacy's ``BoundedSensitivityCallable``: its ``sensitivity()`` (``C / n``, or
    ``sqrt(Σ_G C_G²) / n``, under add/remove-one or zero-out; twice that under
    replace-one) scales jax-privacy's noise mechanisms. Like jax-privacy's
    ``clipped_grad`` with auxiliary outputs, it returns ``(grads, report)`` and takes the
    padding mask as ``is_padding_example``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses (``((B,), aux)`` with
        ``has_aux``), ``params`` any pytree of floating-point arrays (flax linen, equinox,
        haiku, plain JAX, nnx after ``nnx.split``; see :mod:`jaxeff.pergrad.engine`).
        Example ``i``'s loss may depend on example ``i`` only (checked).
      l2_clip_norm: ``C > 0``; or ``{path prefix: C_G}`` for group-wise clipping, each leaf
        in the group of its longest matching prefix (``"layers/0"`` holds
        ``"layers/0/kernel"``; ``""`` holds every leaf not named otherwise). Group-wise
        clipping needs ``method="book-keeping"``. ``inf`` clips nothing (as jax-privacy:
        a non-private baseline through the same function, padding and NaN handling
        included; the sensitivity is then ``inf``).
      method: ``"book-keeping"`` (one pass; default) or ``"ghost"`` (two passes, less
        memory held at once).
      normalize_by: ``n > 0``: the sum is divided by it (the expected batch size ``qN`` for
        a mean over a Poisson-sampled batch; not the drawn count, which is private).
      rescale_to_unit_norm: also divide by ``C`` (by ``sqrt(Σ_G C_G²)`` group-wise), so
        the sensitivity is ``1 / n`` whatever ``C`` (as jax-privacy's option: the learning
        rate then does not depend on the threshold).
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      chunk_size: examples per chunk on the engine's ``vmap`` path.
      vmap_leaves: parameter paths to send to the ``vmap`` path whatever their uses.

    Returns:
      ``grad_fn(params, batch, *, is_padding_example=None) -> (grads, report)``, jitted:
      ``grads`` a pytree like ``params`` (its dtypes), ``report`` a :class:`ClipReport`.
      ``is_padding_example`` is an optional ``(B,)`` bool mask of slots that contribute
      nothing (jax-privacy's keyword).

    Raises:
      CouplingError: the loss lets examples interact.
      TypeError, ValueError: bad arguments, named.

    Example::

      grad_fn = jaxeff.privacy.clipped_grad(loss_fn, l2_clip_norm=1.0, normalize_by=q * N)
      privatizer = jax_privacy.noise_addition.gaussian_privatizer(
          stddev=sigma * grad_fn.sensitivity(), prng_key=jax.random.key(0))
      tx = optax.chain(privatizer, optax.sgd(0.1))
      grads, report = grad_fn(params, batch, is_padding_example=batch["weights"] == 0)
      updates, opt_state = tx.update(grads, opt_state, params)
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    thresholds = _check_thresholds(l2_clip_norm)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if method == "ghost" and isinstance(thresholds, tuple):
        raise ValueError(
            'Group-wise `l2_clip_norm` needs method="book-keeping": ghost clipping scales '
            "each example's whole gradient by one factor."
        )
    normalize_by = _check_norm(normalize_by, "normalize_by")
    if not isinstance(rescale_to_unit_norm, bool):
        raise TypeError(f"`rescale_to_unit_norm` must be a bool, got {rescale_to_unit_norm!r}.")
    if isinstance(thresholds, tuple):
        bound = math.sqrt(sum(c * c for _, c in thresholds))
    else:
        bound = thresholds
    if rescale_to_unit_norm and math.isinf(bound):
        raise ValueError(
            "`rescale_to_unit_norm` divides by the clip norm, which is infinite here: every "
            "gradient would be zero. Give a finite `l2_clip_norm`, or rescale_to_unit_norm=False."
        )
    divisor = normalize_by * bound if rescale_to_unit_norm else normalize_by
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` must be a bool, got {has_aux!r}.")
    vmap_leaves = tuple(vmap_leaves)

    def grad_fn(
        params: chex.ArrayTree,
        batch: chex.ArrayTree,
        *,
        is_padding_example: jax.Array | None = None,
    ) -> tuple[chex.ArrayTree, ClipReport]:
        size, slow = engine.check_args(loss_fn, params, batch, False, chunk_size, vmap_leaves)
        valid = ~_check_padding(is_padding_example, size)
        groups, by_group = _leaf_groups(params, thresholds)
        spec = (tuple(groups), tuple(sorted(by_group.items())), divisor)
        return _clipped_jit(
            params,
            batch,
            valid,
            loss_fn=loss_fn,
            has_aux=has_aux,
            chunk_size=chunk_size,
            vmap_leaves=slow,
            method=method,
            spec=spec,
        )

    return BoundedSensitivityCallable(grad_fn, bound / divisor, has_aux=True)
