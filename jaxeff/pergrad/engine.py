"""Per-example gradient statistics of any JAX loss ``loss_fn(params, batch) -> (B,)``.

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning", 2020,
https://arxiv.org/abs/2007.04532. For ``g_i = ∇_θ ℓ_i`` (the gradient of example ``i``'s
loss) this module returns, per parameter leaf ``p`` and without forming ``g_i`` where a
cheaper contraction exists,

.. math::

  \\|g_{i,p}\\|^2, \\qquad \\sum_i g_{i,p}^2, \\qquad
  \\langle g_{i,p}, D_{k,p} \\rangle \\; (D_{k,p} = f_{k,1} \\otimes \\cdots \\otimes f_{k,q}),

and, in :func:`value_grad_and_stats`, the weighted gradient ``Σ_i w_i g_i`` of the same pass.

How: the loss's jaxpr is read (:mod:`jaxeff.pergrad.tracing`) to find every equation where
parameters meet batch data; one backward pass gives each such use's cotangent ``δ``; each
use's per-example contribution takes its cheapest exact form (:mod:`jaxeff.pergrad.forms`);
the contributions of a leaf's uses are summed, cross terms included, and contracted by
:func:`jaxeff.pergrad.rules.layer_stats`. A leaf used where no form applies takes the
``vmap(grad)`` path (:func:`jaxeff.pergrad.per_example_grads`) alone, and
:attr:`PerExampleStats.paths`/``reasons`` say so.

Any framework reaches it by writing its loss as a function of a params pytree:

* plain JAX: ``loss_fn(params, batch)`` as it is;
* flax linen: ``lambda params, b: loss(model.apply({"params": params, **rest}, b["x"]), b)``
  with ``rest`` the other collections (held fixed);
* flax nnx: ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)`` and
  ``lambda params, b: loss(nnx.merge(graphdef, params, rest)(b["x"]), b)``;
* equinox: ``params, static = eqx.partition(model, eqx.is_inexact_array)`` and
  ``lambda params, b: loss(jax.vmap(eqx.combine(params, static))(b["x"]), b)``;
* haiku: ``f = hk.transform(forward)`` and
  ``lambda params, b: loss(f.apply(params, None, b["x"]), b)``.

Assumption checked: examples do not interact. A loss that couples them (a mean over the
batch, BatchNorm in training mode, in-batch negatives) raises
:class:`~jaxeff.pergrad.tracing.CouplingError` naming the operation. Assumption stated: a
``custom_jvp``/``custom_vjp`` function that takes parameters is differentiated through its
primal body, which is exact when its rule is the derivative of the primal (rules written
for speed, memory or stability), not for rules that change the gradient (straight-through
estimators); such a function's parameters belong on the ``vmap`` path (``vmap_leaves``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict
from jax.sharding import NamedSharding, PartitionSpec

from jaxeff.pergrad import forms as _forms
from jaxeff.pergrad import tracing
from jaxeff.pergrad.chunks import replicated_like, sum_over_examples
from jaxeff.pergrad.reference import batch_size_of, check_chunk_size, per_example_grads
from jaxeff.pergrad.rules import layer_stats, weighted_contraction

__all__ = [
    "FAST",
    "VMAP",
    "PerExampleStats",
    "check_directions",
    "direction_shapes",
    "param_paths",
    "per_example_stats",
    "value_grad_and_stats",
]

FAST, VMAP = "fast", "vmap"


@flax.struct.dataclass
class PerExampleStats:
    """Per-example gradient statistics of a batch (see :func:`per_example_stats`).

    ``g_{i,p}`` is the gradient of example ``i``'s loss with respect to leaf ``p``.

    Attributes:
      losses: ``(B,)`` per-example losses ``ℓ_i``.
      sq_norms: a pytree like ``params`` with ``(B,)`` leaves, ``||g_{i,p}||²``.
      total_sq_norms: ``(B,)``, ``||g_i||² = Σ_p ||g_{i,p}||²``.
      sum_sq: a pytree like ``params``: ``Σ_i g_{i,p}²`` per coordinate (``None`` when
        ``with_sum_sq=False``). With ``ḡ = Σ_i g_i / B`` the per-coordinate variance of
        the per-example gradients is ``sum_sq / B - ḡ²``.
      dots: ``(K, B)``, ``Σ_p <g_{i,p}, D_{k,p}>`` over the leaves named in
        ``directions``; ``None`` without directions.
      leaf_dots: ``{path: (K, B)}``, the same per leaf; ``None`` without directions.
      factors: per-example factors of the leaves named in ``directions``, in the
        directions' split: ``{path: (g,)}`` for a leaf given one factor (``g`` its
        ``(B, *shape)`` per-example gradients, formed), and ``{path: (ā, s)}`` for a leaf
        given two whose per-example gradient is one sum of outer products
        ``Σ_t a_{i,t} δ_{i,t}^T`` in that split: ``ā_i = (1/T) Σ_t a_{i,t}`` of shape
        ``(B, *S_1)`` and ``s_i = Σ_t δ_{i,t}`` of shape ``(B, *S_2)``.
        ``ā_i s_i^T`` is the rank-1 matrix gradient clustering (:mod:`jaxeff.clustering`)
        averages into its centres (exactly ``g_{i,p}`` for a Dense layer on ``(B, d)``
        inputs). A leaf with neither is absent. ``None`` without directions.
      paths: ``{path: "fast" | "vmap"}`` for every leaf (static).
      reasons: ``{path: str}``: the rule each leaf took, or why it took the vmap path
        (static).
    """

    losses: jax.Array
    sq_norms: Any
    total_sq_norms: jax.Array
    sum_sq: Any
    dots: jax.Array | None
    leaf_dots: dict[str, jax.Array] | None
    factors: dict[str, tuple[jax.Array, ...]] | None
    paths: FrozenDict[str, str] = flax.struct.field(pytree_node=False)
    reasons: FrozenDict[str, str] = flax.struct.field(pytree_node=False)

    if TYPE_CHECKING:  # added by flax.struct.dataclass (dataclasses.replace)

        def replace(self, **updates: Any) -> PerExampleStats:
            """A copy of the statistics with the fields named in ``updates`` replaced."""
            ...


def _path_name(path) -> str:
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]  # an nnx Variable's payload
    return jax.tree_util.keystr(tuple(keys), simple=True, separator="/")


def param_paths(params: chex.ArrayTree) -> list[str]:
    """The path of each leaf of ``params``, as ``"layers/0/kernel"`` (the keys of
    ``directions`` and of :attr:`PerExampleStats.paths`)."""
    return [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


# -- directions ---------------------------------------------------------------------------


def _check_directions(directions, paths, shapes):
    """``{leaf index: tuple of factors}``, checked against the leaves' shapes."""
    if directions is None:
        return {}
    if not isinstance(directions, Mapping):
        raise TypeError(
            "`directions` must be a mapping from parameter path to factors, got "
            f"{type(directions).__name__}."
        )
    index = {p: k for k, p in enumerate(paths)}
    out, count = {}, None
    for path, factors in directions.items():
        if path not in index:
            raise ValueError(
                f"`directions` names {path!r}, which is not a parameter path; paths are "
                f"{sorted(paths)}."
            )
        factors = tuple(factors) if isinstance(factors, (tuple, list)) else (factors,)
        shape = shapes[index[path]]
        k = 0
        for f in factors:
            f_shape = jnp.shape(f)
            if not f_shape:
                raise ValueError(f"`directions[{path!r}]` factors must have a leading K axis.")
            if count is None:
                count = f_shape[0]
            if f_shape[0] != count:
                raise ValueError(
                    f"`directions[{path!r}]` has {f_shape[0]} directions; others have {count}."
                )
            n = len(f_shape) - 1
            if tuple(shape[k : k + n]) != tuple(f_shape[1:]):
                break
            k += n
        else:
            if k == len(shape):
                out[index[path]] = tuple(jnp.asarray(f) for f in factors)
                continue
        raise ValueError(
            f"`directions[{path!r}]` factors of shapes {[jnp.shape(f) for f in factors]} do not "
            f"split the leaf's shape {tuple(shape)} into consecutive axis groups (each with a "
            "leading K axis)."
        )
    return out


def _dense_direction(factors):
    """``(K, *leaf_shape)``: the outer product of the factors, direction by direction."""
    out = factors[0]
    for f in factors[1:]:
        k = out.shape[0]
        prod = out.reshape(k, -1, 1) * f.reshape(k, 1, -1)
        out = prod.reshape(k, *out.shape[1:], *f.shape[1:])
    return out


def check_directions(
    params: chex.ArrayTree, directions: Mapping[str, jax.Array | tuple[jax.Array, ...]] | None
) -> dict[str, tuple[jax.Array, ...]]:
    """``directions`` checked against ``params``' leaves: ``{path: tuple of factors}``.

    Args:
      params: the parameter pytree the directions are for.
      directions: ``{path: factors}`` as :func:`per_example_stats` takes them, or ``None``.

    Raises:
      TypeError, ValueError: naming ``directions`` and the path, for a path that is not a
        leaf of ``params``, factors that do not split its shape, or differing ``K``.
    """
    paths = param_paths(params)
    shapes = [tuple(jnp.shape(x)) for x in jax.tree_util.tree_leaves(params)]
    return {paths[k]: f for k, f in _check_directions(directions, paths, shapes).items()}


# -- per-leaf statistics ------------------------------------------------------------------


def _is_identity(index) -> bool:
    return np.array_equal(index.ravel(), np.arange(index.size))


def _to_leaf(values, index, shape, dtype):
    """``values (..., r, c)`` placed at the flat leaf positions ``index (r, c)``."""
    lead = values.shape[: values.ndim - 2]
    flat = values.reshape(*lead, -1)
    size = math.prod(shape)
    if _is_identity(index) and index.size == size:
        return flat.reshape(*lead, *shape).astype(dtype)
    ids = index.ravel()
    if np.unique(ids).size == size == ids.size:  # a permutation: gather, no scatter
        inverse = np.argsort(ids)
        return flat[..., inverse].reshape(*lead, *shape).astype(dtype)
    out = jnp.zeros((*lead, size), flat.dtype).at[..., ids].add(flat)
    return out.reshape(*lead, *shape).astype(dtype)


def _groups(outers):
    """Concatenates the outers that share a layout; returns (groups, disjoint)."""
    groups: list[list] = []
    for o in outers:
        if not _is_identity(o.index) and _is_identity(o.index.T) and o.index.size:
            o = o.transposed()
        for g in groups:
            if g[0].index.shape == o.index.shape and np.array_equal(g[0].index, o.index):
                g.append(o)
                break
            if g[0].index.shape == o.index.T.shape and np.array_equal(g[0].index, o.index.T):
                g.append(o.transposed())
                break
        else:
            groups.append([o])
    merged = [
        _forms.Outer(
            g[0].leaf,
            jnp.concatenate([o.a for o in g], axis=1),
            jnp.concatenate([o.delta for o in g], axis=1),
            g[0].index,
        )
        for g in groups
    ]
    ids = np.concatenate([g.index.ravel() for g in merged]) if merged else np.zeros(0)
    return merged, np.unique(ids).size == ids.size


def _materialise(outer, shape, dtype):
    grads = jnp.einsum("btr,btc->brc", outer.a, outer.delta)
    return _to_leaf(grads, outer.index, shape, dtype)


def _factored(group, factors):
    """``(v, u)`` in the group's ``(r, c)`` layout when the direction splits there."""
    if len(factors) != 2 or not _is_identity(group.index):
        return None
    r, c = group.index.shape
    v, u = factors
    if math.prod(v.shape[1:]) != r:
        return None
    return v.reshape(v.shape[0], r), u.reshape(u.shape[0], c)


def _per_example(leaf_forms, shape, dtype):
    """``(B, *shape)``: the per-example gradients of one leaf, formed."""
    outers = [f for f in leaf_forms if isinstance(f, _forms.Outer)]
    groups, _ = _groups(outers)
    grads = sum(f.grads.astype(dtype) for f in leaf_forms if isinstance(f, _forms.Dense))
    grads = grads + sum(_materialise(g, shape, dtype) for g in groups)
    return grads + sum(
        jnp.einsum("bm,m...->b...", b.coeffs.astype(dtype), b.basis.astype(dtype))
        for b in leaf_forms
        if isinstance(b, _forms.Basis)
    )


def _leaf_factors(leaf_forms, factors, shape):
    """The leaf's per-example factors in the directions' split: ``(g (B, *shape),)`` for
    one factor; ``(ā (B, *S_1), s (B, *S_2))`` for two when the leaf is one outer group in
    that split; otherwise ``None``."""
    f32 = jnp.float32
    if factors is None or not leaf_forms or len(factors) > 2:
        return None
    if len(factors) == 1:
        return (_per_example(leaf_forms, shape, f32),)
    if not all(isinstance(f, _forms.Outer) for f in leaf_forms):
        return None
    groups, _ = _groups(leaf_forms)
    if len(groups) != 1 or _factored(groups[0], factors) is None:
        return None
    (g,) = groups
    a, s = jnp.mean(g.a.astype(f32), axis=1), jnp.sum(g.delta.astype(f32), axis=1)
    return tuple(x.reshape(x.shape[0], *f.shape[1:]) for x, f in zip((a, s), factors, strict=True))


def _leaf_stats(leaf_forms, shape, factors, with_sum_sq, weights, dtype):
    """``(norms (B,), sum_sq, dots (K, B) or None, weighted grad or None)`` for one leaf."""
    outers = [f for f in leaf_forms if isinstance(f, _forms.Outer)]
    bases = [f for f in leaf_forms if isinstance(f, _forms.Basis)]
    denses = [f for f in leaf_forms if isinstance(f, _forms.Dense)]
    groups, disjoint = _groups(outers)
    f32 = jnp.float32
    dense_dir = None if factors is None else _dense_direction(factors).astype(f32)
    norms: jax.Array | float
    sum_sq: jax.Array | float | None
    dots: jax.Array | float | None
    grad: jax.Array | float | None
    if denses or not disjoint:  # form g_i
        grads = _per_example(leaf_forms, shape, f32)
        axes = tuple(range(1, grads.ndim))
        norms = jnp.sum(grads * grads, axis=axes)
        sum_sq = sum_over_examples(grads * grads) if with_sum_sq else None
        dots = None if dense_dir is None else jnp.einsum("b...,k...->kb", grads, dense_dir)
        grad = (
            None
            if weights is None
            else jnp.einsum("b...,b->...", grads, weights, **replicated_like(grads))
        )
        return norms, sum_sq, dots, grad
    size = None
    norms = sum_sq = dots = grad = 0.0  # sums over the groups and bases below
    for g in groups:
        a, d = g.a.astype(f32), g.delta.astype(f32)
        size = a.shape[0]
        direction = None if factors is None else _factored(g, factors)
        st = layer_stats(
            a, d, use_bias=False, with_sum_sq=with_sum_sq, direction=direction, grad_weights=weights
        )
        norms = norms + st.kernel_sq_norms
        if with_sum_sq:
            sum_sq = sum_sq + _to_leaf(st.kernel_sum_sq, g.index, shape, f32)
        if weights is not None:
            grad = grad + _to_leaf(st.kernel_grad, g.index, shape, f32)
        if dense_dir is not None:
            if st.dots is not None:  # the direction splits in this group's layout
                dots = dots + st.dots
            else:
                d_rc = dense_dir.reshape(dense_dir.shape[0], -1)[:, g.index]
                dots = dots + jnp.einsum("btr,krc,btc->kb", a, d_rc, d)
    if bases:
        coeffs = jnp.concatenate([b.coeffs.astype(f32) for b in bases], axis=1)
        basis = jnp.concatenate([b.basis.astype(f32) for b in bases], axis=0)
        size = coeffs.shape[0]
        flat = basis.reshape(basis.shape[0], -1)
        inner: jax.Array | float = 0.0  # <O_i, H_j>, (B, m)
        weighted_outer: jax.Array | float = 0.0  # Σ_i c_ij O_i, (m, *shape)
        for g in groups:
            a, d = g.a.astype(f32), g.delta.astype(f32)
            h_rc = flat[:, g.index]
            inner = inner + jnp.einsum("btr,mrc,btc->bm", a, h_rc, d)
            if with_sum_sq:
                w_o = jnp.einsum("bm,btr,btc->mrc", coeffs, a, d)
                weighted_outer = weighted_outer + _to_leaf(w_o, g.index, shape, f32)
        gram = flat @ flat.T
        norms = (
            norms
            + 2 * jnp.sum(coeffs * inner, axis=1)
            + jnp.einsum("bj,jk,bk->b", coeffs, gram, coeffs)
        )
        if with_sum_sq:
            cc = jnp.einsum("bj,bk->jk", coeffs, coeffs)
            sum_sq = sum_sq + jnp.einsum("jk,j...,k...->...", cc, basis, basis)
            if groups:
                sum_sq = sum_sq + 2 * jnp.sum(basis * weighted_outer, axis=0)
        if weights is not None:
            grad = grad + jnp.einsum("b,bm,m...->...", weights, coeffs, basis)
        if dense_dir is not None:
            dots = dots + jnp.einsum(
                "bm,km->kb", coeffs, dense_dir.reshape(dense_dir.shape[0], -1) @ flat.T
            )
    del size
    if factors is None:
        dots = None
    if not with_sum_sq:
        sum_sq = None
    if weights is None:
        grad = None
    return norms, sum_sq, dots, grad


# -- the pass -----------------------------------------------------------------------------


def _describe(leaf_forms) -> str:
    names = sorted({type(f).__name__.lower() for f in leaf_forms})
    return "fast: " + ", ".join(names) if names else "fast: unused by the loss"


def _zeros(aval, steps):
    """Zeros for ``aval`` with the scan ``steps`` in front, sharded like ``aval`` on a mesh
    with explicit axes (where ops between differently sharded arrays are type errors)."""
    shape = (*steps, *aval.shape)
    sharding = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is not None and mesh is not None and mesh.axis_names and mesh.are_all_axes_explicit:
        spec = PartitionSpec(*([None] * len(steps)), *sharding.spec)
        return jnp.zeros(shape, aval.dtype, out_sharding=NamedSharding(mesh, spec))
    return jnp.zeros(shape, aval.dtype)


@dataclasses.dataclass(frozen=True)
class Collected:
    """What one traced pass of the loss records (see :func:`collect`), inside a trace.

    Attributes:
      losses: ``(R,)`` per-example losses, ``R`` the rows run (``B``, or 2 for ``B = 1``).
      aux: the loss's auxiliary output (``None`` without ``has_aux``).
      forms: ``{leaf index: [per-example forms]}`` (:mod:`~jaxeff.pergrad.forms`).
      shapes: each leaf's shape.
      reasons: ``{leaf index: why it took the vmap path}``.
      padded: whether ``B = 1`` ran as two rows, the second a zero-cotangent copy.
    """

    losses: jax.Array
    aux: Any
    forms: dict
    shapes: tuple
    reasons: Mapping
    padded: bool


def collect(loss_fn, has_aux, chunk_size, vmap_leaves, params, batch) -> Collected:
    """Traces ``loss_fn`` once and records every leaf's per-example forms; not jitted.

    One forward and one backward pass (the backward from the per-example losses'
    cotangent ``1``) give each parameter use's operand and cotangent; leaves with no exact
    form, and ``vmap_leaves`` (a tuple of leaf indices), get their per-example gradients
    from :func:`~jaxeff.pergrad.per_example_grads` instead.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
    batch_leaves, batch_def = jax.tree_util.tree_flatten(batch)
    size = batch_size_of(batch)
    # With one example, size-1 axes let jnp drop broadcasts, so the traces for 1 and 2
    # examples differ. Run on the example twice instead; the copy gets a zero cotangent, so
    # it adds nothing to any statistic, and is dropped from the per-example results.
    padded = size == 1
    if padded:
        batch_leaves = [jnp.concatenate([x, x]) for x in batch_leaves]
    aux_def: list[jax.tree_util.PyTreeDef] = []

    def flat_fn(*args):
        p = jax.tree_util.tree_unflatten(treedef, args[: len(leaves)])
        b = jax.tree_util.tree_unflatten(batch_def, args[len(leaves) :])
        out = loss_fn(p, b)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError("`loss_fn` with `has_aux=True` must return `(losses, aux)`.")
            out, aux = out
        else:
            aux = None
        n = jnp.shape(args[len(leaves)])[0]
        if jnp.shape(out) != (n,):
            raise ValueError(
                f"`loss_fn` must return per-example losses of shape ({n},), got {jnp.shape(out)}."
            )
        aux_leaves, d = jax.tree_util.tree_flatten(aux)
        aux_def[:] = [d]
        return [out, *aux_leaves]

    args = [*leaves, *batch_leaves]
    reasons: dict[int, str] = {}
    try:
        tr = tracing.trace(flat_fn, len(leaves), args)
    except ValueError as err:
        if isinstance(err, tracing.CouplingError) or "loss_fn" in str(err):
            raise
        tr = None
        reasons = dict.fromkeys(range(len(leaves)), f"vmap: {err}")
    if tr is not None:
        reasons.update({k: f"vmap: {why}" for k, why in tr.opaque.items()})
    for k in vmap_leaves:
        reasons.setdefault(k, "vmap: asked for by `vmap_leaves`")

    leaf_forms: dict[int, list] = {k: [] for k in range(len(leaves))}
    if tr is not None:
        uses = [u for u in tr.uses if not (u.leaves & set(reasons))]
        tr.uses = uses
        eps = {u.key: _zeros(u.eqn.outvars[0].aval, u.steps) for u in uses}

        def perturbed(eps):
            outs, records = tracing.run(tr, args, eps)
            return outs[0], (outs[1:], records)

        losses, pull, (aux_leaves, records) = jax.vjp(perturbed, eps, has_aux=True)
        cotangent = jnp.ones_like(losses)
        if padded:
            cotangent = cotangent.at[1].set(0)
        (deltas,) = pull(cotangent)
        memo: dict = {}
        for u in uses:
            p_vals = {k: node.evaluate(leaves, memo) for k, node in u.nodes.items()}
            found, why = _forms.contributions(
                u, p_vals, records[u.key], deltas[u.key], leaves, shapes
            )
            if found is None:
                for leaf in u.leaves:
                    reasons.setdefault(leaf, f"vmap: {why}")
                continue
            for f in found:
                leaf_forms[f.leaf].append(f)
        aux = jax.tree_util.tree_unflatten(aux_def[0], aux_leaves) if has_aux else None
        if padded and has_aux:
            aux = loss_fn(params, batch)[1]
    else:
        out = loss_fn(params, batch)
        losses, aux = out if has_aux else (out, None)
        if padded:
            losses = jnp.concatenate([losses, losses])

    slow = sorted(k for k in reasons)
    if slow:

        def one_loss(sub, example):
            full = list(leaves)
            for k, v in zip(slow, sub, strict=True):
                full[k] = v
            ex = jax.tree.map(lambda x: x[None], example)
            out = loss_fn(jax.tree_util.tree_unflatten(treedef, full), ex)
            return (out[0] if has_aux else out)[0]

        grads = per_example_grads(one_loss, [leaves[k] for k in slow], batch, chunk_size=chunk_size)
        for k, g in zip(slow, grads, strict=True):
            if padded:
                g = jnp.concatenate([g, jnp.zeros_like(g)])
            leaf_forms[k] = [_forms.Dense(k, g)]
    return Collected(
        losses=losses,
        aux=aux,
        forms=leaf_forms,
        shapes=shapes,
        reasons=reasons,
        padded=padded,
    )


def leaf_sq_norms(col: Collected) -> list:
    """``[(R,) ||g_{i,p}||² for each leaf p]`` of a :class:`Collected` pass."""
    out = []
    for k, shape in enumerate(col.shapes):
        if col.forms[k]:
            out.append(_leaf_stats(col.forms[k], shape, None, False, None, jnp.float32)[0])
        else:
            out.append(jnp.zeros(col.losses.shape, jnp.float32))
    return out


def _rows(x, keep):
    """``x`` with the rows where ``keep`` is false set to zero (not multiplied: NaN-safe)."""
    return jnp.where(keep.reshape(-1, *([1] * (x.ndim - 1))), x, jnp.zeros((), x.dtype))


def leaf_weighted_grad(leaf_forms, shape, weights, keep):
    """``Σ_i w_i g_{i,p}`` of one leaf from its forms, rows with ``keep`` false left out.

    ``weights`` and ``keep`` are ``(R,)``. Left-out rows are zeroed before any product,
    so a NaN or inf in them reaches nothing. The contraction is the ordinary backward
    pass's weight gradient (:func:`~jaxeff.pergrad.rules.weighted_contraction`), with the
    weights on the narrower side.
    """
    f32 = jnp.float32
    w = weights.astype(f32)
    outers = [f for f in leaf_forms if isinstance(f, _forms.Outer)]
    bases = [f for f in leaf_forms if isinstance(f, _forms.Basis)]
    denses = [f for f in leaf_forms if isinstance(f, _forms.Dense)]
    groups, disjoint = _groups(outers)
    if denses or not disjoint:
        grads = _rows(_per_example(leaf_forms, shape, f32), keep)
        return jnp.einsum("b...,b->...", grads, w, **replicated_like(grads))
    grad = jnp.zeros(shape, f32)
    for g in groups:
        a, d = _rows(g.a.astype(f32), keep), _rows(g.delta.astype(f32), keep)
        grad = grad + _to_leaf(weighted_contraction(a, d, w), g.index, shape, f32)
    if bases:
        coeffs = _rows(jnp.concatenate([b.coeffs.astype(f32) for b in bases], axis=1), keep)
        basis = jnp.concatenate([b.basis.astype(f32) for b in bases], axis=0)
        grad = grad + jnp.einsum("b,bm,m...->...", w, coeffs, basis)
    return grad


def one_pass(
    loss_fn, has_aux, with_sum_sq, chunk_size, vmap_leaves, params, batch, weights, directions
):
    """The traceable core: ``(stats, aux, weighted grads or None)``; not jitted.

    ``weights`` is ``(B,)`` or ``None`` (no gradient); ``directions`` as
    :func:`per_example_stats`; ``vmap_leaves`` a tuple of leaf indices.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = param_paths(params)
    col = collect(loss_fn, has_aux, chunk_size, vmap_leaves, params, batch)
    shapes, reasons, leaf_forms, padded = col.shapes, col.reasons, col.forms, col.padded
    losses, aux = col.losses, col.aux
    run_size = losses.shape[0]
    factors = _check_directions(directions, paths, shapes)

    w = None if weights is None else weights.astype(jnp.float32)
    if padded and w is not None:
        w = jnp.concatenate([w, jnp.zeros_like(w)])
    norms, sums, dots, grads, leaf_factors = [], [], {}, [], {}
    for k, x in enumerate(leaves):
        if leaf_forms[k]:
            n, s, d, g = _leaf_stats(
                leaf_forms[k], shapes[k], factors.get(k), with_sum_sq, w, jnp.float32
            )
        else:
            n = jnp.zeros((run_size,), jnp.float32)
            s = jnp.zeros(shapes[k], jnp.float32) if with_sum_sq else None
            d = (
                None
                if k not in factors
                else jnp.zeros((factors[k][0].shape[0], run_size), jnp.float32)
            )
            g = None if w is None else jnp.zeros(shapes[k], jnp.float32)
        found = _leaf_factors(leaf_forms[k], factors.get(k), shapes[k])
        if found is not None:
            leaf_factors[paths[k]] = found
        norms.append(n)
        sums.append(s)
        grads.append(None if g is None else g.astype(x.dtype))
        if d is not None:
            dots[paths[k]] = d
    if padded:
        losses = losses[:1]
        norms = [n[:1] for n in norms]
        dots = {p: d[:, :1] for p, d in dots.items()}
        leaf_factors = {p: tuple(x[:1] for x in f) for p, f in leaf_factors.items()}
    unflat = functools.partial(jax.tree_util.tree_unflatten, treedef)
    stats = PerExampleStats(
        losses=losses,
        sq_norms=unflat(norms),
        total_sq_norms=sum(norms),
        sum_sq=unflat(sums) if with_sum_sq else None,
        dots=sum(dots.values()) if dots else None,
        leaf_dots=dots or None,
        factors=leaf_factors if factors else None,
        paths=FrozenDict({paths[k]: (VMAP if k in reasons else FAST) for k in range(len(leaves))}),
        reasons=FrozenDict(
            {paths[k]: reasons.get(k) or _describe(leaf_forms[k]) for k in range(len(leaves))}
        ),
    )
    return stats, aux, (unflat(grads) if w is not None else None)


_STATIC = ("loss_fn", "has_aux", "with_sum_sq", "chunk_size", "vmap_leaves")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _stats_jit(params, batch, directions, **static):
    return one_pass(params=params, batch=batch, weights=None, directions=directions, **static)[0]


@functools.partial(jax.jit, static_argnames=_STATIC)
def _value_grad_jit(params, batch, weights, directions, **static):
    stats, aux, grads = one_pass(
        params=params, batch=batch, weights=weights, directions=directions, **static
    )
    loss = jnp.sum(weights.astype(stats.losses.dtype) * stats.losses)
    return loss, aux, grads, stats


def _check_params(params) -> None:
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("`params` has no array leaves.")
    for x in leaves:
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(
                f"`params` leaves must be arrays, got {type(x).__name__}; the arguments are "
                "(loss_fn, params, batch) with loss_fn(params, batch) -> (B,) (an nnx model "
                "goes through nnx.split or jaxeff.pergrad.stats)."
            )
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            raise ValueError(
                f"`params` leaves must be floating point, got {jnp.result_type(x)}; "
                "hold integer state outside the differentiated pytree."
            )


def check_args(loss_fn, params, batch, with_sum_sq, chunk_size, vmap_leaves):
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(with_sum_sq, bool):
        raise TypeError(f"`with_sum_sq` must be a bool, got {with_sum_sq!r}.")
    check_chunk_size(chunk_size)
    _check_params(params)
    paths = param_paths(params)
    unknown = sorted(set(vmap_leaves) - set(paths))
    if unknown:
        raise ValueError(f"`vmap_leaves` names {unknown}, which are not parameter paths.")
    return batch_size_of(batch), tuple(sorted(paths.index(p) for p in vmap_leaves))


def check_weights(weights, size):
    if weights is None:
        return jnp.full((size,), 1.0 / size, jnp.float32)
    if jnp.shape(weights) != (size,):
        raise ValueError(
            f"`weights` must hold one weight per example, shape ({size},), got "
            f"{jnp.shape(weights)}."
        )
    if not jnp.issubdtype(jnp.result_type(weights), jnp.floating):
        raise ValueError(f"`weights` must be floating point, got {jnp.result_type(weights)}.")
    if not isinstance(weights, jax.core.Tracer):
        bad = ~np.isfinite(np.asarray(weights))
        if bad.any():
            raise ValueError(
                f"`weights` must be finite; entries {np.flatnonzero(bad)[:8].tolist()} are not."
            )
    return jnp.asarray(weights)


def per_example_stats(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: chex.ArrayTree,
    batch: chex.ArrayTree,
    *,
    directions: Mapping[str, jax.Array | tuple[jax.Array, ...]] | None = None,
    with_sum_sq: bool = True,
    chunk_size: int | None = None,
    vmap_leaves: Sequence[str] = (),
) -> PerExampleStats:
    """Squared norms, sums of squares and inner products of every per-example gradient.

    For ``g_i = ∇_θ ℓ_i`` with ``ℓ = loss_fn(params, batch)``, per leaf ``p``:
    ``||g_{i,p}||²``, ``Σ_i g_{i,p}²`` and ``<g_{i,p}, f_{k,1} ⊗ … ⊗ f_{k,q}>`` (module
    docstring). Exact (float32), jittable, for ``B ≥ 1``, with the batch sharded along
    its leading axis or not.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses; example ``i``'s loss
        may depend on example ``i`` only (checked).
      params: any pytree of floating-point arrays.
      batch: pytree of arrays with a leading axis of size ``B``.
      directions: optional ``{path: factors}`` (paths as :func:`param_paths`): ``factors``
        a tuple of arrays ``(K, *S_1), …, (K, *S_q)`` whose shapes ``S_j`` split the leaf's
        shape into consecutive axis groups; direction ``k`` is their outer product. One
        array ``(K, *leaf_shape)`` is a dense direction. :func:`direction_shapes` gives the
        split for which the dots cost no more than the norms.
      with_sum_sq: whether to compute ``sum_sq``.
      chunk_size: examples per chunk on the vmap path (``None``: all at once).
      vmap_leaves: paths to send to the vmap path whatever their uses.

    Returns:
      A :class:`PerExampleStats`.

    Raises:
      CouplingError: the loss lets examples interact (the message names the operation).
      TypeError, ValueError: bad arguments, named.

    Example::

      def loss_fn(params, batch):
          logits = model.apply({"params": params}, batch["x"])
          return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

      stats = per_example_stats(loss_fn, variables["params"], batch)
      stats.total_sq_norms  # (B,)
    """
    _, slow = check_args(loss_fn, params, batch, with_sum_sq, chunk_size, tuple(vmap_leaves))
    return _stats_jit(
        params,
        batch,
        directions,
        loss_fn=loss_fn,
        has_aux=False,
        with_sum_sq=with_sum_sq,
        chunk_size=chunk_size,
        vmap_leaves=slow,
    )


def value_grad_and_stats(
    loss_fn: Callable[[Any, Any], Any],
    params: chex.ArrayTree,
    batch: chex.ArrayTree,
    *,
    weights: jax.Array | None = None,
    directions: Mapping[str, jax.Array | tuple[jax.Array, ...]] | None = None,
    with_sum_sq: bool = True,
    has_aux: bool = False,
    chunk_size: int | None = None,
    vmap_leaves: Sequence[str] = (),
) -> tuple[jax.Array | tuple[jax.Array, Any], chex.ArrayTree, PerExampleStats]:
    """The weighted loss ``L = Σ_i w_i ℓ_i``, its gradient and the per-example statistics.

    .. math::

      \\nabla_\\theta L = \\sum_i w_i g_i,

    formed from the same per-use quantities as the statistics (for an outer-product use,
    ``Σ_i w_i Σ_t a_{i,t} δ_{i,t}^T``, the contraction an ordinary backward pass does), so
    the cost is that of :func:`per_example_stats` and no second pass. The statistics are
    those of the unweighted ``g_i``, whatever the weights.

    Args:
      loss_fn: as :func:`per_example_stats`; with ``has_aux``, ``-> ((B,) losses, aux)``.
      params, batch, directions, with_sum_sq, chunk_size, vmap_leaves: as
        :func:`per_example_stats`.
      weights: optional ``(B,)`` floating-point weights (zeros allowed); ``None``: ``1/B``
        each (the mean loss). Concrete non-finite weights raise ``ValueError``; traced ones
        make the loss and gradient non-finite, which a finite guard reports.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.

    Returns:
      ``(loss, grads, stats)``, or ``((loss, aux), grads, stats)`` with ``has_aux`` (as
      ``jax.value_and_grad``); ``grads`` is a pytree like ``params`` with its dtypes.
    """
    size, slow = check_args(loss_fn, params, batch, with_sum_sq, chunk_size, tuple(vmap_leaves))
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` must be a bool, got {has_aux!r}.")
    weights = check_weights(weights, size)
    loss, aux, grads, stats = _value_grad_jit(
        params,
        batch,
        weights,
        directions,
        loss_fn=loss_fn,
        has_aux=has_aux,
        with_sum_sq=with_sum_sq,
        chunk_size=chunk_size,
        vmap_leaves=slow,
    )
    return ((loss, aux) if has_aux else loss), grads, stats


def direction_shapes(
    loss_fn: Callable[[Any, Any], jax.Array], params: chex.ArrayTree, batch: chex.ArrayTree
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{path: (S_1, S_2)}`` (or ``(S_1,)``): the factor shapes of each leaf's directions
    for which :func:`per_example_stats`' dots are as cheap as its norms.

    For a leaf used as a matrix (a Dense kernel, an embedding table) ``S_1 × S_2`` is its
    ``(contracting, free)`` split; otherwise ``(shape[:-1], shape[-1:])`` for ``ndim ≥ 2``
    and ``(shape,)`` below. Traces ``loss_fn`` abstractly; nothing is computed.
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    _check_params(params)
    leaves = jax.tree_util.tree_leaves(params)
    paths = param_paths(params)
    shapes = [tuple(jnp.shape(x)) for x in leaves]
    found: dict[int, tuple] = {}

    def probe(params, batch):
        flat, treedef = jax.tree_util.tree_flatten(params)
        b_leaves, b_def = jax.tree_util.tree_flatten(batch)

        def flat_fn(*args):
            out = loss_fn(
                jax.tree_util.tree_unflatten(treedef, args[: len(flat)]),
                jax.tree_util.tree_unflatten(b_def, args[len(flat) :]),
            )
            return [out]

        tr = tracing.trace(flat_fn, len(flat), [*flat, *b_leaves])
        for u in tr.uses:
            if u.eqn.primitive.name not in ("dot_general", "gather") or len(u.nodes) != 1:
                continue
            (node,) = u.nodes.values()
            if len(node.leaves) != 1:
                continue
            (leaf,) = node.leaves
            if leaf in found or leaf in tr.opaque:
                continue
            split = _split_of_use(u, node, shapes[leaf])
            if split is not None:
                found[leaf] = split
        return 0

    if batch_size_of(batch) == 1:  # see one_pass
        batch = jax.tree.map(lambda x: jnp.concatenate([x, x]), batch)
    jax.eval_shape(probe, params, batch)
    out = {}
    for k, shape in enumerate(shapes):
        if k in found:
            out[paths[k]] = found[k]
        elif len(shape) >= 2:
            out[paths[k]] = (shape[:-1], shape[-1:])
        else:
            out[paths[k]] = (shape,)
    return out


def _split_of_use(use, node, shape):
    """The consecutive split of ``shape`` matching a use's ``(r, c)`` layout, or ``None``."""
    index = tracing.index_map(node, shape)
    if index is None:
        return None
    name = use.eqn.primitive.name
    if name == "dot_general":
        ((side, _),) = use.nodes.items()
        (lc, rc), _ = use.eqn.params["dimension_numbers"]
        pc = (lc, rc)[side]
        pf = [d for d in range(index.ndim) if d not in pc]
        r = math.prod(index.shape[d] for d in pc)
        mat = np.transpose(index, (*pc, *pf)).reshape(r, -1)
    else:
        mat = index.reshape(index.shape[0], -1)
    for m in (mat, mat.T):
        if _is_identity(m) and m.size == math.prod(shape):
            for k in range(1, len(shape)):
                if math.prod(shape[:k]) == m.shape[0]:
                    return (shape[:k], shape[k:])
    return None
