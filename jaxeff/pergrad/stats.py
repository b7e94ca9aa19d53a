"""The nnx form of the per-example engine: an ``nnx.Module`` and ``loss_fn(model, batch)``.

The engine (:mod:`jaxeff.pergrad.engine`, exported as :func:`jaxeff.pergrad.per_example_stats`)
serves any ``loss_fn(params, batch)``. Here the model is split into its ``nnx.Param`` state
and the rest (``nnx.split``), the loss is read as a function of the parameters, and the
results come back as ``nnx.State``; directions, ``paths`` and ``reasons`` are keyed by
parameter path (``"layers/0/kernel"``) exactly as in the engine. :func:`value_grad_and_stats`
also returns the weighted batch loss and its gradient from the same pass and writes the
model's other variable updates back, as ``nnx.value_and_grad`` does, so the statistics can
ride along an nnx training step (:func:`jaxeff.train.make_train_step`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.pergrad import engine
from jaxeff.pergrad.engine import PerExampleStats
from jaxeff.pergrad.reference import batch_size_of, check_chunk_size

__all__ = ["per_example_stats", "value_grad_and_stats"]


# ----------------------------------------------------------------------------- checks


def _check_model(model) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
    if not jax.tree.leaves(nnx.state(model, nnx.Param)):
        raise ValueError("`model` has no nnx.Param variables; there is no gradient to measure.")
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm) and not node.use_running_average:
            name = "/".join(map(str, path))
            raise ValueError(
                f"`model` has BatchNorm {name!r} in training mode: its batch statistics "
                "couple the examples, so per-example gradients are not defined. Call "
                "`model.eval()` (or set use_running_average=True) first."
            )


# ----------------------------------------------------------------------------- one pass


def _one_pass(
    params,
    rest,
    batch,
    weights,
    directions,
    *,
    graphdef,
    loss_fn,
    has_aux,
    with_sum_sq,
    chunk_size,
):
    """``(stats, aux, new_rest, grads)`` from one engine pass; not jitted."""
    batch_size = batch_size_of(batch)

    def flat_loss(p, b):
        model = nnx.merge(graphdef, p, rest, copy=True)
        out = loss_fn(model, b)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    "With `has_aux=True`, `loss_fn` must return a pair ((B,) losses, aux), "
                    f"got {type(out).__name__}."
                )
            losses, aux = out
        else:
            losses, aux = out, None
        if jnp.shape(losses) != (jnp.shape(jax.tree.leaves(b)[0])[0],):
            raise ValueError(
                f"`loss_fn` must return one loss per example, shape ({batch_size},), got "
                f"{jnp.shape(losses)}."
            )
        if not jnp.issubdtype(jnp.result_type(losses), jnp.floating):
            raise ValueError(
                f"`loss_fn` must return floating-point losses, got {jnp.result_type(losses)}."
            )
        # nnx.split's stubs give two filters a result of length 2 or more, not 3.
        return losses, (aux, nnx.split(model, nnx.Param, ...)[2])  # type: ignore[misc]

    stats, (aux, new_rest), grads = engine.one_pass(
        flat_loss, True, with_sum_sq, chunk_size, (), params, batch, weights, directions
    )
    return stats, aux, new_rest, grads


def _stats_only(params, rest, batch, directions, **static):
    return _one_pass(params, rest, batch, None, directions, has_aux=False, **static)[0]


def _value_grad_and_stats(params, rest, batch, weights, directions, **static):
    stats, aux, new_rest, grads = _one_pass(params, rest, batch, weights, directions, **static)
    loss = jnp.sum(weights.astype(stats.losses.dtype) * stats.losses)
    return loss, aux, new_rest, grads, stats


_STATIC = ("graphdef", "loss_fn", "with_sum_sq", "chunk_size")
_stats_only_jit = jax.jit(_stats_only, static_argnames=_STATIC)
_value_grad_and_stats_jit = jax.jit(_value_grad_and_stats, static_argnames=(*_STATIC, "has_aux"))


def _call_jitted(jitted, fn, static_names, graphdef, *args, **static):
    """``jitted(*args, graphdef=graphdef, **static)``, or a fresh jit of ``fn`` when
    ``graphdef`` is not hashable (e.g. an array attribute such as a conv mask)."""
    try:
        hash(graphdef)
    except TypeError:
        fresh = jax.jit(
            functools.partial(fn, graphdef=graphdef),
            static_argnames=[n for n in static_names if n != "graphdef"],
        )
        return fresh(*args, **static)
    return jitted(*args, graphdef=graphdef, **static)


def _check_common(model, loss_fn, batch, with_sum_sq, chunk_size) -> int:
    _check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(with_sum_sq, bool):
        raise TypeError(f"`with_sum_sq` must be a bool, got {with_sum_sq!r}.")
    check_chunk_size(chunk_size)
    return batch_size_of(batch)


def per_example_stats(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    batch: chex.ArrayTree,
    *,
    directions: Mapping[str, jax.Array | tuple[jax.Array, ...]] | None = None,
    with_sum_sq: bool = True,
    chunk_size: int | None = None,
) -> PerExampleStats:
    """:func:`jaxeff.pergrad.per_example_stats` of an nnx model: ``||g_{i,p}||²``,
    ``Σ_i g_{i,p}²`` and ``<g_{i,p}, f_{k,1} ⊗ … ⊗ f_{k,q}>`` for every parameter ``p``.

    For a use ``y_{i,t} = a_{i,t} W`` of a kernel (Linear, Conv, Einsum, LinearGeneral, the
    attention projections, an embedding table) with cotangents ``δ_{i,t} = ∂ℓ_i/∂y_{i,t}``,
    ``g_{i,W} = Σ_t a_{i,t} δ_{i,t}^T`` and

    .. math::

      \\|g_{i,W}\\|^2 = \\sum_{s,t} (a_{i,s}\\cdot a_{i,t})(\\delta_{i,s}\\cdot\\delta_{i,t}),
      \\qquad
      \\langle g_{i,W}, v u^\\top\\rangle = \\sum_t (v^\\top a_{i,t})(u^\\top \\delta_{i,t}),

    with no per-example gradient formed (Faghri et al., "A Study of Gradient Variance in
    Deep Learning", 2020). The model is split with ``nnx.split(model, nnx.Param, ...)``
    and ``loss_fn`` read as a function of the parameters; everything the engine says
    (rules, cross terms of shared parameters, scans, the ``vmap`` path for a leaf used
    otherwise, ``paths``/``reasons``) holds.

    Assumptions: examples do not interact (checked: a coupling loss raises
    :class:`jaxeff.pergrad.tracing.CouplingError` naming the operation; BatchNorm in
    training mode is refused up front). Dropout runs in the model's current mode with one
    mask for the batch. The model's own variable updates (RNG counters) are discarded.
    Jit-compiled (pass the same ``loss_fn`` object to reuse it) and callable inside
    ``jax.jit``/``nnx.jit``; a batch sharded along its leading axis gives the same numbers.

    Args:
      model: an unmodified ``nnx.Module`` with ``nnx.Param`` variables.
      loss_fn: ``loss_fn(model, batch) -> (B,)``, one loss per example.
      batch: pytree of arrays with a leading axis of size ``B`` (any ``B >= 1``).
      directions: optional ``{parameter path: factors}``, paths joined by ``"/"``
        (``"layers/0/kernel"``) and factors as :func:`jaxeff.pergrad.per_example_stats`
        takes them (:func:`jaxeff.pergrad.direction_shapes` gives the cheap split).
      with_sum_sq: whether to compute ``sum_sq``.
      chunk_size: examples per chunk on the vmap path (``None``: all at once).

    Returns:
      A :class:`jaxeff.pergrad.PerExampleStats` whose ``sq_norms`` and ``sum_sq`` are
      ``nnx.State`` shaped like ``nnx.state(model, nnx.Param)``.

    Raises:
      TypeError, ValueError: naming the argument, for a non-nnx ``model``, a model without
        parameters or with BatchNorm in training mode, a ``batch`` without a common
        leading axis, a ``loss_fn`` whose output is not ``(B,)``, or ``directions`` that
        do not match the parameters.

    Example::

      def loss_fn(model, batch):
          logits = model(batch["image"])
          return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

      stats = per_example_stats(model, loss_fn, batch)
      stats.total_sq_norms              # (B,)
      stats.sq_norms["fc1"]["kernel"]   # (B,)
      stats.paths                       # {"fc1/kernel": "fast", ...}
    """
    _check_common(model, loss_fn, batch, with_sum_sq, chunk_size)
    # nnx.split's stubs give two filters a result of length 2 or more, not 3.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    return _call_jitted(
        _stats_only_jit,
        _stats_only,
        _STATIC,
        graphdef,
        params,
        rest,
        batch,
        directions,
        loss_fn=loss_fn,
        with_sum_sq=with_sum_sq,
        chunk_size=chunk_size,
    )


def value_grad_and_stats(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], Any],
    batch: chex.ArrayTree,
    *,
    weights: jax.Array | None = None,
    directions: Mapping[str, jax.Array | tuple[jax.Array, ...]] | None = None,
    with_sum_sq: bool = True,
    has_aux: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array | tuple[jax.Array, Any], nnx.State, PerExampleStats]:
    """The weighted loss, its gradient and the per-example statistics, from one pass.

    The batch loss is the weighted sum of the per-example losses, and its gradient is
    assembled from the same per-example quantities :func:`per_example_stats` captures:

    .. math::

      L = \\sum_i w_i \\ell_i, \\qquad
      \\nabla_W L = \\sum_i w_i \\sum_t a_{i,t} \\delta_{i,t}^\\top, \\qquad
      \\nabla_b L = \\sum_i w_i \\sum_t \\delta_{i,t},

    for each outer-product use of a parameter (Dense, Conv, ...), with ``δ_{i,t} = ∂ℓ_i/∂y_{i,t}``
    from the *unweighted* sum (so the statistics stay those of the per-example gradients
    ``g_i``, whatever the weights), and ``∇_θ L = Σ_i w_i g_i`` for every parameter on the
    vmap path from the per-example gradients that path forms anyway. The weights enter only
    the one contraction over examples that an ordinary backward pass does for the weight
    gradient, so the cost is that of :func:`per_example_stats` plus that contraction: about
    one plain gradient step plus the statistics, with no second forward pass.

    Everything :func:`per_example_stats` says (paths, assumptions, jit, sharding) holds;
    ``stats`` equals ``per_example_stats(model, loss_fn, batch, ...)``.

    Args:
      model: an unmodified ``nnx.Module`` with ``nnx.Param`` variables.
      loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses, or with ``has_aux``
        ``-> ((B,) losses, aux)`` where ``aux`` is a pytree of arrays (e.g. metrics).
      batch: pytree of arrays with a leading axis of size ``B``.
      weights: optional ``(B,)`` floating-point weights ``w`` (finite; concrete non-finite
        weights raise ``ValueError`` naming ``weights``; zeros included:
        an example with ``w_i = 0`` still gets its statistics); ``None`` means ``1/B``
        each, i.e. the mean loss.
      directions: optional ``{parameter path: factors}`` as in :func:`per_example_stats`.
      with_sum_sq: whether to compute ``stats.sum_sq``.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      chunk_size: examples per chunk on the vmap path (``None``: all at once).

    Returns:
      ``(loss, grads, stats)``, or ``((loss, aux), grads, stats)`` with ``has_aux`` (as
      ``jax.value_and_grad``): ``loss`` the scalar ``Σ_i w_i ℓ_i``; ``grads`` an
      ``nnx.State`` with the structure and dtypes of ``nnx.state(model, nnx.Param)``, equal
      to ``jax.grad`` of the weighted loss with respect to it (parameters the loss does not
      use get zeros); ``stats`` a :class:`PerExampleStats`. As with
      ``nnx.value_and_grad``, what the forward pass changes in the model's other variables
      (RNG counters) is written back to ``model``; its parameters are left as they are.

    Raises:
      TypeError, ValueError: as :func:`per_example_stats`, and for ``weights`` that are not
        ``(B,)`` floating point or a ``has_aux`` ``loss_fn`` that does not return a pair.

    Example::

      def loss_fn(model, batch):
          logits = model(batch["image"])
          losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
          return losses, {"accuracy": jnp.mean(logits.argmax(-1) == batch["label"])}

      (loss, aux), grads, stats = value_grad_and_stats(
          model, loss_fn, batch, weights=batch["weights"], has_aux=True
      )
      updates, opt_state = tx.update(grads, opt_state, nnx.state(model, nnx.Param))
    """
    size = _check_common(model, loss_fn, batch, with_sum_sq, chunk_size)
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` must be a bool, got {has_aux!r}.")
    weights = engine.check_weights(weights, size)  # None: 1/B each
    # nnx.split's stubs give two filters a result of length 2 or more, not 3.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    loss, aux, new_rest, grads, stats = _call_jitted(
        _value_grad_and_stats_jit,
        _value_grad_and_stats,
        (*_STATIC, "has_aux"),
        graphdef,
        params,
        rest,
        batch,
        weights,
        directions,
        loss_fn=loss_fn,
        has_aux=has_aux,
        with_sum_sq=with_sum_sq,
        chunk_size=chunk_size,
    )
    nnx.update(model, new_rest)
    return ((loss, aux) if has_aux else loss), grads, stats
