"""Capture of ``nnx.Linear`` / ``nnx.Conv`` inputs and backprop signals in unmodified models.

The user's model is never rewritten. While the loss is traced, the ``__call__`` of
``nnx.Linear`` and ``nnx.Conv`` is replaced by a dispatcher that looks the calling
instance up in a registry of hooks (:func:`hooked_layers`); instances without a hook, and
any call outside the context, run the original method. Layers are identified by their
path in the module graph (as ``nnx.iter_graph`` yields it), so a layer reached through two
attributes is one layer.

Two traces per compilation:

* :func:`plan_layers` traces the loss abstractly (``jax.make_jaxpr``) to record every call
  of every layer (shapes, trace level) and to check that each layer's parameters are used
  only inside its own ``__call__``; layers failing a check are sent to the vmap path.
* :func:`capture` runs the loss once with a zero perturbation ``ε`` added to each call's
  output and returns the recorded inputs ``a`` and ``δ = ∂(Σ_i ℓ_i)/∂ε``, which is
  ``∂ℓ_i/∂y_i`` for example ``i`` since examples do not interact.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Mapping

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxeff.pergrad.rules import conv_patches

__all__ = [
    "CallRecord",
    "Layer",
    "LayerPlan",
    "capture",
    "direction_shapes",
    "find_layers",
    "hooked_layers",
    "plan_layers",
    "unfold_conv_input",
]

# The classes with a fast rule and their original __call__, taken before any patching.
_ORIGINAL_CALL = {nnx.Linear: nnx.Linear.__call__, nnx.Conv: nnx.Conv.__call__}


@dataclasses.dataclass(frozen=True)
class Layer:
    """Static description of an ``nnx.Linear`` or ``nnx.Conv`` instance in a model.

    Attributes:
      path: the module's path in the graph, e.g. ``("encoder", "layers", 0)``.
      kind: ``"linear"`` or ``"conv"``.
      d_in: rows of the kernel seen as a matrix ``kernel.reshape(-1, out_features)``: the
        size of one input position ``a_t``, ``in_features`` (Linear) or
        ``prod(kernel_size) · in_features / feature_group_count`` (Conv).
      d_out: ``out_features``.
      kernel_path: path of the kernel in ``nnx.state(model, nnx.Param)``; ``None`` if the
        kernel is not an ``nnx.Param`` (the layer then has no fast rule).
      bias_path: path of the bias; ``None`` without a bias or if it is not an ``nnx.Param``.
      kernel_size, strides, padding, kernel_dilation: convolution geometry, canonical
        tuples (``None`` for Linear).
      unsupported: why the layer's configuration has no fast rule, or ``None``.
    """

    path: tuple
    kind: str
    d_in: int
    d_out: int
    kernel_path: tuple | None
    bias_path: tuple | None
    kernel_size: tuple | None = None
    strides: tuple | None = None
    padding: str | tuple | None = None
    kernel_dilation: tuple | None = None
    unsupported: str | None = None

    @property
    def param_paths(self) -> tuple:
        """The paths of the layer's ``nnx.Param`` variables (kernel, then bias)."""
        return tuple(p for p in (self.kernel_path, self.bias_path) if p is not None)

    @property
    def name(self) -> str:
        return "/".join(map(str, self.path)) or "<root>"


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """Shapes seen by one call of a layer during :func:`plan_layers`."""

    in_shape: tuple
    out_shape: tuple
    out_dtype: jnp.dtype
    same_trace: bool
    patch_shape: tuple | None = None


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """A layer, its calls in one forward pass, and why it takes the vmap path (if it does)."""

    layer: Layer
    calls: tuple[CallRecord, ...]
    fallback: str | None


def _own_call_class(module) -> type | None:
    """The fast-rule class whose ``__call__`` ``module`` runs, or ``None``."""
    for cls in type(module).__mro__:
        if "__call__" in vars(cls):
            return cls if cls in _ORIGINAL_CALL else None
    return None


def _as_tuple(value, rank: int) -> tuple:
    value = 1 if value is None else value
    return (value,) * rank if isinstance(value, int) else tuple(value)


def _canonical_padding(padding, rank: int):
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding),) * rank
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    return pads * rank if len(pads) == 1 else pads


def _conv_unsupported(module) -> str | None:
    if module.conv_general_dilated is not lax.conv_general_dilated:
        return "custom conv_general_dilated"
    if module.feature_group_count != 1:
        return "feature_group_count != 1"
    if module.mask is not None:
        return "masked kernel"
    if any(d != 1 for d in _as_tuple(module.input_dilation, len(module.kernel_size))):
        return "input dilation"
    if module.padding == "CAUSAL" and len(module.kernel_size) != 1:
        return "CAUSAL padding beyond 1-D"
    return None


def _variable_paths(model) -> tuple[dict[int, tuple], dict[int, int]]:
    """``id(variable) -> path`` and ``id(variable) -> number of graph nodes holding it``."""
    paths, holders = {}, {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            paths.setdefault(id(node), path)
        elif nnx.graph.is_graph_node(node):
            for _, child in nnx.iter_children(node):
                if isinstance(child, nnx.Variable):
                    holders[id(child)] = holders.get(id(child), 0) + 1
    return paths, holders


def find_layers(model) -> list[tuple[Layer, nnx.Module]]:
    """Every ``nnx.Linear`` / ``nnx.Conv`` of ``model`` (subclasses that keep their ``__call__``).

    Args:
      model: an ``nnx.Module``.

    Returns:
      ``[(layer, module), ...]`` in graph order, one entry per distinct instance.
    """
    var_paths, holders = _variable_paths(model)
    found = []
    for path, module in nnx.iter_graph(model):
        cls = _own_call_class(module)
        if cls is None:
            continue
        kernel_var = module.kernel
        bias_var = module.bias if module.use_bias else None
        variables = [v for v in (kernel_var, bias_var) if isinstance(v, nnx.Param)]
        if not variables:
            continue
        kernel_path = var_paths[id(kernel_var)] if isinstance(kernel_var, nnx.Param) else None
        bias_path = var_paths[id(bias_var)] if isinstance(bias_var, nnx.Param) else None
        unsupported = None
        if kernel_path is None:
            unsupported = "its kernel is not an nnx.Param"
        elif any(holders.get(id(v), 0) > 1 for v in variables):
            unsupported = "its parameters are shared with another module"
        kernel_shape = kernel_var.get_value().shape
        d_in, d_out = math.prod(kernel_shape[:-1]), kernel_shape[-1]
        if cls is nnx.Linear:
            if module.dot_general is not lax.dot_general:
                unsupported = unsupported or "custom dot_general"
            layer = Layer(
                path,
                "linear",
                d_in,
                d_out,
                kernel_path,
                bias_path,
                unsupported=unsupported,
            )
        else:
            rank = len(module.kernel_size)
            layer = Layer(
                path,
                "conv",
                d_in,
                d_out,
                kernel_path,
                bias_path,
                kernel_size=tuple(module.kernel_size),
                strides=_as_tuple(module.strides, rank),
                padding=_canonical_padding(module.padding, rank),
                kernel_dilation=_as_tuple(module.kernel_dilation, rank),
                unsupported=unsupported or _conv_unsupported(module),
            )
        found.append((layer, module))
    return found


def direction_shapes(model) -> dict[tuple, tuple[int, int]]:
    """The ``(d_in, d_out)`` of each layer's rank-1 directions, keyed by layer path.

    The kernel is seen as the matrix ``kernel.reshape(-1, out_features)``: ``d_in`` is
    ``in_features`` for ``nnx.Linear`` and ``prod(kernel_size) · in_features /
    feature_group_count`` for ``nnx.Conv``; ``d_out`` is ``out_features``. These are the
    layers ``directions`` of :func:`jaxeff.pergrad.per_example_stats` may name.

    Example::

      shapes = direction_shapes(model)     # {("fc1",): (784, 512), ...}
      directions = {p: (jnp.ones((k, i)), jnp.ones((k, o))) for p, (i, o) in shapes.items()}
    """
    return {layer.path: (layer.d_in, layer.d_out) for layer, _ in find_layers(model)}


# ----------------------------------------------------------------------------- hooks

_active_hooks: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "jaxeff_pergrad_hooks", default=None
)
_patch_lock = threading.Lock()
_patch_depth = 0

Hook = Callable[[nnx.Module, jax.Array, Callable], jax.Array]


def _dispatching_call(cls):
    original = _ORIGINAL_CALL[cls]

    @functools.wraps(original)
    def __call__(self, inputs, *args, **kwargs):
        hooks = _active_hooks.get()
        entry = hooks.get(id(self)) if hooks else None
        if entry is None or entry[0] is not self:
            return original(self, inputs, *args, **kwargs)

        def apply(module, x):
            return original(module, x, *args, **kwargs)

        return entry[1](self, inputs, apply)

    return __call__


@contextlib.contextmanager
def hooked_layers(hooks: Mapping[int, tuple[nnx.Module, Hook]]):
    """Routes calls of the given layer instances through hooks, restoring everything on exit.

    Args:
      hooks: ``{id(module): (module, hook)}``; ``hook(module, inputs, apply)`` replaces
        ``module(inputs, ...)``, where ``apply(m, x)`` runs the original ``__call__`` of
        ``m`` on ``x`` with the call's other arguments.

    The classes are patched while at least one context is open (in any thread); the
    registry is per context (``contextvars``), so other instances and other threads run
    the original method.
    """
    global _patch_depth
    with _patch_lock:
        if _patch_depth == 0:
            for cls in _ORIGINAL_CALL:
                cls.__call__ = _dispatching_call(cls)
        _patch_depth += 1
    token = _active_hooks.set(dict(hooks))
    try:
        yield
    finally:
        _active_hooks.reset(token)
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                for cls, original in _ORIGINAL_CALL.items():
                    cls.__call__ = original


def _current_trace():
    return jax.extend.core.get_opaque_trace_state(convention="nnx")


# ----------------------------------------------------------------------------- planning


def _has_example_axis(layer: Layer, record: CallRecord, batch_size: int) -> bool:
    min_ndim = 2 if layer.kind == "linear" else len(layer.kernel_size) + 2
    return (
        len(record.in_shape) >= min_ndim
        and record.in_shape[0] == batch_size
        and record.out_shape[0] == batch_size
    )


def unfold_conv_input(layer: Layer, x):
    """``(N, *out_spatial, d_in)`` patches of a conv input, leading batch axes flattened."""
    spatial_rank = len(layer.kernel_size)
    flat = x.reshape(-1, *x.shape[x.ndim - spatial_rank - 1 :])
    return conv_patches(
        flat,
        kernel_size=layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        kernel_dilation=layer.kernel_dilation,
    )


def _fallback_reason(layer: Layer, calls, batch_size: int) -> str | None:
    if layer.unsupported:
        return layer.unsupported
    for record in calls:
        if not record.same_trace:
            return "called inside a JAX transformation (scan, vmap, remat, ...)"
        if not _has_example_axis(layer, record, batch_size):
            return (
                f"called on an input of shape {record.in_shape} without a leading example "
                f"axis of size {batch_size}"
            )
        if layer.kind == "conv":
            rank = len(layer.kernel_size)
            out_positions = record.out_shape[len(record.out_shape) - rank - 1 : -1]
            if record.patch_shape[1:-1] != out_positions:
                return "unfolded patches do not match the convolution's output"
    return None


def plan_layers(graphdef, params, rest, loss_fn, batch, batch_size: int):
    """Decides which layers take the fast path, from one abstract trace of the loss.

    A layer takes the fast path unless its configuration has no rule, its parameters are
    held by another module too, one of its calls happens inside a JAX transformation or on
    an input without a leading example axis, or its parameters are read outside its own
    ``__call__`` (e.g. a weight penalty in ``loss_fn`` or weights tied by reading
    ``layer.kernel`` elsewhere). The last check traces the loss with each fast candidate's
    parameters replaced by fresh inputs while its calls use the real values, and looks
    whether the fresh inputs are used anywhere.

    Args:
      graphdef, params, rest: the model split as ``nnx.split(model, nnx.Param, ...)``.
      loss_fn: ``loss_fn(model, batch) -> (B,)``.
      batch: the batch (arrays or tracers).
      batch_size: ``B``.

    Returns:
      ``(plans, loss_shape)``: a tuple of :class:`LayerPlan` in graph order, and the
      ``jax.ShapeDtypeStruct`` of ``loss_fn``'s output.
    """

    def candidates(model):
        return [(layer, m) for layer, m in find_layers(model) if layer.unsupported is None]

    records: dict[tuple, list[CallRecord]] = {}
    loss_shape = []

    def probe(params, rest, batch, shadows):
        model = nnx.merge(graphdef, params, rest)
        top = _current_trace()
        hooks = {}
        for (layer, module), layer_shadows in zip(candidates(model), shadows, strict=True):
            clone = nnx.clone(module)  # keeps the real parameters for the layer's own calls
            for var_name, shadow in layer_shadows.items():
                getattr(module, var_name).set_value(shadow)
            records[layer.path] = []

            def hook(module, x, apply, layer=layer, clone=clone):
                y = apply(clone, x)
                patch_shape = None
                if layer.kind == "conv" and x.ndim >= len(layer.kernel_size) + 2:
                    patch_shape = jax.eval_shape(
                        functools.partial(unfold_conv_input, layer), x
                    ).shape
                records[layer.path].append(
                    CallRecord(x.shape, y.shape, y.dtype, _current_trace() == top, patch_shape)
                )
                return y

            hooks[id(module)] = (module, hook)
        with hooked_layers(hooks):
            losses = loss_fn(model, batch)
        loss_shape.append(jax.ShapeDtypeStruct(jnp.shape(losses), jnp.result_type(losses)))
        return losses

    template = nnx.merge(graphdef, params, rest)
    shadows = [
        {
            name: jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype)
            for name in ("kernel", "bias")
            if isinstance(var := getattr(module, name, None), nnx.Param)
        }
        for _, module in candidates(template)
    ]
    jaxpr = jax.make_jaxpr(probe)(params, rest, batch, shadows).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    shadow_vars = jaxpr.invars[len(jaxpr.invars) - len(jax.tree.leaves(shadows)) :]
    shadow_used = jax.tree.unflatten(
        jax.tree.structure(shadows), [id(v) in used for v in shadow_vars]
    )
    outside = {
        layer.path: any(flags.values())
        for (layer, _), flags in zip(candidates(template), shadow_used, strict=True)
    }

    plans = []
    for layer, _ in find_layers(template):
        calls = tuple(records.get(layer.path, ()))
        reason = _fallback_reason(layer, calls, batch_size)
        if reason is None and outside.get(layer.path, False):
            reason = "its parameters are used outside its own __call__"
        plans.append(LayerPlan(layer, calls, reason))
    return tuple(plans), loss_shape[0]


# ----------------------------------------------------------------------------- capture


def capture(graphdef, params, rest, loss_fn, batch, plans):
    """One forward/backward pass returning each fast layer's inputs and backprop signals.

    Differentiates ``Σ_i ℓ_i`` with respect to zero perturbations ``ε`` added to each
    call's output, so ``δ = ∂ℓ_i/∂y_i`` row by row; the parameters are not differentiated
    (their gradients are never formed). With no plans this is the forward pass alone.

    Args:
      graphdef, params, rest: the model split as ``nnx.split(model, nnx.Param, ...)``.
      loss_fn: ``loss_fn(model, batch) -> ((B,) losses, aux)``.
      batch: the batch.
      plans: the :class:`LayerPlan` of the layers to capture (fast path only).

    Returns:
      ``(losses, aux, new_rest, inputs, deltas)``: the ``(B,)`` per-example losses, the
      loss's ``aux``, the model's non-parameter variables after the pass (without sown
      ``nnx.Intermediate`` values), and for each plan a tuple with one array per call: the
      layer's input and ``∂(Σ_i ℓ_i)/∂y``.
    """
    paths = [plan.layer.path for plan in plans]
    eps = [tuple(jnp.zeros(c.out_shape, c.out_dtype) for c in plan.calls) for plan in plans]

    def forward(eps):
        model = nnx.merge(graphdef, params, rest, copy=True)
        modules = {layer.path: module for layer, module in find_layers(model)}
        inputs = [[] for _ in plans]
        hooks = {}
        for j, path in enumerate(paths):

            def hook(module, x, apply, j=j):
                call = len(inputs[j])
                if call >= len(eps[j]):
                    raise RuntimeError(
                        f"Layer {plans[j].layer.name} was called more often than when the "
                        "loss was first traced; `loss_fn` must trace the same way each time."
                    )
                inputs[j].append(x)
                return apply(module, x) + eps[j][call]

            hooks[id(modules[path])] = (modules[path], hook)
        with hooked_layers(hooks):
            losses, aux = loss_fn(model, batch)
        _, _, _, new_rest = nnx.split(model, nnx.Param, nnx.Intermediate, ...)
        return losses, ([tuple(x) for x in inputs], aux, new_rest)

    losses, vjp_fn, (inputs, aux, new_rest) = jax.vjp(forward, eps, has_aux=True)
    (deltas,) = vjp_fn(jnp.ones_like(losses))
    return losses, aux, new_rest, inputs, deltas
