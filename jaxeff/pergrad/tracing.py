"""Where the parameters meet the batch: a reader of a loss's jaxpr.

``loss_fn(params, batch) -> (B,)`` is traced twice, with ``B`` and ``B + 1`` examples. The
two jaxprs have the same equations; the axis whose size changes by one is the example axis
of that value. Every value is

* **P**: computed from parameters (and constants) only; it keeps a :class:`Node`, the
  recipe that recomputes it from the parameter leaves;
* **C**: a constant (a :class:`Node` without leaves);
* **X**: it depends on the batch and carries the example axis.

An equation with a P operand and an X result is a *use* of the parameters (a Dense
``dot_general``, a bias ``add``, a convolution, an embedding ``gather``, ...). The loss is
then re-run by :func:`run` with a zero perturbation ``ε_u`` added to the result of every use
``u`` and the use's batch operands recorded; one ``vjp`` with respect to the ``ε`` gives
every ``δ_u = ∂(Σ_i ℓ_i)/∂y_u``. Because examples do not interact, example ``i``'s slice of
``δ_u`` is ``∂ℓ_i/∂y_u``, and the per-example gradient of a parameter is the sum over its
uses of the local gradient of the use (see :mod:`jaxeff.pergrad.forms`).

Uses inside ``jit``/``pjit``, ``closed_call``, ``checkpoint``/remat and
``custom_jvp``/``custom_vjp`` calls are found in the called jaxpr. Uses inside the body of a
``lax.scan`` whose parameters enter as constants are found in the body: the body records
its operands as extra scanned outputs and takes its ``ε`` as extra scanned inputs, so the
``L`` steps become ``L`` positions of one use. A parameter carried through a scan, scanned
over, or used in a ``while_loop`` or ``cond`` makes that equation *opaque*: its parameters
take the ``vmap`` path.

The reader refuses a loss that couples examples: a value that depends on the batch but has
no example axis (a mean over the batch, BatchNorm statistics), two example axes (an
in-batch similarity matrix), or an operation along the example axis (a contraction, a
cumulative sum, a sort, a slice, a gather that indexes it) raises :class:`CouplingError`
naming the operation and where it was written.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

__all__ = ["CouplingError", "Node", "Trace", "Use", "run", "trace"]


class CouplingError(ValueError):
    """The loss lets examples interact, so per-example gradients are not defined by it."""


# Kinds of value.
P, C, X = "P", "C", "X"

_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_CUSTOM = {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}
_REMAT = ("remat", "remat2", "checkpoint")

# Primitives that act element by element (operands broadcast only over size-1 axes).
_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp complex conj
    convert_element_type copy copy_p cos cosh digamma div erf erf_inv erfc exp exp2 expm1
    floor imag integer_pow is_finite igamma igammac lgamma log log1p logistic max min mul ne
    eq ge gt le lt neg nextafter not or pow real reduce_precision rem round rsqrt select_n
    sign sin sinh sqrt square stop_gradient sub tan tanh xor population_count shift_left
    shift_right_logical shift_right_arithmetic optimization_barrier bitcast_convert_type
    threefry2x32 random_wrap random_unwrap random_bits random_fold_in""".split()
)
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor "
    "argmax argmin".split()
)
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
# Primitives a parameter chain may pass through and still be a rearrangement of one leaf.
LAYOUT = frozenset(
    "transpose reshape squeeze expand_dims broadcast_in_dim convert_element_type copy copy_p "
    "slice rev".split()
)


@dataclasses.dataclass(eq=False)
class Node:
    """Recomputes a P or C value from the parameter leaves.

    ``kind`` is ``"leaf"`` (``index`` into the flat leaves), ``"const"`` (``value``) or
    ``"eqn"`` (``eqn`` applied to the values of ``inputs``).
    """

    kind: str
    leaves: frozenset
    index: int = -1
    value: Any = None
    eqn: Any = None
    inputs: tuple = ()

    def evaluate(self, leaf_values, memo=None, *, indices: bool = False):
        """The value, given the flat parameter leaves (``memo`` shares common parts).

        With ``indices`` the leaves are integer index arrays and dtype conversions are
        skipped, so a rearrangement maps each entry to the leaf index it came from.
        """
        memo = {} if memo is None else memo
        key = id(self)
        if key not in memo:
            if self.kind == "leaf":
                memo[key] = leaf_values[self.index]
            elif self.kind == "const":
                memo[key] = self.value
            else:
                args = [node.evaluate(leaf_values, memo, indices=indices) for node in self.inputs]
                if indices and self.eqn.primitive.name == "convert_element_type":
                    memo[key] = args[0]
                else:
                    memo[key] = bind(self.eqn, args)[self.value]
        return memo[key]

    @property
    def replayable(self) -> bool:
        """Whether the value can be recomputed outside the loss (not a scan step's value)."""
        return self.kind != "scanned" and all(node.replayable for node in self.inputs)

    def is_layout(self) -> bool:
        """Whether the value is a rearrangement (no arithmetic) of at most one leaf."""
        if self.kind != "eqn":
            return True
        if self.eqn.primitive.name not in LAYOUT or len(self.leaves) > 1:
            return False
        return all(node.is_layout() for node in self.inputs)


@dataclasses.dataclass(eq=False)
class Use:
    """One equation where parameters meet batch data.

    Attributes:
      key: identifies the use (the ``ε`` and records of :func:`run`).
      eqn: the equation (from the ``B`` trace).
      nodes: ``{operand position: Node}`` of its P operands.
      axes: example axis of each operand (``None`` for P and C operands).
      out_axis: example axis of the result.
      steps: lengths of the scans around the use (outermost first).
      same_params: whether the equation's parameters are the same for ``B`` and ``B + 1``
        examples (so it can be re-run on one example).
      where: the source line that wrote it.
    """

    key: tuple[int, ...]
    eqn: Any
    nodes: dict
    axes: tuple
    out_axis: int
    steps: tuple
    same_params: bool
    where: str

    @property
    def leaves(self) -> frozenset:
        return frozenset().union(*(node.leaves for node in self.nodes.values()))


@dataclasses.dataclass
class Trace:
    """What :func:`trace` found.

    Attributes:
      jaxpr: the ``ClosedJaxpr`` of the flat loss for ``B`` examples.
      uses: the :class:`Use` of each equation where parameters meet the batch.
      opaque: ``{leaf index: reason}`` for leaves used where no use can be read.
      modes: ``{key: mode}`` for equations :func:`run` treats specially (a key is the
        ``id`` of each enclosing call or scan equation, then the equation's).
      num_params: number of parameter leaves (the first inputs of ``jaxpr``).
      out_axes: example axis of each output of ``jaxpr`` (``None``: none).
    """

    jaxpr: Any
    uses: list
    opaque: dict
    modes: dict
    num_params: int
    out_axes: tuple


@dataclasses.dataclass(frozen=True)
class _Info:
    kind: str
    axis: int | None = None  # example axis of an X value
    merged: bool = False  # the example axis is merged with another axis
    node: Node | None = None  # recipe of a P or C value


def where(eqn) -> str:
    """``file:line (function)`` of the user code that wrote ``eqn``."""
    from jax._src import source_info_util

    return source_info_util.summarize(eqn.source_info)


def bind(eqn, args):
    """Applies ``eqn``'s primitive to ``args``; returns the list of results."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, bind_params = params if isinstance(params, tuple) else ((), params)
    outs = eqn.primitive.bind(*subfuns, *args, **bind_params)
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _closed(jaxpr):
    """``(jaxpr, consts)`` of a ``Jaxpr`` or ``ClosedJaxpr``."""
    if isinstance(jaxpr, core.ClosedJaxpr):
        return jaxpr.jaxpr, jaxpr.consts
    return jaxpr, ()


def _sub_jaxpr(eqn):
    name = eqn.primitive.name
    key = _CALLS.get(name) or _CUSTOM.get(name) or ("jaxpr" if name in _REMAT else None)
    return None if key is None else eqn.params[key]


def _example_axis(aval0, aval1) -> tuple[int | None, bool, bool]:
    """``(axis, merged, coupled)`` from the shapes of one value for ``B`` and ``B+1``."""
    s0, s1 = tuple(getattr(aval0, "shape", ())), tuple(getattr(aval1, "shape", ()))
    if len(s0) != len(s1):
        return None, False, True
    changed = [i for i, (a, b) in enumerate(zip(s0, s1, strict=True)) if a != b]
    if len(changed) != 1:
        return None, False, True
    (axis,) = changed
    return axis, s1[axis] - s0[axis] != 1, False


class _Reader:
    """Walks the ``B`` and ``B + 1`` jaxprs in step."""

    def __init__(self, num_params: int):
        self.num_params = num_params
        self.uses: dict[tuple[int, ...], Use] = {}
        self.opaque: dict[int, str] = {}
        self.modes: dict[tuple[int, ...], str] = {}
        self.stack: list = []  # calls and scans around the equation being read

    # -- errors -----------------------------------------------------------------------
    def where(self, eqn) -> str:
        """The user source line of ``eqn``, or of the nearest call around it that has one."""
        for e in (eqn, *reversed(self.stack)):
            found = where(e)
            if found:
                return found
        return "(unknown line)"

    def couple(self, eqn, what: str):
        raise CouplingError(
            f"The loss couples examples: `{eqn.primitive.name}` at {self.where(eqn)} {what}. "
            "Per-example gradients need `loss_fn(params, batch)[i]` to depend on example i "
            "alone (no mean over the batch, no BatchNorm in training mode, no in-batch "
            "negatives)."
        )

    def make_opaque(self, infos, reason):
        for info in infos:
            if info.kind == P:
                for leaf in info.node.leaves:
                    self.opaque.setdefault(leaf, reason)

    # -- walking ----------------------------------------------------------------------
    def walk(self, j0, j1, consts, in_infos, live, steps=(), ctx=()):
        """Infos of ``j0``'s outputs given those of its inputs; ``live``: whether the
        outputs matter for the loss (one flag per output)."""
        env: dict = {}
        for v, value in zip(j0.constvars, consts, strict=True):
            env[v] = _Info(C, node=Node("const", frozenset(), value=value))
        for v, info in zip(j0.invars, in_infos, strict=True):
            env[v] = info
        needed = _live_vars(j0, live)

        def read(v):
            if isinstance(v, core.Literal):
                return _Info(C, node=Node("const", frozenset(), value=v.val))
            return env[v]

        if len(j0.eqns) != len(j1.eqns):
            raise _Mismatch(f"{len(j0.eqns)} vs {len(j1.eqns)} equations")
        for e0, e1 in zip(j0.eqns, j1.eqns, strict=True):
            if e0.primitive is not e1.primitive:
                raise _Mismatch(f"{e0.primitive.name} vs {e1.primitive.name}")
            infos = [read(v) for v in e0.invars]
            alive = any(v in needed for v in e0.outvars if not isinstance(v, core.DropVar))
            outs = self.equation(e0, e1, infos, alive, steps, ctx)
            for v, info in zip(e0.outvars, outs, strict=True):
                env[v] = info
        return [read(v) for v in j0.outvars]

    def equation(self, e0, e1, infos, alive, steps, ctx):
        kinds = {info.kind for info in infos}
        name = e0.primitive.name
        grows = any(
            tuple(getattr(v0.aval, "shape", ())) != tuple(getattr(v1.aval, "shape", ()))
            for v0, v1 in zip(e0.outvars, e1.outvars, strict=True)
        )
        if X not in kinds and not grows:  # parameters and constants only
            if not e0.outvars:
                return []
            kind = P if any(info.node.leaves for info in infos) else C
            leaves = frozenset().union(*(info.node.leaves for info in infos))
            inputs = tuple(info.node for info in infos)
            return [
                _Info(kind, node=Node("eqn", leaves, value=k, eqn=e0, inputs=inputs))
                for k in range(len(e0.outvars))
            ]
        if name == "scan":
            return self.scan(e0, e1, infos, alive, steps, ctx)
        if name in ("while", "cond"):
            return self.control(e0, e1, infos, alive, steps)
        sub = _sub_jaxpr(e0)
        if sub is not None:
            j0, consts = _closed(sub)
            j1, _ = _closed(_sub_jaxpr(e1))
            live = [alive] * len(j0.outvars)
            if any(info.kind == P for info in infos):
                self.modes[(*ctx, id(e0))] = "inline"
            self.stack.append(e0)
            outs = self.walk(j0, j1, consts, infos, live, steps, (*ctx, id(e0)))
            self.stack.pop()
            return [
                self.value(out, v0, v1, e0, alive)
                for out, v0, v1 in zip(outs, e0.outvars, e1.outvars, strict=True)
            ]
        outs = [
            self.value(_Info(X), v0, v1, e0, alive)
            for v0, v1 in zip(e0.outvars, e1.outvars, strict=True)
        ]
        if alive:
            _check_primitive(self, e0, infos, outs)
        if alive and P in kinds:
            self.use(e0, e1, infos, outs, steps, ctx)
        return outs

    def value(self, info, v0, v1, eqn, alive):
        """The info of an equation's result (X results get their example axis)."""
        if info.kind != X:
            return info
        axis, merged, coupled = _example_axis(v0.aval, v1.aval)
        if coupled and alive and not isinstance(v0, core.DropVar):
            shape = tuple(getattr(v0.aval, "shape", ()))
            if shape == tuple(getattr(v1.aval, "shape", ())):
                self.couple(eqn, f"gives a value of shape {shape} with no example axis")
            self.couple(
                eqn, f"gives a value of shape {shape} in which several axes grow with the batch"
            )
        return _Info(X, axis=axis, merged=merged)

    def use(self, e0, e1, infos, outs, steps, ctx):
        if len(outs) != 1 or not jnp.issubdtype(e0.outvars[0].aval.dtype, jnp.inexact):
            self.make_opaque(infos, f"`{e0.primitive.name}` at {where(e0)}")
            return
        if outs[0].merged or any(info.kind == X and info.merged for info in infos):
            self.make_opaque(
                infos,
                f"`{e0.primitive.name}` at {where(e0)} sees the example axis merged with "
                "another axis by a reshape",
            )
            return
        nodes = {k: info.node for k, info in enumerate(infos) if info.kind == P}
        if not all(node.replayable for node in nodes.values()):
            self.make_opaque(
                infos,
                f"`{e0.primitive.name}` at {where(e0)} uses parameters "
                "combined with a scan's per-step values",
            )
            return
        axes = tuple(info.axis if info.kind == X else None for info in infos)
        same = _same_params(e0.params, e1.params)
        key = (*ctx, id(e0))
        self.uses[key] = Use(key, e0, nodes, axes, outs[0].axis, steps, same, where(e0))

    def scan(self, e0, e1, infos, alive, steps, ctx):
        p0 = e0.params
        nc, ncar = p0["num_consts"], p0["num_carry"]
        j0, consts = _closed(p0["jaxpr"])
        j1, _ = _closed(e1.params["jaxpr"])
        entered = not any(info.kind == P for info in infos[nc:])
        if not entered:
            self.make_opaque(infos, f"`scan` at {where(e0)} carries or scans over parameters")
        body = list(infos[:nc])
        carry = [
            _Info(C, node=Node("scanned", frozenset())) if info.kind == C else info
            for info in infos[nc : nc + ncar]
        ]
        for info, v in zip(infos[nc + ncar :], e0.invars[nc + ncar :], strict=True):
            if info.kind == X:
                if info.axis == 0:
                    self.couple(e0, "scans over the example axis")
                info = _Info(X, axis=info.axis - 1, merged=info.merged)
            elif info.kind in (P, C):
                info = _Info(info.kind, node=_slice_node(info.node, v))
            body.append(info)
        live = [alive] * len(j0.outvars)
        reader = self if entered else _Reader(self.num_params)
        reader.stack = [*self.stack, e0]
        for _ in range(ncar + 2):  # until the carry's kinds stop changing
            outs = reader.walk(
                j0,
                j1,
                consts,
                [*body[:nc], *carry, *body[nc:]],
                live,
                (*steps, p0["length"]),
                (*ctx, id(e0)),
            )
            new = [_join(a, b) for a, b in zip(carry, outs[:ncar], strict=True)]
            new = [_Info(C, node=Node("scanned", frozenset())) if i.kind == C else i for i in new]
            if [i.kind for i in new] == [i.kind for i in carry]:
                break
            carry = new
        if entered:
            self.stack.pop()
        if not entered:
            self.opaque.update({k: v for k, v in reader.opaque.items() if k not in self.opaque})
            self.make_opaque_uses(reader)
        else:
            self.modes[(*ctx, id(e0))] = "scan"
        results = []
        for info, v0, v1 in zip(outs, e0.outvars, e1.outvars, strict=True):
            if info.kind == P:
                self.make_opaque([info], f"`scan` at {where(e0)} returns parameters")
            if info.kind == X:
                results.append(self.value(info, v0, v1, e0, alive))
            else:
                results.append(_Info(C, node=Node("scanned", frozenset())))
        return results

    def make_opaque_uses(self, reader):
        for use in reader.uses.values():
            for leaf in use.leaves:
                self.opaque.setdefault(
                    leaf, f"`scan` at {where(use.eqn)} carries or scans over parameters"
                )

    def control(self, e0, e1, infos, alive, steps):
        """``while_loop``/``cond``: checked for coupling; parameters inside are opaque."""
        name = e0.primitive.name
        if any(info.kind == P for info in infos):
            self.make_opaque(infos, f"`{name}` at {where(e0)} uses parameters")
        reader = _Reader(self.num_params)
        reader.stack = [*self.stack, e0]
        if name == "cond":
            if infos[0].kind == X:
                self.couple(e0, "branches on a value computed from the batch")
            for b0, b1 in zip(e0.params["branches"], e1.params["branches"], strict=True):
                j0, consts = _closed(b0)
                reader.walk(j0, _closed(b1)[0], consts, infos[1:], [alive] * len(j0.outvars))
        else:
            cn, bn = e0.params["cond_nconsts"], e0.params["body_nconsts"]
            j0, consts = _closed(e0.params["body_jaxpr"])
            j1, _ = _closed(e1.params["body_jaxpr"])
            carry = [info if info.kind == X else _Info(X) for info in infos[cn + bn :]]
            reader.walk(j0, j1, consts, [*infos[cn : cn + bn], *carry], [alive] * len(j0.outvars))
        self.make_opaque_uses_reason(reader, f"`{name}` at {where(e0)} uses parameters")
        return [
            self.value(_Info(X), v0, v1, e0, alive)
            for v0, v1 in zip(e0.outvars, e1.outvars, strict=True)
        ]

    def make_opaque_uses_reason(self, reader, reason):
        for use in reader.uses.values():
            for leaf in use.leaves:
                self.opaque.setdefault(leaf, reason)
        for leaf in reader.opaque:
            self.opaque.setdefault(leaf, reason)


class _Mismatch(Exception):
    """The ``B`` and ``B + 1`` traces differ in structure."""


def _join(a: _Info, b: _Info) -> _Info:
    order = {C: 0, P: 1, X: 2}
    return b if order[b.kind] > order[a.kind] else a


def _slice_node(node: Node, var) -> Node:
    """The node of one step's slice of a scanned-over P or C value."""
    return Node("scanned", node.leaves, inputs=(node,), value=var)


def _same_params(p0, p1) -> bool:
    try:
        return bool(p0 == p1)
    except Exception:  # arrays or jaxprs among the parameters
        return False


def _live_vars(jaxpr, live) -> set:
    """Variables of ``jaxpr`` that the outputs flagged in ``live`` depend on."""
    needed = {
        v for v, flag in zip(jaxpr.outvars, live, strict=True) if flag and isinstance(v, core.Var)
    }
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars if not isinstance(v, core.DropVar)):
            needed.update(v for v in eqn.invars if isinstance(v, core.Var))
    return needed


def _check_primitive(reader, eqn, infos, outs):
    """Refuses an operation along the example axis."""
    name = eqn.primitive.name
    xs = [(k, info) for k, info in enumerate(infos) if info.kind == X]
    params = eqn.params
    out = outs[0]  # a live equation has a result
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    couple = reader.couple
    if not xs:  # batch-shaped constants
        return
    if name in _ELEMENTWISE:
        rank = len(getattr(eqn.outvars[0].aval, "shape", ()))
        for k, info in xs:
            if len(shapes[k]) == rank and info.axis != out.axis:
                couple(eqn, "moves the example axis")
        return
    (k, x), *others = xs
    e = x.axis
    if name in _REDUCTIONS:
        if e in params["axes"]:
            couple(eqn, f"reduces over the example axis (axis {e})")
    elif name in _CUMULATIVE:
        if params["axis"] == e:
            couple(eqn, f"accumulates along the example axis (axis {e})")
    elif name == "sort" or name == "argsort":
        if params["dimension"] == e:
            couple(eqn, "sorts along the example axis")
    elif name == "rev":
        if e in params["dimensions"]:
            couple(eqn, "reverses the example axis")
    elif name == "top_k":
        if e == len(shapes[k]) - 1:
            couple(eqn, "takes the top k along the example axis")
    elif name == "slice":
        if (
            params["start_indices"][e] != 0
            or params["limit_indices"][e] != shapes[k][e]
            or (params["strides"] and params["strides"][e] != 1)
        ):
            couple(eqn, "slices the example axis")
    elif name == "pad":
        if k == 0 and tuple(params["padding_config"][e]) != (0, 0, 0):
            couple(eqn, "pads the example axis")
    elif name == "concatenate":
        if params["dimension"] == e:
            couple(eqn, "concatenates along the example axis")
    elif name in ("dynamic_slice", "dynamic_update_slice"):
        if k == 0:
            sizes = params.get("slice_sizes") or tuple(eqn.invars[1].aval.shape)
            if sizes[e] != shapes[0][e]:
                couple(eqn, "slices the example axis")
    elif name == "transpose":
        if params["permutation"][out.axis] != e:
            couple(eqn, "moves the example axis")
    elif name == "broadcast_in_dim":
        if params["broadcast_dimensions"][e] != out.axis:
            couple(eqn, "moves the example axis")
    elif name == "reshape":
        out_shape = tuple(eqn.outvars[0].aval.shape)
        if x.merged or out.merged:
            return
        if math.prod(shapes[k][:e]) != math.prod(out_shape[: out.axis]):
            couple(eqn, "moves the example axis")
    elif name in ("squeeze", "expand_dims", "iota", "reduce_precision"):
        return
    elif name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        contract = (lc, rc)
        for k2, info in xs:
            if info.axis in contract[k2]:
                couple(eqn, "contracts the example axis")
        if len(xs) == 2:
            (_, a), (_, b) = xs
            if a.axis not in lb or b.axis not in rb or lb.index(a.axis) != rb.index(b.axis):
                couple(eqn, "pairs every example with every other")
    elif name == "conv_general_dilated":
        lhs_spec = params["dimension_numbers"].lhs_spec
        if k != 0 or others or e != lhs_spec[0]:
            couple(eqn, "convolves along the example axis")
    elif name in (
        "gather",
        "scatter",
        "scatter-add",
        "scatter_add",
        "scatter-mul",
        "scatter-min",
        "scatter-max",
    ):
        _check_indexing(reader, eqn, infos, shapes)
    elif name in (
        "reduce_window_sum",
        "reduce_window_max",
        "reduce_window_min",
        "reduce_window",
        "select_and_gather_add",
        "select_and_scatter_add",
        "cumred",
    ):
        dims = params.get("window_dimensions")
        strides = params.get("window_strides")
        if dims is not None and (dims[e] != 1 or (strides and strides[e] != 1)):
            couple(eqn, "pools over the example axis")
    elif name in ("fft",):
        if e >= len(shapes[k]) - len(params["fft_lengths"]):
            couple(eqn, "transforms along the example axis")
    elif name in ("split",):
        if params["axis"] == e:
            couple(eqn, "splits the example axis")
    elif name in ("clamp", "select_n"):
        return
    else:
        raise CouplingError(
            f"Cannot tell whether `{name}` at {where(eqn)} keeps examples apart; per-example "
            "statistics need every operation on batch data to be known to act within each "
            "example. Compute it outside the loss, or use `jaxeff.pergrad.per_example_grads`."
        )


def _check_indexing(reader, eqn, infos, shapes):
    """gather/scatter: the operand's example axis may be a batching axis or a full slice."""
    dnums = eqn.params["dimension_numbers"]
    operand, indices = infos[0], infos[1]
    if operand.kind == X:
        e = operand.axis
        batching = tuple(getattr(dnums, "operand_batching_dims", ()))
        index_map = tuple(
            getattr(dnums, "start_index_map", ())
            or getattr(dnums, "scatter_dims_to_operand_dims", ())
        )
        if e in batching:
            ib = tuple(
                getattr(dnums, "start_indices_batching_dims", ())
                or getattr(dnums, "scatter_indices_batching_dims", ())
            )
            if indices.kind == X and ib[batching.index(e)] != indices.axis:
                reader.couple(eqn, "pairs examples of the operand with other examples' indices")
            return
        if e in index_map:
            reader.couple(
                eqn,
                "indexes the example axis (write per-example picks as "
                "`jnp.take_along_axis(x, idx[:, None], axis=1)`)",
            )
        sizes = eqn.params.get("slice_sizes")
        if sizes is not None and sizes[e] != shapes[0][e]:
            reader.couple(eqn, "slices the example axis")
        if indices.kind == X:
            reader.couple(eqn, "indexes batch data with another batch value")


def trace(fn, num_params: int, args) -> Trace:
    """Reads ``fn(*flat_params, *flat_batch)``, whose first output has the example axis 0.

    Args:
      fn: a function of the flat parameter leaves followed by the flat batch leaves.
      num_params: how many leading arguments are parameters.
      args: the arguments (arrays, tracers or ``ShapeDtypeStruct``); every batch leaf has
        the example axis first.

    Returns:
      A :class:`Trace`.

    Raises:
      CouplingError: the first output couples examples.
      ValueError: the traces for ``B`` and ``B + 1`` examples differ in structure (the
        message says how); the caller then falls back to ``vmap``.
    """
    grown = [
        jax.ShapeDtypeStruct(
            (x.shape[0] + 1, *x.shape[1:]), x.dtype, weak_type=getattr(x, "weak_type", False)
        )
        if k >= num_params
        else x
        for k, x in enumerate(args)
    ]
    closed0 = jax.make_jaxpr(fn)(*args)  # with the arguments' shardings
    closed1 = jax.make_jaxpr(fn)(*grown)
    reader = _Reader(num_params)
    infos = [
        _Info(P, node=Node("leaf", frozenset([k]), index=k)) if k < num_params else _Info(X, axis=0)
        for k in range(len(args))
    ]
    live = [k == 0 for k in range(len(closed0.jaxpr.outvars))]
    try:
        outs = reader.walk(closed0.jaxpr, closed1.jaxpr, closed0.consts, infos, live)
    except _Mismatch as err:
        raise ValueError(f"the loss traces differently for B and B + 1 examples ({err})") from None
    if outs[0].kind != X or outs[0].axis != 0:
        raise CouplingError("`loss_fn` must return one loss per example, shape (B,).")
    out_axes = tuple(o.axis if o.kind == X else None for o in outs)
    uses = [u for u in reader.uses.values() if not (u.leaves & set(reader.opaque))]
    return Trace(closed0, uses, dict(reader.opaque), reader.modes, num_params, out_axes)


# -- the instrumented run -------------------------------------------------------------


def run(tr: Trace, args, eps: dict):
    """Evaluates the traced function with ``eps[u]`` added to the result of each use ``u``.

    Returns ``(outputs, records)``: ``records[u]`` holds the operands of use ``u`` that are
    not parameters (inside scans: stacked over the steps, outermost first).
    """
    records: dict = {}
    uses = {u.key: u for u in tr.uses}
    outs = _run(tr, uses, tr.jaxpr.jaxpr, tr.jaxpr.consts, args, eps, records, ())
    return outs, records


def _run(tr: Trace, uses, jaxpr, consts, args, eps, records, ctx):
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        args_ = [read(v) for v in eqn.invars]
        key = (*ctx, id(eqn))
        mode = tr.modes.get(key)
        if key in uses:
            use = uses[key]
            outs = bind(eqn, args_)
            outs = [outs[0] + eps[key].astype(outs[0].dtype)]
            records[key] = [jnp.asarray(a) for k, a in enumerate(args_) if k not in use.nodes]
        elif mode == "inline":
            sub, sub_consts = _closed(_sub_jaxpr(eqn))
            outs = _run(tr, uses, sub, sub_consts, args_, eps, records, key)
        elif mode == "scan":
            outs = _run_scan(tr, uses, eqn, args_, eps, records, key)
        else:
            outs = bind(eqn, args_)
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _run_scan(tr: Trace, uses, eqn, args, eps, records, key):
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    body, body_consts = _closed(p["jaxpr"])
    consts, carry, xs = args[:nc], args[nc : nc + ncar], args[nc + ncar :]
    inside = {k: v for k, v in eps.items() if k[: len(key)] == key}

    def step(carry, scanned):
        x, e = scanned
        recs: dict = {}
        outs = _run(tr, uses, body, body_consts, [*consts, *carry, *x], e, recs, key)
        return outs[:ncar], (outs[ncar:], recs)

    carry, (ys, recs) = lax.scan(
        step, carry, (xs, inside), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    records.update(recs)
    return [*carry, *ys]


def index_map(node: Node, leaf_shape) -> np.ndarray | None:
    """For a P value that rearranges one leaf: the flat leaf index of each of its entries.

    ``None`` when the value is not a rearrangement of a single leaf.
    """
    if len(node.leaves) != 1 or not node.is_layout():
        return None
    (leaf,) = node.leaves
    size = math.prod(leaf_shape)
    if size >= 2**31:
        return None
    with jax.ensure_compile_time_eval():
        iota = np.arange(size, dtype=np.int32).reshape(leaf_shape)
        values = [None] * (leaf + 1)
        values[leaf] = iota
        out = node.evaluate(values, indices=True)
    return np.asarray(out)
