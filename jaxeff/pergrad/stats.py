"""Per-example gradient statistics of an unmodified flax nnx model in one forward/backward pass.

:func:`per_example_stats` captures the input ``a`` and backprop signal ``δ`` of every
``nnx.Linear`` and ``nnx.Conv`` call (:mod:`jaxeff.pergrad.capture`), turns them into
squared norms, sums of squares and rank-1 inner products (:mod:`jaxeff.pergrad.rules`),
and sends every other parameter to ``vmap(grad)`` (:mod:`jaxeff.pergrad.reference`).
:func:`value_grad_and_stats` also returns the weighted batch loss and its gradient from
the same pass, so the statistics can ride along an ordinary training step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.core import FrozenDict

from jaxeff.pergrad.capture import capture, find_layers, plan_layers, unfold_conv_input
from jaxeff.pergrad.reference import batch_size_of, check_chunk_size, map_per_example_grads
from jaxeff.pergrad.rules import layer_stats

__all__ = [
    "FAST",
    "VMAP",
    "PerExampleStats",
    "check_directions",
    "per_example_stats",
    "value_grad_and_stats",
]

#: Values of :attr:`PerExampleStats.paths`.
FAST, VMAP = "fast", "vmap"


@flax.struct.dataclass
class PerExampleStats:
    """Per-example gradient statistics of a batch (see :func:`per_example_stats`).

    ``g_{i,p}`` is the gradient of example ``i``'s loss with respect to parameter ``p``.

    Attributes:
      losses: ``(B,)`` per-example losses ``ℓ_i``.
      sq_norms: ``nnx.State`` with the structure of ``nnx.state(model, nnx.Param)`` (its
        ``nnx.Param`` entries hold arrays, as in a gradient from ``nnx.grad``) whose
        entries are ``(B,)``: ``||g_{i,p}||²`` for each parameter ``p`` (kernel and bias
        separately).
      total_sq_norms: ``(B,)``, ``||g_i||² = Σ_p ||g_{i,p}||²`` over all parameters.
      sum_sq: ``nnx.State`` shaped like the parameters: ``Σ_i g_{i,p}²`` per coordinate;
        ``None`` when ``with_sum_sq=False``. With the batch gradient ``ḡ = Σ_i g_i / B``,
        the per-coordinate variance of the per-example gradients is
        ``σ² = sum_sq / B - ḡ²``, and that of a mean over ``b`` examples drawn with
        replacement is ``σ² / b``: no per-example gradient is needed.
      dots: ``(K, B)``, ``Σ_L <g_{i,L}, C_{k,L}>`` summed over the layers ``L`` named in
        ``directions``; ``None`` without directions.
      layer_dots: ``{layer path: (K, B)}``, the same inner products per layer; ``None``
        without directions.
      factors: ``{layer path: (ā, s)}`` for the fast-path layers named in ``directions``:
        ``ā_i = (1/T) Σ_t a_{i,t}`` of shape ``(B, d_in)`` and ``s_i = Σ_t δ_{i,t}`` of
        shape ``(B, d_out)`` (``s_i`` is the bias gradient). ``ā_i s_iᵀ`` is the rank-1
        matrix the gradient clustering of :mod:`jaxeff.clustering` averages into its
        centres (exactly ``G_i`` for a Dense layer on ``(B, d)`` inputs). ``None``
        without directions.
      paths: ``{parameter path: "fast" | "vmap"}`` for every parameter (static).
      reasons: ``{parameter path: why it took the vmap path}`` (static).
    """

    losses: jax.Array
    sq_norms: nnx.State
    total_sq_norms: jax.Array
    sum_sq: nnx.State | None
    dots: jax.Array | None
    layer_dots: dict | None
    factors: dict | None
    paths: FrozenDict = flax.struct.field(pytree_node=False)
    reasons: FrozenDict = flax.struct.field(pytree_node=False)


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


def _follow(model, key):
    """The object at ``key`` (a path tuple, or its parts joined by "/") under ``model``."""
    parts = key.split("/") if isinstance(key, str) else key
    if not isinstance(parts, tuple | list):
        return None
    node = model
    for part in parts:
        try:
            if isinstance(node, nnx.Module) and isinstance(part, str) and hasattr(node, part):
                node = getattr(node, part)
            else:
                node = node[int(part) if isinstance(part, str) and part.isdigit() else part]
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
    return node


def check_directions(model, directions) -> dict:
    """``directions`` checked against ``model``'s layers, keyed by canonical layer path.

    Args:
      model: the ``nnx.Module`` the directions are for.
      directions: ``{layer path: (v, u)}`` as :func:`per_example_stats` takes them (paths
        as tuples or joined by ``"/"``), or ``None``.

    Returns:
      ``{layer path tuple (as nnx.iter_graph lists it): (v, u)}``; empty for ``None``.

    Raises:
      TypeError, ValueError: naming ``directions`` and the layer, for a key that is not an
        ``nnx.Linear``/``nnx.Conv`` of the model, shapes other than ``(K, d_in)`` and
        ``(K, d_out)``, differing ``K`` or a non-floating dtype.
    """
    paths, arrays = _canonical_directions(directions, model)
    return dict(zip(paths, arrays, strict=True))


def _canonical_directions(directions, model):
    """``(layer paths, ((v, u), ...))`` aligned, checked against the model's layers."""
    if directions is None:
        return (), ()
    if not isinstance(directions, Mapping):
        raise TypeError(
            "`directions` must be a mapping {layer path: (v, u)}, got "
            f"{type(directions).__name__}."
        )
    found = find_layers(model)
    by_id = {id(module): layer for layer, module in found}
    names = sorted(layer.name for layer, _ in found)
    paths, arrays, num = [], [], None
    for key, value in directions.items():
        layer = by_id.get(id(_follow(model, key)))
        if layer is None:
            raise ValueError(
                f"`directions` key {key!r} is not an nnx.Linear/nnx.Conv layer of the model; "
                f"layers: {names}."
            )
        path = layer.path
        if not isinstance(value, tuple | list) or len(value) != 2:
            raise ValueError(f"`directions`[{key!r}] must be a pair (v, u), got {value!r}.")
        v, u = value
        for name, x, d in zip("vu", (v, u), (layer.d_in, layer.d_out), strict=True):
            if jnp.ndim(x) != 2 or jnp.shape(x)[1] != d:
                raise ValueError(
                    f"`directions`[{key!r}] {name} must have shape (K, {d}) for layer "
                    f"{layer.name} (d_in={layer.d_in}, d_out={layer.d_out}), got "
                    f"{jnp.shape(x)}."
                )
            if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
                raise ValueError(
                    f"`directions`[{key!r}] {name} must be floating point, got "
                    f"{jnp.result_type(x)}."
                )
        k = {jnp.shape(v)[0], jnp.shape(u)[0]}
        if len(k) != 1 or (num is not None and k != {num}):
            raise ValueError(
                f"`directions` must all hold the same number K of directions; "
                f"{key!r} has v: {jnp.shape(v)}, u: {jnp.shape(u)}"
                + (f", others K = {num}." if num is not None else ".")
            )
        num = k.pop()
        if path in paths:
            raise ValueError(f"`directions` names layer {layer.name} twice.")
        paths.append(path)
        arrays.append((jnp.asarray(v), jnp.asarray(u)))
    return tuple(paths), tuple(arrays)


# ----------------------------------------------------------------------------- fast path


def _positions(layer, inputs, deltas, batch_size):
    """``a`` of shape ``(B, T, d_in)`` and ``δ`` of shape ``(B, T, d_out)`` over all calls."""
    a_parts, d_parts = [], []
    for x, d in zip(inputs, deltas, strict=True):
        if layer.kind == "conv":
            x = unfold_conv_input(layer, x)
        a_parts.append(x.reshape(batch_size, -1, layer.d_in))
        d_parts.append(d.reshape(batch_size, -1, layer.d_out))
    if not a_parts:  # never called: zero gradient
        return jnp.zeros((batch_size, 0, layer.d_in)), jnp.zeros((batch_size, 0, layer.d_out))
    if len(a_parts) == 1:
        return a_parts[0], d_parts[0]
    return jnp.concatenate(a_parts, axis=1), jnp.concatenate(d_parts, axis=1)


def _fast_stats(plans, inputs, deltas, kernel_shapes, directions, opts):
    """Statistics (and, with ``opts.with_grads``, weighted gradients) of the fast layers."""
    grad_weights = None
    if opts.with_grads:
        grad_weights = 1.0 / opts.batch_size if opts.weights is None else opts.weights
    sq, sum_sq, dots, grads, factors = {}, {}, {}, {}, {}
    for plan, xs, ds in zip(plans, inputs, deltas, strict=True):
        layer = plan.layer
        a, delta = _positions(layer, xs, ds, opts.batch_size)
        if layer.path in directions:
            mean_input = jnp.mean(a, axis=1) if a.shape[1] else jnp.zeros(a.shape[::2], a.dtype)
            factors[layer.path] = (mean_input, jnp.sum(delta, axis=1))
        stats = layer_stats(
            a,
            delta,
            use_bias=layer.bias_path is not None,
            with_sum_sq=opts.with_sum_sq,
            direction=directions.get(layer.path),
            grad_weights=grad_weights,
        )
        kernel_shape = kernel_shapes[layer.kernel_path]
        sq[layer.kernel_path] = stats.kernel_sq_norms
        if opts.with_sum_sq:
            sum_sq[layer.kernel_path] = stats.kernel_sum_sq.reshape(kernel_shape)
        if layer.bias_path is not None:
            sq[layer.bias_path] = stats.bias_sq_norms
            if opts.with_sum_sq:
                sum_sq[layer.bias_path] = stats.bias_sum_sq
        if stats.dots is not None:
            dots[layer.path] = stats.dots
        if opts.with_grads:
            grads[layer.kernel_path] = stats.kernel_grad.reshape(kernel_shape)
            if layer.bias_path is not None:
                grads[layer.bias_path] = stats.bias_grad
    return sq, sum_sq, dots, grads, factors


# ----------------------------------------------------------------------------- vmap path


def _vmap_stats(graphdef, params, rest, loss_fn, batch, slow_paths, layers, directions, opts):
    """Statistics (and weighted gradients) of the parameters in ``slow_paths`` from explicit
    per-example gradients."""
    flat = dict(nnx.to_flat_state(params))
    values = {path: flat[path].get_value() for path in slow_paths}
    slow_layers = [
        layer for layer in layers if layer.path in directions and layer.kernel_path in values
    ]
    # micro_grad's transforms see the gradient only. To weight g_i by w_i, each example's
    # loss gains the term c·w_i with c = 0: its gradient with respect to c is w_i, handed
    # to the transform next to g_i, and the loss itself is unchanged.
    weights = opts.weights if opts.with_grads else None
    carrier = None if weights is None else jnp.zeros((), jnp.float32)

    def example_loss(inputs, weighted_example):
        values, carrier = inputs
        example, weight = weighted_example
        state = nnx.from_flat_state(
            {p: (v.replace(values[p]) if p in values else v) for p, v in flat.items()}
        )
        model = nnx.merge(graphdef, state, rest, copy=True)
        loss = loss_fn(model, jax.tree.map(lambda x: x[None], example))[0][0]
        if weight is not None:
            loss = loss + (carrier * weight).astype(loss.dtype)
        return loss

    def metrics_fn(grads):
        grads, _ = grads
        sq = {p: jnp.sum(jnp.square(g.astype(jnp.float32))) for p, g in grads.items()}
        dots = {}
        for layer in slow_layers:
            v, u = directions[layer.path]
            kernel = grads[layer.kernel_path].reshape(layer.d_in, layer.d_out)
            dot = jnp.einsum("io,ki,ko->k", kernel, v, u)
            if layer.bias_path is not None:
                dot = dot + u @ grads[layer.bias_path]
            dots[layer.path] = dot
        return sq, dots

    def transform_fn(grads):
        grads, weight = grads
        grads = {p: g.astype(jnp.promote_types(g.dtype, jnp.float32)) for p, g in grads.items()}
        out = {}
        if opts.with_sum_sq:
            out["sum_sq"] = {p: jnp.square(g) for p, g in grads.items()}
        if opts.with_grads:
            out["grads"] = grads if weight is None else {p: weight * g for p, g in grads.items()}
        return out

    summed, losses, (sq, dots) = map_per_example_grads(
        example_loss,
        (values, carrier),
        (batch, weights),
        chunk_size=opts.chunk_size,
        transform_fn=transform_fn,
        metrics_fn=metrics_fn,
        accumulation=optax.microbatching.AccumulationType.SUM,
    )
    dots = {path: d.T for path, d in dots.items()}
    grads = summed.get("grads", {})
    if opts.with_grads and weights is None:
        grads = {p: g / opts.batch_size for p, g in grads.items()}
    return losses, sq, summed.get("sum_sq", {}), dots, grads


# ----------------------------------------------------------------------------- one pass


class _Options(NamedTuple):
    batch_size: int
    weights: jax.Array | None  # (B,); None: 1/B each
    with_sum_sq: bool
    with_grads: bool
    chunk_size: int | None


def _call_loss(loss_fn, has_aux: bool, model, batch):
    """``(losses, aux)`` from ``loss_fn`` (``aux = None`` without ``has_aux``)."""
    out = loss_fn(model, batch)
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "With `has_aux=True`, `loss_fn` must return a pair ((B,) losses, aux), got "
            f"{type(out).__name__}."
        )
    return out


def _one_pass(
    params,
    rest,
    batch,
    weights,
    direction_arrays,
    *,
    graphdef,
    loss_fn,
    has_aux,
    direction_paths,
    with_sum_sq,
    chunk_size,
    with_grads,
):
    """One forward/backward pass: ``(stats, aux, new_rest, grads)``.

    ``grads`` (an ``nnx.State`` like ``params``, or ``None`` without ``with_grads``) is the
    gradient of ``Σ_i w_i ℓ_i``; ``new_rest`` the model's non-parameter variables after
    the forward pass. Not jitted: runs inside the caller's trace.
    """
    batch_size = batch_size_of(batch)
    call = functools.partial(_call_loss, loss_fn, has_aux)
    plans, loss_shape = plan_layers(
        graphdef, params, rest, lambda m, b: call(m, b)[0], batch, batch_size
    )
    if loss_shape.shape != (batch_size,):
        raise ValueError(
            f"`loss_fn` must return one loss per example, shape ({batch_size},), got "
            f"{loss_shape.shape}."
        )
    if not jnp.issubdtype(loss_shape.dtype, jnp.floating):
        raise ValueError(f"`loss_fn` must return floating-point losses, got {loss_shape.dtype}.")
    directions = dict(zip(direction_paths, direction_arrays, strict=True))
    opts = _Options(batch_size, weights, with_sum_sq, with_grads, chunk_size)

    fast_plans = [plan for plan in plans if plan.fallback is None]
    fast_params = {p for plan in fast_plans for p in plan.layer.param_paths}
    reasons = {p: plan.fallback for plan in plans if plan.fallback for p in plan.layer.param_paths}
    param_paths = [path for path, _ in nnx.to_flat_state(params)]
    slow_paths = [p for p in param_paths if p not in fast_params]
    for p in slow_paths:
        reasons.setdefault(p, "no fast rule for this parameter's module")

    # The forward pass runs even without fast layers: it gives the losses, aux and the
    # model's variable updates.
    losses, aux, new_rest, inputs, deltas = capture(graphdef, params, rest, call, batch, fast_plans)
    kernel_shapes = {path: var.get_value().shape for path, var in nnx.to_flat_state(params)}
    sq, sum_sq, dots, grads, factors = _fast_stats(
        fast_plans, inputs, deltas, kernel_shapes, directions, opts
    )
    if slow_paths:
        _, slow_sq, slow_sum_sq, slow_dots, slow_grads = _vmap_stats(
            graphdef,
            params,
            rest,
            call,
            batch,
            slow_paths,
            [plan.layer for plan in plans],
            directions,
            opts,
        )
        sq.update(slow_sq)
        sum_sq.update(slow_sum_sq)
        dots.update(slow_dots)
        grads.update(slow_grads)

    def as_state(values, dtype_of_param=False):
        def entry(path, var):
            value = values[path]
            return var.replace(value.astype(var.get_value().dtype) if dtype_of_param else value)

        return nnx.map_state(entry, params)

    total = functools.reduce(jnp.add, [sq[p] for p in param_paths])
    layer_dots = {path: dots[path] for path in direction_paths} if direction_paths else None
    stats = PerExampleStats(
        losses=losses,
        sq_norms=as_state(sq),
        total_sq_norms=total,
        sum_sq=as_state(sum_sq) if with_sum_sq else None,
        dots=functools.reduce(jnp.add, layer_dots.values()) if layer_dots else None,
        layer_dots=layer_dots,
        factors=(
            {path: factors[path] for path in direction_paths if path in factors}
            if direction_paths
            else None
        ),
        paths=FrozenDict({p: (FAST if p in fast_params else VMAP) for p in param_paths}),
        reasons=FrozenDict(reasons),
    )
    return stats, aux, new_rest, (as_state(grads, dtype_of_param=True) if with_grads else None)


def _weighted_loss(losses, weights):
    """``Σ_i w_i ℓ_i``, or the mean of ``losses`` when ``weights`` is ``None``."""
    if weights is None:
        return jnp.mean(losses)
    return jnp.sum(weights.astype(losses.dtype) * losses)


def _stats_only(params, rest, batch, direction_arrays, **static):
    return _one_pass(
        params, rest, batch, None, direction_arrays, has_aux=False, with_grads=False, **static
    )[0]


def _value_grad_and_stats(params, rest, batch, weights, direction_arrays, **static):
    stats, aux, new_rest, grads = _one_pass(
        params, rest, batch, weights, direction_arrays, with_grads=True, **static
    )
    return _weighted_loss(stats.losses, weights), aux, new_rest, grads, stats


_STATIC = ("graphdef", "loss_fn", "direction_paths", "with_sum_sq", "chunk_size")
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


def _check_weights(weights, batch_size: int):
    """``weights`` as an array of shape ``(B,)``, floating point; ``None`` stays ``None``."""
    if weights is None:
        return None
    if jnp.shape(weights) != (batch_size,):
        raise ValueError(
            f"`weights` must hold one weight per example, shape ({batch_size},), got "
            f"{jnp.shape(weights)}."
        )
    if not jnp.issubdtype(jnp.result_type(weights), jnp.floating):
        raise ValueError(f"`weights` must be floating point, got {jnp.result_type(weights)}.")
    return jnp.asarray(weights)


def per_example_stats(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    batch,
    *,
    directions: Mapping | None = None,
    with_sum_sq: bool = True,
    chunk_size: int | None = None,
) -> PerExampleStats:
    """Per-example gradient norms, sums of squares and rank-1 inner products, in one pass.

    For example ``i`` with loss ``ℓ_i`` and a Dense/Conv layer with input positions
    ``a_{i,t}`` and backprop signals ``δ_{i,t} = ∂ℓ_i/∂y_{i,t}``, the per-example gradients
    are ``G_i = Σ_t a_{i,t} δ_{i,t}^T`` (kernel) and ``Σ_t δ_{i,t}`` (bias), so

    .. math::

      \\|G_i\\|^2 = \\sum_{s,t} (a_{i,s}\\cdot a_{i,t})(\\delta_{i,s}\\cdot\\delta_{i,t}),
      \\qquad
      \\langle G_i, v u^\\top\\rangle = \\sum_t (v^\\top a_{i,t})(u^\\top \\delta_{i,t}),

    which reduce to ``||a_i||²||δ_i||²`` and ``(v^T a_i)(u^T δ_i)`` for a Dense layer on
    ``(B, d)`` inputs. Every ``nnx.Linear`` and ``nnx.Conv`` call is captured by hooking the
    class's ``__call__`` while the loss is traced (the model is not modified); ``δ`` comes
    from differentiating ``Σ_i ℓ_i`` with respect to zero perturbations of the layer
    outputs, so the cost is about one forward and backward pass without weight gradients,
    plus the contractions of :func:`jaxeff.pergrad.rules.layer_stats`.

    A Dense layer on ``(B, T, d)`` inputs and a Conv layer (input unfolded into patches)
    sum over positions; a layer called several times in one pass (shared weights) sums
    over its calls (they are concatenated along the position axis). Every other parameter
    (``nnx.Embed``, norm scales, custom modules, layers called inside ``lax.scan``/``vmap``,
    grouped or masked convolutions, layers whose parameters are read outside their own
    call, e.g. by a weight penalty in ``loss_fn``) takes the ``vmap(grad)`` path of
    :func:`jaxeff.pergrad.per_example_grads`, restricted to those parameters;
    ``stats.paths`` says which path each parameter took and ``stats.reasons`` why.

    Assumptions: examples do not interact (``ℓ_i`` depends only on example ``i``), and
    every captured layer call has the example axis first. BatchNorm in training mode
    couples examples and is refused; evaluate such models in eval mode. Other stochastic
    layers (dropout) run in the model's current mode; the fast and vmap paths may then
    draw different masks. The model's own variable updates (RNG counters, statistics)
    are discarded.

    Runs jit-compiled (the graph, ``loss_fn``, the direction layers, ``with_sum_sq`` and
    ``chunk_size`` are static; pass the same ``loss_fn`` object to reuse the compiled
    function) and may itself be called inside ``jax.jit``/``nnx.jit``. A batch sharded
    along its leading axis gives the same result as an unsharded one.

    Args:
      model: an unmodified ``nnx.Module`` with ``nnx.Param`` variables.
      loss_fn: ``loss_fn(model, batch) -> (B,)``, one loss per example.
      batch: pytree of arrays with a leading axis of size ``B`` (any ``B >= 1``).
      directions: optional ``{layer path: (v, u)}``; the path is a tuple as in
        ``nnx.iter_graph`` (``("layers", 0)``) or the same joined by ``"/"``
        (``"layers/0"``); ``v`` is ``(K, d_in)`` and ``u`` is ``(K, d_out)`` with the sizes
        of :func:`jaxeff.pergrad.direction_shapes` (the kernel seen as the matrix
        ``kernel.reshape(-1, out_features)``: for a Conv ``d_in`` is
        ``prod(kernel_size) · in_features``). Direction ``k`` of layer ``L`` is the kernel
        ``C = v_k u_k^T`` and the bias ``u_k``, so
        ``<g_{i,L}, C_k> = Σ_t (v_k^T a_{i,t})(u_k^T δ_{i,t}) + u_k^T Σ_t δ_{i,t}``. Layers not
        named contribute nothing to ``dots``. The same ``K`` for every layer.
      with_sum_sq: whether to compute ``sum_sq``. For a layer over ``T > 1`` positions it
        needs each ``G_i`` explicitly (``B·d_in·d_out`` memory); without it the squared
        norms use whichever of the two contractions is cheaper.
      chunk_size: examples per chunk on the vmap path (``None``: all at once).

    Returns:
      A :class:`PerExampleStats`.

    Raises:
      TypeError, ValueError: naming the argument, for a non-nnx ``model``, a model without
        parameters or with BatchNorm in training mode, a ``batch`` without a common
        leading axis, a ``loss_fn`` whose output is not ``(B,)``, or ``directions`` that
        do not match the layers.

    Example::

      def loss_fn(model, batch):
          logits = model(batch["image"])
          return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

      stats = per_example_stats(model, loss_fn, batch)
      stats.total_sq_norms            # (B,)
      stats.sq_norms["fc1"]["kernel"][...]  # (B,)
      stats.paths                      # {("fc1", "kernel"): "fast", ...}
    """
    _check_common(model, loss_fn, batch, with_sum_sq, chunk_size)
    direction_paths, direction_arrays = _canonical_directions(directions, model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _call_jitted(
        _stats_only_jit,
        _stats_only,
        _STATIC,
        graphdef,
        params,
        rest,
        batch,
        direction_arrays,
        loss_fn=loss_fn,
        direction_paths=direction_paths,
        with_sum_sq=with_sum_sq,
        chunk_size=chunk_size,
    )


def value_grad_and_stats(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], Any],
    batch,
    *,
    weights=None,
    directions: Mapping | None = None,
    with_sum_sq: bool = True,
    has_aux: bool = False,
    chunk_size: int | None = None,
):
    """The weighted loss, its gradient and the per-example statistics, from one pass.

    The batch loss is the weighted sum of the per-example losses, and its gradient is
    assembled from the same per-example quantities :func:`per_example_stats` captures:

    .. math::

      L = \\sum_i w_i \\ell_i, \\qquad
      \\nabla_W L = \\sum_i w_i \\sum_t a_{i,t} \\delta_{i,t}^\\top, \\qquad
      \\nabla_b L = \\sum_i w_i \\sum_t \\delta_{i,t},

    for each fast-path (``nnx.Linear``/``nnx.Conv``) layer, with ``δ_{i,t} = ∂ℓ_i/∂y_{i,t}``
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
      weights: optional ``(B,)`` floating-point weights ``w`` (any values, zeros included:
        an example with ``w_i = 0`` still gets its statistics); ``None`` means ``1/B``
        each, i.e. the mean loss.
      directions: optional ``{layer path: (v, u)}`` as in :func:`per_example_stats`.
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
    weights = _check_weights(weights, size)
    direction_paths, direction_arrays = _canonical_directions(directions, model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss, aux, new_rest, grads, stats = _call_jitted(
        _value_grad_and_stats_jit,
        _value_grad_and_stats,
        (*_STATIC, "has_aux"),
        graphdef,
        params,
        rest,
        batch,
        weights,
        direction_arrays,
        loss_fn=loss_fn,
        has_aux=has_aux,
        direction_paths=direction_paths,
        with_sum_sq=with_sum_sq,
        chunk_size=chunk_size,
    )
    nnx.update(model, new_rest)
    return ((loss, aux) if has_aux else loss), grads, stats
