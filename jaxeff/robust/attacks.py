"""Projected-gradient attacks (PGD) in any norm of :mod:`jaxeff.robust`, batched and compiled.

Each step moves along the steepest-ascent direction of the attack loss in the attack norm,
then projects back onto the ε-ball around the clean point (and onto the input box):

.. math::

  \\delta_{t+1} = \\Pi\\big(\\delta_t + \\alpha\\, d^*(\\nabla_x \\ell(x + \\delta_t, y))\\big),
  \\qquad d^*(g) = \\arg\\max_{||d||_p \\le 1} \\langle g, d\\rangle

with ``d*`` from :func:`jaxeff.robust.maximizing_direction` (``sign(g)`` for L∞,
``g / ||g||_2`` for L2, a coordinate step for L1, ``F⁻¹(G / |G|)`` for Fourier-L∞: unit
modulus and the gradient's phase on every DFT coefficient) and ``Π`` from
:func:`jaxeff.robust.project`. On a linear classifier the gradient of the loss is a
positive multiple of ``-y w`` for every ``x``, so the iterates reach the closed-form worst
case of :func:`jaxeff.robust.worst_case_perturbation`. A multi-class linear model's
untargeted loss is a maximum of linear functions, whose ascent can stop at a vertex that is
best for the wrong pair of classes; attacking each pair (a callable ``loss`` of
``z_j - z_y`` for each other class ``j``) and keeping any success gives the closed form
exactly.

Madry, Makelov, Schmidt, Tsipras, Vladu, `Towards Deep Learning Models Resistant to
Adversarial Attacks <https://arxiv.org/abs/1706.06083>`_, ICLR 2018; Fourier-L∞ attacks as in
Faghri et al., `Bridging the Gap Between Adversarial Robustness and Optimization Bias
<https://arxiv.org/abs/2102.08868>`_, 2021.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from jaxeff.robust.norms import check_norm, maximizing_direction, norm, top_k_direction
from jaxeff.robust.projections import check_eps, project

__all__ = ["ATTACK_LOSSES", "AttackResult", "pgd_attack"]

ATTACK_LOSSES = ("cross_entropy", "margin")
# Rounds of box clipping and ball projection that bring a Fourier-norm perturbation close
# to the intersection before the exact final shrink (see `pgd_attack`).
_BOX_ROUNDS = 4
# `unroll=None` writes the attack out on CPU for at most this many gradient steps in all
# (steps x restarts), when one forward pass of the batch costs at least this many floating
# point operations; benchmarks/robust_attack.py measures the trade-off (see `pgd_attack`).
_UNROLL_MAX_STEPS = 32
_UNROLL_MIN_FLOPS = 2e7


class AttackResult(NamedTuple):
    """Outcome of :func:`pgd_attack`, one entry per example.

    Attributes:
      x_adv: ``(B, *S)`` the worst point found for each example: inside the ε-ball around
        ``x`` (and inside the box ``clip``).
      success: ``(B,)`` bool: ``x_adv`` is misclassified (untargeted) or classified as the
        target (targeted). A point on the decision boundary counts as misclassified.
      loss: ``(B,)`` the attack loss at ``x_adv``.
      logits: the model's output at ``x_adv``, ``(B,)`` (binary) or ``(B, K)``.
    """

    x_adv: jax.Array
    success: jax.Array
    loss: jax.Array
    logits: jax.Array

    @property
    def robust_accuracy(self) -> jax.Array:
        """Fraction of examples the attack did not succeed on: for an untargeted attack,
        the accuracy under attack (an upper bound on the true robust accuracy)."""
        return jnp.mean(~self.success)


# ----------------------------------------------------------------------------- losses


def _true_and_other(logits, y):
    """The logit of class ``y`` and the largest other logit, per example."""
    true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    is_true = jnp.arange(logits.shape[1])[None, :] == y[:, None]
    other = jnp.max(jnp.where(is_true, -jnp.inf, logits), axis=1)
    return true, other


def _cross_entropy(logits, y):
    """Logistic loss ``log(1 + exp(-y s))`` (binary) or softmax cross-entropy."""
    if logits.ndim == 1:
        return jax.nn.softplus(-y * logits)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _margin(logits, y):
    """Negative margin: ``-y s`` (binary) or ``max_{j≠y} z_j - z_y`` (Carlini-Wagner)."""
    if logits.ndim == 1:
        return -y * logits
    true, other = _true_and_other(logits, y)
    return other - true


_LOSS_FUNCTIONS = {"cross_entropy": _cross_entropy, "margin": _margin}


def _is_correct(logits, y):
    """Strictly on the side of label ``y``: ``y s > 0`` or ``z_y > max_{j≠y} z_j``."""
    if logits.ndim == 1:
        return y * logits > 0
    true, other = _true_and_other(logits, y)
    return true > other


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class _ModuleApply:
    """Calls an nnx module given as its (static) graph and (traced) state."""

    graphdef: Any

    def __call__(self, state, x):
        return nnx.merge(self.graphdef, state)(x)


@dataclasses.dataclass(frozen=True)
class _FunctionApply:
    """Calls a plain ``apply_fn(x)``; the state is empty."""

    fn: Callable

    def __call__(self, state, x):
        del state
        return self.fn(x)


def _split_model(apply_fn):
    """``(static caller, traced state)``; a module's arrays travel as arguments."""
    if isinstance(apply_fn, nnx.Module):
        graphdef, state = nnx.split(apply_fn)
        return _ModuleApply(graphdef), state
    if not callable(apply_fn):
        raise TypeError(
            f"`apply_fn` must be a callable x -> logits or an nnx.Module, got "
            f"{type(apply_fn).__name__}."
        )
    return _FunctionApply(apply_fn), None


# ----------------------------------------------------------------------------- steps


def _ascent_direction(g, p, top_k):
    """Unit steepest-ascent direction per example; L1 with ``top_k > 1`` is the sign of
    ``g`` on its ``top_k`` largest coordinates, scaled to unit L1 norm (SLIDE)."""
    if p == 1 and top_k > 1:
        flat = g.reshape(g.shape[0], -1)
        k = min(top_k, flat.shape[1])
        return (top_k_direction(flat, k) / k).reshape(g.shape).astype(g.dtype)
    return maximizing_direction(g, p, batch_dims=1)


def _ball_shrink(delta, radius, p):
    """``t δ`` with the largest ``t ∈ [0, 1]`` per example that puts it in the ε-ball."""
    size = norm(delta, p, batch_dims=1)
    t = jnp.where(size > radius, radius / jnp.where(size > 0, size, 1), 1)
    return t.reshape((-1,) + (1,) * (delta.ndim - 1)).astype(delta.dtype) * delta


def _loop(count, static_count, body, init):
    """``lax.fori_loop`` over a traced count, or the body written ``static_count`` times."""
    if static_count is None:
        return jax.lax.fori_loop(0, count, body, init)
    for i in range(static_count):
        init = body(i, init)
    return init


def _feasible(x, delta, radius, lo, hi, *, p, has_clip, unroll):
    """A perturbation in the ε-ball (and with ``x + δ`` in the box): see `pgd_attack`."""
    delta = project(delta, p, radius, batch_dims=1)
    if not has_clip:
        return delta
    delta = jnp.clip(x + delta, lo, hi) - x
    if not isinstance(p, str):
        return delta

    def project_then_clip(_, delta):
        return jnp.clip(x + project(delta, p, radius, batch_dims=1), lo, hi) - x

    delta = _loop(_BOX_ROUNDS, _BOX_ROUNDS if unroll else None, project_then_clip, delta)
    return _ball_shrink(delta, radius, p)


class _Best(NamedTuple):
    x_adv: jax.Array
    success: jax.Array
    objective: jax.Array
    logits: jax.Array


def _keep_worse(best, z, objective, logits, success):
    """Per example, the candidate replaces the kept point if it succeeds where the kept one
    does not, or succeeds equally and has a higher objective (NaN never replaces)."""
    replace = (success & ~best.success) | ((success == best.success) & (objective > best.objective))

    def pick(new, old):
        return jnp.where(replace.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    return _Best(
        pick(z, best.x_adv),
        pick(success, best.success),
        pick(objective, best.objective),
        pick(logits, best.logits),
    )


_STATIC = (
    "model_fn",
    "p",
    "loss_fn",
    "targeted",
    "top_k",
    "has_clip",
    "random_start",
    "unrolled",
)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _attack(
    model_fn,
    state,
    x,
    y,
    key,
    radius,
    step_size,
    lo,
    hi,
    steps,
    restarts,
    *,
    p,
    loss_fn,
    targeted,
    top_k,
    has_clip,
    random_start,
    unrolled,
):
    """The whole attack, every restart and step, as one compiled program; ``unrolled`` is
    None (loops over the traced counts) or the static ``(steps, restarts)`` to unroll."""
    batch = x.shape[0]
    column = (batch,) + (1,) * (x.ndim - 1)
    feasible = functools.partial(_feasible, p=p, has_clip=has_clip, unroll=unrolled is not None)
    static_steps, static_restarts = unrolled or (None, None)

    def point(delta):
        # The box again, against rounding in x + δ (δ already keeps x + δ inside).
        return jnp.clip(x + delta, lo, hi) if has_clip else x + delta

    def objective(z):
        logits = model_fn(state, z)
        loss = loss_fn(logits, y)
        if jnp.shape(loss) != (batch,):
            raise ValueError(
                f"`loss` must return one value per example, shape ({batch},), got shape "
                f"{jnp.shape(loss)}."
            )
        success = _is_correct(logits, y)
        if not targeted:
            success = ~success
        return (-loss if targeted else loss), logits, success

    def objective_and_gradient(z):
        def total(z):
            value, logits, success = objective(z)
            return jnp.sum(value), (value, logits, success)

        (_, aux), g = jax.value_and_grad(total, has_aux=True)(z)
        return aux, g

    def restart(r, best):
        if random_start:
            noise = jax.random.uniform(jax.random.fold_in(key, r), x.shape, x.dtype, -1, 1)
            delta = feasible(x, noise * radius.reshape(column), radius, lo, hi)
        else:
            delta = jnp.zeros_like(x)

        def step(_, carry):
            delta, best = carry
            z = point(delta)
            (value, logits, success), g = objective_and_gradient(z)
            best = _keep_worse(best, z, value, logits, success)
            moved = delta + step_size.reshape(column) * _ascent_direction(g, p, top_k)
            return feasible(x, moved, radius, lo, hi), best

        delta, best = _loop(steps, static_steps, step, (delta, best))
        z = point(delta)
        return _keep_worse(best, z, *objective(z))

    value, logits, success = objective(x)
    best = _Best(x, success, value, logits)
    best = _loop(restarts, static_restarts, restart, best)
    loss = -best.objective if targeted else best.objective
    return AttackResult(best.x_adv, best.success, loss, best.logits)


# ----------------------------------------------------------------------------- checks


@functools.lru_cache(maxsize=256)
def _cached_forward_flops(model_fn, treedef, leaves, x):
    return _forward_flops(model_fn, jax.tree.unflatten(treedef, leaves), x)


def _forward_flops(model_fn, state, x):
    """XLA's estimate of the floating-point operations of ``model_fn(state, x)`` (0 if none)."""
    cost = jax.jit(model_fn).lower(state, x).cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    return float((cost or {}).get("flops", 0.0))


def _unroll_default(model_fn, state, x, steps, restarts):
    """``unroll=None``: unrolled on CPU for at most ``_UNROLL_MAX_STEPS`` steps in all, when
    a forward pass costs at least ``_UNROLL_MIN_FLOPS`` (shapes only: cached per model)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        platforms = {device.platform for device in x.devices()}
    else:
        platforms = {jax.default_backend()}
    if platforms != {"cpu"} or steps * restarts > _UNROLL_MAX_STEPS:
        return False
    leaves, treedef = jax.tree.flatten(state)
    shapes = tuple(jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for v in leaves)
    example = jax.ShapeDtypeStruct(x.shape, x.dtype)
    try:
        flops = _cached_forward_flops(model_fn, treedef, shapes, example)
    except TypeError:  # a model that cannot be hashed: estimated for this call only
        flops = _forward_flops(model_fn, jax.tree.unflatten(treedef, shapes), example)
    return flops >= _UNROLL_MIN_FLOPS


def _check_count(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _per_example(value, name, batch, dtype):
    check_eps(value, name)
    try:
        return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))
    except ValueError:
        raise ValueError(
            f"`{name}` must be a scalar or one value per example, shape ({batch},), got shape "
            f"{jnp.shape(value)}."
        ) from None


def _check_labels(y, logits_shape, batch, targeted):
    what = "target" if targeted else "label"
    if jnp.shape(y) != (batch,):
        raise ValueError(
            f"`y` must have shape ({batch},), one {what} per row of `x`, got {jnp.shape(y)}."
        )
    concrete = not isinstance(y, jax.core.Tracer)
    if len(logits_shape) == 1:
        if concrete and not np.all(np.isin(np.asarray(y), (-1, 1))):
            raise ValueError(f"`y` must hold binary {what}s in {{-1, +1}} for (B,) logits.")
        return
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise ValueError(
            f"`y` must hold integer class {what}s for (B, K) logits, got dtype "
            f"{jnp.result_type(y)}."
        )
    k = logits_shape[1]
    if concrete and batch and not (np.min(np.asarray(y)) >= 0 and np.max(np.asarray(y)) < k):
        raise ValueError(f"`y` must hold class {what}s in [0, {k}) for logits with {k} classes.")


def _check_logits(logits_shape, batch):
    if len(logits_shape) == 1 and logits_shape[0] == batch:
        return
    if len(logits_shape) == 2 and logits_shape[0] == batch and logits_shape[1] >= 2:
        return
    raise ValueError(
        f"`apply_fn` must return ({batch},) scores (binary) or ({batch}, K) logits with K >= 2 "
        f"for `x` with {batch} rows, got shape {logits_shape}."
    )


def _check_clip(clip, x):
    if clip is None:
        return False, jnp.zeros((), x.dtype), jnp.zeros((), x.dtype)
    if not isinstance(clip, tuple | list) or len(clip) != 2:
        raise ValueError(f"`clip` must be None or a pair (lo, hi), got {clip!r}.")
    with jax.ensure_compile_time_eval():  # concrete bounds stay concrete inside a jit trace
        lo, hi = (jnp.asarray(bound, x.dtype) for bound in clip)
    for bound in (lo, hi):
        try:
            jnp.broadcast_shapes(jnp.shape(bound), x.shape)
        except ValueError:
            raise ValueError(
                f"`clip` bounds must broadcast to the shape of `x` {x.shape}, got shapes "
                f"{jnp.shape(lo)} and {jnp.shape(hi)}."
            ) from None
    if not any(isinstance(v, jax.core.Tracer) for v in (x, lo, hi)):
        with jax.ensure_compile_time_eval():  # concrete values, even inside a jit trace
            ordered = bool(jnp.all(lo <= hi))
            inside = bool(jnp.all((x >= lo) & (x <= hi)))
        if not ordered:
            raise ValueError(f"`clip` must have lo <= hi, got {clip!r}.")
        if not inside:
            raise ValueError("`x` must lie inside the box `clip` = (lo, hi).")
    return True, lo, hi


# ----------------------------------------------------------------------------- attack


def pgd_attack(
    apply_fn: nnx.Module | Callable[[jax.Array], jax.Array],
    x: ArrayLike,
    y: ArrayLike,
    *,
    eps: ArrayLike,
    p: float | str,
    steps: int,
    step_size: ArrayLike,
    restarts: int = 1,
    key: jax.Array | None = None,
    loss: str | Callable[[jax.Array, jax.Array], jax.Array] = "cross_entropy",
    clip: tuple[ArrayLike, ArrayLike] | None = None,
    targeted: bool = False,
    top_k: int = 1,
    unroll: bool | None = None,
) -> AttackResult:
    """Projected gradient ascent on the loss within ``||δ||_p <= ε``, worst of restarts.

    .. math::

      \\delta_{t+1} = \\Pi_{B_p(\\epsilon)}\\big(\\delta_t + \\alpha\\, d^*(\\nabla_x
      \\ell(f(x + \\delta_t), y))\\big),\\qquad
      d^*(g) = \\arg\\max_{||d||_p \\le 1} \\langle g, d\\rangle

    Steps (unit vectors of the attack norm, scaled by ``step_size``):

    * L∞: ``sign(g)``; L2: ``g / ||g||_2``; any other ``p >= 1``: the Hölder-optimal
      direction (:func:`jaxeff.robust.maximizing_direction`);
    * L1: ``top_k = 1`` moves the single coordinate with the largest ``|g_i|`` (the exact
      steepest ascent); ``top_k = k`` moves the ``k`` largest by ``sign(g_i) / k`` each
      (the SLIDE step of Tramèr & Boneh, 2019);
    * Fourier-L∞ (``"fourier_inf"``): ``F⁻¹(G / |G|)``, ``G`` the orthonormal DFT of the
      gradient (per channel, 2-D over ``(H, W)`` for ``(B, H, W, C)`` images, see
      :mod:`jaxeff.robust.fourier`): every coefficient of the step has unit modulus and the
      gradient's phase. The projection clips the modulus of each coefficient of ``δ`` at
      ε and keeps its phase.

    Projection order. ``δ`` is first projected onto the ε-ball (:func:`jaxeff.robust.project`);
    then, with ``clip = (lo, hi)``, ``x + δ`` is clipped to the box. For the Lp norms clipping
    only shrinks each ``|δ_i|`` (``x`` is in the box), which never increases an Lp norm, so
    the result is in both sets. For the Fourier norms clipping can leave the ball, so the
    two projections alternate a few times, ending with the clip; then ``δ`` is scaled by
    the largest factor ``t <= 1`` that puts ``tδ`` in the ball, which keeps ``x + tδ`` in the
    box (between ``x`` and the clipped point). The alternation brings ``δ`` close to both
    sets, so ``t`` is close to 1 even on images with saturated pixels (digits, CIFAR-10),
    where a dense Fourier perturbation always leaves the box. Every iterate, and so
    ``x_adv``, lies in the ball and the box (to float rounding).

    Restarts and selection. With a ``key`` each restart ``r`` starts at the projection of
    uniform noise on ``[-ε, ε]^n`` (key ``fold_in(key, r)``, so a run with more restarts
    extends one with fewer); without one the single run starts at ``x``. Every iterate of
    every restart, and the clean point, is a candidate; per example the kept one is the
    successful candidate with the highest loss, or the highest-loss one if none succeeds
    (the earliest on ties). So the accuracy under attack never exceeds the clean accuracy,
    and more steps or restarts never raise it.

    Classifiers. ``apply_fn(x)`` returns ``(B,)`` scores with labels ``y ∈ {±1}`` (binary,
    correct iff ``y s > 0``) or ``(B, K)`` logits with integer labels (correct iff the
    true logit is strictly the largest). Examples must not interact in ``apply_fn`` (no
    BatchNorm in training mode): the gradient of the summed loss is then each example's own.

    Compilation. The whole attack, every restart and step, is one compiled program (two
    nested ``lax.fori_loop``, or written out when unrolled: on CPU the default for short
    attacks of costly models, see ``unroll``). ``p``, ``loss``, ``targeted``, ``top_k``,
    ``unroll``, whether ``clip`` is given and whether ``key`` is given are static; ``x``,
    ``y``, ``eps``, ``step_size``, ``steps`` and ``restarts`` (unless unrolled), the
    bounds, the key and an nnx model's weights are traced, so changing any of them reuses
    the compiled program. An ``nnx.Module`` passed as ``apply_fn`` is split into its graph
    (static) and state (traced): new weights, or another model of the same structure, also
    reuse it. A plain callable is static and
    compiled per distinct object, with the arrays it closes over as constants: when weights
    change, pass the module itself, or call ``pgd_attack`` inside your own
    ``jax.jit``/``nnx.jit``. A callable ``loss`` is likewise cached by identity.

    Args:
      apply_fn: an ``nnx.Module`` or a callable ``x -> logits`` (e.g. a closure over
        ``nnx.merge(graphdef, state)``).
      x: ``(B, *S)`` clean inputs (any example shape for Lp norms; ``(d,)``, ``(H, W)`` or
        ``(H, W, C)`` for the Fourier norms).
      y: ``(B,)`` labels (``±1`` for binary scores, integers for logits); the targets if
        ``targeted``.
      eps: radius ``>= 0``: a scalar or one per example.
      p: norm of the perturbation: ``1``, ``2``, ``jnp.inf``, any number ``>= 1``,
        ``"fourier_1"`` or ``"fourier_inf"``.
      steps: number of gradient steps per restart (``>= 0``).
      step_size: ``α >= 0``, the length of each step in the attack norm (a scalar or one
        per example); e.g. ``2.5 ε / steps`` (Madry et al.).
      restarts: number of runs (``>= 1``; more than one needs a ``key``).
      key: PRNG key for the random starts, or None to start once at ``x``.
      loss: ``"cross_entropy"`` (logistic loss for binary scores), ``"margin"`` (``-y s``;
        ``max_{j≠y} z_j - z_y``), or a callable ``loss(logits, y) -> (B,)``. The attack
        maximises it (minimises it if ``targeted``).
      clip: None, or ``(lo, hi)`` bounds of the valid inputs (scalars or arrays that
        broadcast to ``x``); ``x`` must lie inside.
      targeted: whether ``y`` holds target classes to reach instead of true labels.
      top_k: number of coordinates moved per step for ``p = 1``.
      unroll: write every step and restart out in the program (``True``) instead of looping
        over them (``False``): ``steps`` and ``restarts`` become static and the compile time
        grows with their product. ``None`` (default) decides by backend and cost: unrolled
        on CPU when ``steps * restarts <= 32`` and one forward pass of the batch costs at
        least 20 MFLOP (XLA's estimate, computed once per model and shape), looped
        otherwise and on accelerators. XLA:CPU runs a convolution's gradient inside a
        while loop 1.5-4x slower than outside one, and unrolling adds about 0.1-0.15 s of
        compile time per step; ``benchmarks/robust_attack.py`` measured, on two cores at
        20 steps, a CIFAR-sized CNN on 128 images (2 GFLOP) 1.5-2.2x faster, repaying the
        extra compile time within 3 calls, and a digits-sized one on 256 images (39 MFLOP)
        3-4x faster within 14 calls; on much smaller problems it is never repaid.

    Returns:
      An :class:`AttackResult` ``(x_adv, success, loss, logits)``;
      ``result.robust_accuracy`` is ``mean(~success)``.

    Raises:
      ValueError: naming the argument for an unknown ``p``, a negative or NaN ``eps`` or
        ``step_size``, bad ``steps``/``restarts``/``top_k``, restarts without a ``key``,
        an unknown ``loss``, outputs that are neither ``(B,)`` nor ``(B, K)``, labels of
        the wrong shape or values, or an ``x`` that is not finite (values checked unless
        traced) or lies outside ``clip``.
      TypeError: for an ``apply_fn`` that is not callable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxeff.robust import pgd_attack
      >>> w = jnp.array([1.0, -2.0])
      >>> x, y = jnp.array([[1.0, -1.0], [0.2, 0.0]]), jnp.array([1, 1])
      >>> result = pgd_attack(lambda z: z @ w, x, y, eps=0.5, p=jnp.inf, steps=5,
      ...                     step_size=0.25)
      >>> print(result.x_adv, result.robust_accuracy)
      [[ 0.5 -0.5]
       [-0.3  0.5]] 0.5

    References:
      Madry et al., `Towards Deep Learning Models Resistant to Adversarial Attacks
      <https://arxiv.org/abs/1706.06083>`_, ICLR 2018. Tramèr, Boneh, `Adversarial Training
      and Robustness for Multiple Perturbations <https://arxiv.org/abs/1904.13000>`_,
      NeurIPS 2019.
    """
    p = check_norm(p, "p")
    steps = _check_count(steps, "steps", 0)
    restarts = _check_count(restarts, "restarts", 1)
    top_k = _check_count(top_k, "top_k", 1)
    if top_k > 1 and p != 1:
        raise ValueError(f"`top_k` applies to p = 1 only, got top_k={top_k} with p={p!r}.")
    if key is None and restarts > 1:
        raise ValueError(
            "`key` is required for `restarts` > 1: each restart starts at a random point."
        )
    if isinstance(loss, str):
        if loss not in _LOSS_FUNCTIONS:
            raise ValueError(f"`loss` must be one of {ATTACK_LOSSES} or a callable, got {loss!r}.")
        loss_fn = _LOSS_FUNCTIONS[loss]
    elif callable(loss):
        loss_fn = loss
    else:
        raise ValueError(f"`loss` must be one of {ATTACK_LOSSES} or a callable, got {loss!r}.")
    if not isinstance(targeted, bool):
        raise ValueError(f"`targeted` must be a bool, got {targeted!r}.")
    if unroll is not None and not isinstance(unroll, bool):
        raise ValueError(f"`unroll` must be None or a bool, got {unroll!r}.")

    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if x.ndim < 1:
        raise ValueError(f"`x` must have a leading batch axis, got shape {x.shape}.")
    if not isinstance(x, jax.core.Tracer):
        with jax.ensure_compile_time_eval():  # concrete values, even inside a jit trace
            finite = bool(jnp.all(jnp.isfinite(x)))
        if not finite:
            raise ValueError("`x` must be finite (it holds NaN or inf).")
    batch = x.shape[0]
    radius = _per_example(eps, "eps", batch, x.dtype)
    step_size = _per_example(step_size, "step_size", batch, x.dtype)
    has_clip, lo, hi = _check_clip(clip, x)

    model_fn, state = _split_model(apply_fn)
    logits = jax.eval_shape(model_fn, state, x)
    _check_logits(logits.shape, batch)
    _check_labels(y, logits.shape, batch, targeted)
    y = jnp.asarray(y, logits.dtype if len(logits.shape) == 1 else None)

    if unroll is None:
        unroll = _unroll_default(model_fn, state, x, steps, restarts)
    random_start = key is not None
    if key is None:
        key = jax.random.key(0)
    try:
        hash(model_fn)
    except TypeError:  # e.g. an array attribute in the graph: compiled for this call only
        model_fn = _FunctionApply(functools.partial(model_fn, state))
        state = None
    return _attack(
        model_fn,
        state,
        x,
        y,
        key,
        radius,
        step_size,
        lo,
        hi,
        jnp.asarray(steps, jnp.int32),
        jnp.asarray(restarts, jnp.int32),
        p=p,
        loss_fn=loss_fn,
        targeted=targeted,
        top_k=top_k,
        has_clip=has_clip,
        random_start=random_start,
        unrolled=(steps, restarts) if unroll else None,
    )
