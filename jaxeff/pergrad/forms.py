"""The per-example gradient that one use of a parameter contributes, in its cheapest form.

A use ``u`` (see :mod:`jaxeff.pergrad.tracing`) with batch operands ``x`` and result
cotangent ``δ`` contributes to example ``i``'s gradient of a parameter leaf ``θ``

.. math::

  g_{i,u} = J_{\\theta \\to p}^\\top \\; \\partial_p\\, y(p, x_i)^\\top \\delta_i,

the local vector-Jacobian product of the equation with respect to its parameter operand
``p``, pulled back to the leaf through the parameter-only computation ``θ → p``. Three
forms hold it:

* :class:`Outer` -- ``p`` is a rearrangement of ``θ`` (reshapes, transposes, slices) used
  in a ``dot_general``, as the kernel of a convolution (one feature group; ``a`` is then
  the unfolded input patch) or as the table of a row ``gather``. Then, in ``p``'s layout
  ``(contracting, free)``, ``g_{i,u} = Σ_t a_{i,t} δ_{i,t}^T`` with ``a`` the other
  operand (one-hot rows for a gather) and ``t`` the remaining positions: tokens, pixels,
  scan steps. ``index`` maps each ``(r, c)`` entry to its flat index in ``θ``. Nothing is
  formed per example; :func:`jaxeff.pergrad.rules.layer_stats` contracts ``a`` and ``δ``.
* :class:`Basis` -- ``p`` has ``m ≤`` :data:`BASIS_SIZE` entries (a weight penalty, a
  learned temperature): ``g_{i,u} = Σ_j c_{i,j} H_j`` with ``c_i = ∂_p y^T δ_i`` and ``H_j``
  the pull-back of the ``j``-th unit vector, computed once.
* :class:`Dense` -- anything else whose equation can be re-run on one example (biases,
  normalisation scales, convolutions, embedding tables too large for one-hot rows):
  ``g_{i,u}`` itself, ``(B, *θ.shape)``, from a ``vmap`` over examples of the local ``vjp``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxeff.pergrad.rules import conv_patches
from jaxeff.pergrad.tracing import Use, bind, index_map

__all__ = ["BASIS_SIZE", "ONE_HOT_ENTRIES", "Basis", "Dense", "Outer", "contributions"]

#: Largest parameter operand held as a :class:`Basis` (``m`` pull-backs ``H_j``).
BASIS_SIZE = 16
#: Largest one-hot row operand ``B·T·V`` of a gather held as an :class:`Outer`.
ONE_HOT_ENTRIES = 1 << 26


@dataclasses.dataclass
class Outer:
    """``g_i = scatter_index(Σ_t a_{i,t} δ_{i,t}^T)``: ``a`` ``(B, T, r)``, ``delta``
    ``(B, T, c)``, ``index`` ``(r, c)`` flat leaf indices (numpy, static)."""

    leaf: int
    a: jax.Array
    delta: jax.Array
    index: np.ndarray

    def transposed(self) -> Outer:
        return Outer(self.leaf, self.delta, self.a, self.index.T)


@dataclasses.dataclass
class Basis:
    """``g_i = Σ_j c_{i,j} H_j``: ``coeffs`` ``(B, m)``, ``basis`` ``(m, *leaf_shape)``."""

    leaf: int
    coeffs: jax.Array
    basis: jax.Array


@dataclasses.dataclass
class Dense:
    """``g_i`` itself: ``grads`` ``(B, *leaf_shape)``."""

    leaf: int
    grads: jax.Array


def _move_first(x, axes):
    """Transposes ``axes`` (in order) to the front, keeping the rest in order."""
    rest = [k for k in range(x.ndim) if k not in axes]
    return jnp.transpose(x, (*axes, *rest))


def _outer_dot(use: Use, operands, delta, leaf_shapes):
    """The :class:`Outer` of a ``dot_general`` with one parameter operand, or ``None``."""
    eqn = use.eqn
    if len(use.nodes) != 1 or len(eqn.invars) != 2:
        return None
    ((side, node),) = use.nodes.items()
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return None
    (leaf,) = node.leaves if len(node.leaves) == 1 else (None,)
    if leaf is None:
        return None
    index = index_map(node, leaf_shapes[leaf])
    if index is None:
        return None
    x_side = 1 - side
    x = operands[0]
    steps = len(use.steps)
    x_rank = x.ndim - steps
    p_shape = index.shape
    xc = (lc, rc)[x_side]
    pc = (lc, rc)[side]
    xf = [d for d in range(x_rank) if d not in xc]
    pf = [d for d in range(len(p_shape)) if d not in pc]
    e = use.axes[x_side]
    # Result dims: lhs free then rhs free.
    n_xf, n_pf = len(xf), len(pf)
    x_out = list(range(n_xf)) if x_side == 0 else list(range(n_pf, n_pf + n_xf))
    p_out = list(range(n_xf, n_xf + n_pf)) if x_side == 0 else list(range(n_pf))
    e_out = x_out[xf.index(e)]
    other_xf = [d for d in xf if d != e]
    other_out = [x_out[xf.index(d)] for d in other_xf]
    lead = list(range(steps))
    a = _move_first(x, [steps + e, *lead, *(steps + d for d in other_xf), *(steps + d for d in xc)])
    r = math.prod(p_shape[d] for d in pc)
    c = math.prod(p_shape[d] for d in pf)
    a = a.reshape(a.shape[0], -1, r)
    d = _move_first(
        delta, [steps + e_out, *lead, *(steps + k for k in other_out), *(steps + k for k in p_out)]
    )
    d = d.reshape(d.shape[0], -1, c)
    index = np.transpose(index, (*pc, *pf)).reshape(r, c)
    return Outer(leaf, a, d, index)


def _outer_gather(use: Use, operands, delta, leaf_shapes):
    """The :class:`Outer` of a row lookup ``table[idx]`` from a parameter table, or ``None``."""
    eqn = use.eqn
    if set(use.nodes) != {0}:
        return None
    node = use.nodes[0]
    if len(node.leaves) != 1:
        return None
    (leaf,) = node.leaves
    dn = eqn.params["dimension_numbers"]
    table_shape = tuple(eqn.invars[0].aval.shape)
    idx_shape = tuple(eqn.invars[1].aval.shape)
    out_rank = len(eqn.outvars[0].aval.shape)
    rows = len(idx_shape) - 1
    if (
        tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.start_index_map) != (0,)
        or tuple(getattr(dn, "operand_batching_dims", ())) != ()
        or tuple(dn.offset_dims) != tuple(range(rows, out_rank))
        or idx_shape[-1] != 1
        or tuple(eqn.params["slice_sizes"]) != (1, *table_shape[1:])
    ):
        return None
    index = index_map(node, leaf_shapes[leaf])
    if index is None:
        return None
    (idx,) = operands
    steps = len(use.steps)
    e = use.axes[1]
    vocab = table_shape[0]
    if math.prod(idx.shape[:-1]) * vocab > ONE_HOT_ENTRIES:
        return None
    mode = str(eqn.params.get("mode", ""))
    ids = idx[..., 0]
    if "FILL" not in mode:
        ids = jnp.clip(ids, 0, vocab - 1)
    lead = list(range(steps))
    others = [steps + k for k in range(rows) if k != e]
    ids = _move_first(ids, [steps + e, *lead, *others])
    a = jax.nn.one_hot(ids.reshape(ids.shape[0], -1), vocab, dtype=delta.dtype)
    d = _move_first(delta, [steps + e, *lead, *others])
    c = math.prod(table_shape[1:])
    d = d.reshape(d.shape[0], -1, c)
    return Outer(leaf, a, d, index.reshape(vocab, c))


def _unsharded(eqn):
    """``eqn`` without output shardings: one example's slice is not split over devices."""
    params = dict(eqn.params)
    keys = [k for k in ("out_sharding", "sharding") if params.get(k) is not None]
    for k in keys:
        params[k] = None
    return eqn.replace(params=params) if keys else eqn


def _one_example(use: Use):
    """Applies the use's equation to one example's operands (size-1 example axis), or
    ``None`` when its parameters name the batch size in a way not handled here."""
    eqn = _unsharded(use.eqn)
    if use.same_params:
        return lambda args: bind(eqn, args)[0]
    if eqn.primitive.name == "broadcast_in_dim":  # a parameter broadcast to the batch
        shape = list(eqn.params["shape"])
        shape[use.out_axis] = 1
        dims = eqn.params["broadcast_dimensions"]
        return lambda args: jax.lax.broadcast_in_dim(args[0], tuple(shape), dims)
    return None


def _outer_conv(use: Use, operands, delta, leaf_shapes):
    """The :class:`Outer` of a convolution by a parameter kernel (one feature group, no
    input dilation): unfolded input patches against the output's cotangent, or ``None``."""
    eqn = use.eqn
    params = eqn.params
    if set(use.nodes) != {1} or len(use.nodes[1].leaves) != 1:
        return None
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return None
    if any(d != 1 for d in params["lhs_dilation"]):
        return None
    node = use.nodes[1]
    (leaf,) = node.leaves
    index = index_map(node, leaf_shapes[leaf])
    if index is None:
        return None
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    (x,) = operands
    steps = len(use.steps)
    lead = list(range(steps))
    # Channels last, example axis first, scan steps folded into the examples.
    x = _move_first(x, [steps + lhs_spec[0], *lead, *(steps + d for d in lhs_spec[2:])])
    x = x.reshape(-1, *x.shape[steps + 1 :])  # (B·S, *spatial, c_in)
    kernel_size = tuple(index.shape[d] for d in rhs_spec[2:])
    patches = conv_patches(
        x,
        kernel_size=kernel_size,
        strides=tuple(params["window_strides"]),
        padding=tuple(tuple(p) for p in params["padding"]),
        kernel_dilation=tuple(params["rhs_dilation"]),
    )
    size = delta.shape[steps + out_spec[0]]
    a = patches.reshape(size, -1, patches.shape[-1])
    d = _move_first(delta, [steps + out_spec[0], *lead, *(steps + k for k in out_spec[2:])])
    d = d.reshape(size, -1, d.shape[-1])
    r, c = a.shape[-1], d.shape[-1]
    index = np.transpose(index, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])).reshape(r, c)
    return Outer(leaf, a, d, index)


def _broadcast_grads(use: Use, params, operands, delta):
    """``add``/``sub``/``mul`` by a parameter broadcast over size-1 axes (biases, norm
    scales): the per-example gradient is a sum of ``δ`` (or ``δ·x``) over the broadcast
    axes, with no per-example re-run. ``None`` for other equations."""
    eqn = use.eqn
    name = eqn.primitive.name
    if name not in ("add", "sub", "mul") or len(use.nodes) != 1 or len(eqn.invars) != 2:
        return None
    ((side, _),) = use.nodes.items()
    (p,) = params
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if p.ndim not in (0, len(out_shape)):
        return None
    steps = len(use.steps)
    g = delta
    if name == "sub" and side == 1:
        g = -g
    elif name == "mul":
        (x,) = operands
        g = g * x
    e = use.out_axis
    if p.ndim == 0:
        axes = [k for k in range(g.ndim) if k != steps + e]
        return {side: jnp.sum(g, axis=tuple(axes))}
    axes = [k for k in range(steps)] + [
        steps + d for d in range(p.ndim) if d != e and p.shape[d] == 1 and out_shape[d] != 1
    ]
    g = jnp.sum(g, axis=tuple(axes))  # (*p.shape with B at e), steps gone
    kept = [d for d in range(p.ndim) if d == e or not (p.shape[d] == 1 and out_shape[d] != 1)]
    g = g.reshape([g.shape[kept.index(d)] if d in kept else 1 for d in range(p.ndim)])
    return {side: jnp.expand_dims(jnp.moveaxis(g, e, 0), e + 1).reshape(g.shape[e], *p.shape)}


def _local_grads(use: Use, apply, params, operands, delta):
    """``∂_p y(p, x_i)^T δ_i`` for every example (and scan step, summed), for each P operand.

    Returns ``{operand position: (B, *p.shape)}``.
    """
    eqn = use.eqn
    positions = sorted(use.nodes)
    steps = len(use.steps)
    axes = [a for k, a in enumerate(use.axes) if k not in use.nodes]

    def one(ops, d):
        # One example: its slice keeps a size-1 example axis, so the equation's
        # parameters (shapes, dimension numbers) stay valid.
        ops = [o if a is None else jnp.expand_dims(o, a) for o, a in zip(ops, axes, strict=True)]
        d = jnp.expand_dims(d, use.out_axis)

        def f(*ps):
            args, it_p, it_x = [], iter(ps), iter(ops)
            for k in range(len(eqn.invars)):
                args.append(next(it_p) if k in use.nodes else next(it_x))
            return apply(args)

        _, pull = jax.vjp(f, *params)
        return pull(d.astype(eqn.outvars[0].aval.dtype))

    in_axes = ([None if a is None else a for a in axes], use.out_axis)
    per_example = jax.vmap(one, in_axes=in_axes)
    for _ in range(steps):  # scan steps: map, then sum
        inner = per_example
        per_example = _summed_over_steps(inner, axes)
    grads = _auto_axes(per_example, delta, steps + use.out_axis)(operands, delta)
    return dict(zip(positions, grads, strict=True))


def _auto_axes(fn, delta, axis: int):
    """``fn`` run with the compiler choosing shardings when ``delta``'s example axis is
    split over explicit mesh axes (``vmap`` of some equations, a grouped convolution
    among them, cannot be typed there); its results keep the example axis
    split the same way. ``fn`` itself elsewhere."""
    sharding = jax.typeof(delta).sharding
    if not (sharding.mesh.axis_names and sharding.mesh.are_all_axes_explicit):
        return fn
    spec = sharding.spec[axis] if axis < len(sharding.spec) else None
    return jax.sharding.auto_axes(fn, out_sharding=PartitionSpec(spec))


def _summed_over_steps(fn, axes):
    def mapped(ops, d):
        out = jax.vmap(fn, in_axes=([0] * len(axes), 0))(ops, d)
        return [jnp.sum(o, axis=0) for o in out]

    return mapped


def contributions(use: Use, params, record, delta, leaf_values, leaf_shapes):
    """The forms of one use's per-example gradients: a list over the leaves it touches.

    Args:
      use: the use.
      params: ``{operand position: value}`` of its parameter operands.
      record: its other operands, as recorded by :func:`jaxeff.pergrad.tracing.run`.
      delta: cotangent of its result (with the scan steps first).
      leaf_values: the flat parameter leaves.
      leaf_shapes: their shapes.

    Returns:
      ``(forms, None)``, or ``(None, reason)`` when the use cannot be re-run on one
      example (its parameters then take the ``vmap`` path).
    """
    name = use.eqn.primitive.name
    outer = None
    if name == "dot_general":
        outer = _outer_dot(use, record, delta, leaf_shapes)
    elif name == "gather":
        outer = _outer_gather(use, record, delta, leaf_shapes)
    elif name == "conv_general_dilated":
        outer = _outer_conv(use, record, delta, leaf_shapes)
    if outer is not None:
        return [outer], None
    apply = _one_example(use)
    if apply is None:
        return None, f"`{name}` at {use.where} has a shape that depends on the batch size"
    ordered = sorted(use.nodes)
    p_values = [params[k] for k in ordered]
    grads = _broadcast_grads(use, p_values, record, delta)
    if grads is None:
        grads = _local_grads(use, apply, p_values, record, delta)
    forms: list[Basis | Dense] = []
    for k in ordered:
        node, g = use.nodes[k], grads[k]
        leaves = sorted(node.leaves)

        def pull_back(cot, node=node, leaves=leaves, dtype=params[k].dtype):
            def f(*vals):
                full = list(leaf_values)
                for leaf, v in zip(leaves, vals, strict=True):
                    full[leaf] = v
                return node.evaluate(full)

            _, pull = jax.vjp(f, *(leaf_values[leaf] for leaf in leaves))
            return pull(cot.astype(dtype))

        size = math.prod(g.shape[1:])
        if size <= BASIS_SIZE and not node.is_layout():
            units = jnp.eye(size, dtype=g.dtype).reshape(size, *g.shape[1:])
            basis = jax.vmap(pull_back)(units)
            coeffs = g.reshape(g.shape[0], size)
            forms.extend(Basis(leaf, coeffs, b) for leaf, b in zip(leaves, basis, strict=True))
        else:
            per_leaf = jax.vmap(pull_back)(g)
            forms.extend(Dense(leaf, x) for leaf, x in zip(leaves, per_leaf, strict=True))
    return forms, None
