"""Train state and the jit-compiled update step for flax nnx models used functionally.

The model is split once into a static ``graphdef`` and a pytree :class:`TrainState`
(parameters, optimizer state, other model variables such as batch statistics or RNG
counters). The update step merges them back inside ``jax.jit``, differentiates the user's
loss with respect to the parameters, applies the optax transform and returns the new state
with a dict of measurements (loss, gradient norm, parameter norm, the loss's own metrics,
and a ``finite`` flag), as in big_vision's ``update_fn``. Optionally the same pass also
yields per-example gradient statistics (:func:`jaxeff.pergrad.value_grad_and_stats`),
handed to the optimizer and returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType

from jaxeff.pergrad import check_directions
from jaxeff.pergrad.reference import check_chunk_size
from jaxeff.pergrad.stats import value_grad_and_stats

__all__ = [
    "RESERVED_METRICS",
    "FiniteGuard",
    "TrainState",
    "check_finite",
    "create_train_state",
    "first_non_finite_leaf",
    "make_train_step",
    "merge_model",
]

#: Keys the train step writes into its metrics dict; a loss must not return them as aux.
RESERVED_METRICS = ("loss", "grad_norm", "param_norm", "update_norm", "finite")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    Attributes:
      step: scalar ``int32``, the number of updates applied so far.
      params: ``nnx.State`` of the model's ``nnx.Param`` variables (what is trained).
      opt_state: the optax state of ``tx`` for ``params``.
      model_state: ``nnx.State`` of every other model variable (batch statistics, RNG
        keys and counters, ...); an empty state when the model has none. Values sown
        during a forward pass (``nnx.Intermediate``) are never part of it.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    model_state: nnx.State

    if TYPE_CHECKING:  # added by flax.struct.dataclass (dataclasses.replace)

        def replace(self, **updates: Any) -> TrainState:
            """A copy of the state with the fields named in ``updates`` replaced."""
            ...


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits an nnx model into a static graph and an initial :class:`TrainState`.

    Args:
      model: an initialised ``nnx.Module``.
      tx: the optax transform that will update the parameters (clipping and learning-rate
        schedules belong in it, e.g. ``optax.chain(optax.clip_by_global_norm(2.0),
        optax.adam(schedule))``).

    Returns:
      ``(graphdef, state)``: the static ``nnx.GraphDef`` and a :class:`TrainState` with
      ``step = 0``, ``params`` the ``nnx.Param`` variables, ``opt_state = tx.init(params)``
      and ``model_state`` all other variables.

    Example::

      model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      graphdef, state = create_train_state(model, optax.adam(1e-3))
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"`tx` must be an optax.GradientTransformation, got {type(tx).__name__}.")
    if jax.tree.leaves(nnx.state(model, nnx.Intermediate)):
        model = nnx.clone(model)  # values sown by an earlier call are not part of the graph
        nnx.pop(model, nnx.Intermediate)
    # nnx.split with filters is typed as returning a tuple of any length (so: ignore[misc]).
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state=model_state,
    )
    return graphdef, state


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """Rebuilds the nnx model from ``graphdef`` and a :class:`TrainState`, e.g. to evaluate.

    The model holds new ``nnx.Variable`` objects around the arrays of ``state``, so
    running or changing it never mutates ``state``. Call ``model.eval()`` on it for
    evaluation behaviour (dropout off, batch norm on running statistics).

    Args:
      graphdef: the graph returned by :func:`create_train_state`.
      state: a :class:`TrainState` (concrete, or traced inside ``jax.jit``).

    Returns:
      The ``nnx.Module`` with ``state.params`` and ``state.model_state`` as its variables.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"`state` must be a TrainState, got {type(state).__name__}.")
    return nnx.merge(graphdef, state.params, state.model_state, copy=True)


def _example_weights(batch, weights_key: str, size: int):
    """``batch[weights_key]`` checked to be ``(size,)``, or ``None`` when absent."""
    if not (isinstance(batch, Mapping) and weights_key in batch):
        return None
    weights = batch[weights_key]
    if jnp.shape(weights) != (size,):
        raise ValueError(
            f"`batch[{weights_key!r}]` must hold one weight per example, shape ({size},), "
            f"got {jnp.shape(weights)}."
        )
    return weights


def _uniform_weights(size: int, dtype):
    return jnp.full((size,), 1.0 / size, dtype)


def _reduce_loss(losses, batch, weights_key: str):
    """``(loss, weights)``: a scalar as is, or ``Σ_i w_i ℓ_i`` of per-example losses."""
    ndim = jnp.ndim(losses)
    if ndim == 0:
        return losses, None
    if ndim != 1:
        raise ValueError(
            "`loss_fn` must return a scalar loss or a (B,) vector of per-example losses, got "
            f"shape {jnp.shape(losses)}."
        )
    b = jnp.shape(losses)[0]
    examples = batch
    if isinstance(batch, Mapping):
        examples = {k: v for k, v in batch.items() if k != weights_key}
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(examples) if jnp.ndim(x) > 0}
    if sizes and sizes != {b}:
        raise ValueError(
            f"`loss_fn` returned {b} per-example losses for a batch of {sorted(sizes)} "
            "examples; return one loss per example, or a scalar."
        )
    weights = _example_weights(batch, weights_key, b)
    if weights is None:
        weights = _uniform_weights(b, jnp.result_type(losses))
    return jnp.sum(weights * losses), weights


def _check_loss_output(out):
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise TypeError(
            f"`loss_fn` must return (loss, aux_metrics_dict), got {type(out).__name__}."
        )
    return out


def _examples_in(batch, weights_key: str) -> int | None:
    """The leading-axis size of the batch's first array other than the weights."""
    examples = batch
    if isinstance(batch, Mapping):
        examples = {k: v for k, v in batch.items() if k != weights_key}
    for x in jax.tree.leaves(examples):
        if jnp.ndim(x) > 0:
            return jnp.shape(x)[0]
    return None


def _constrain_batch(batch, sharding):
    """Lays ``batch`` out as ``sharding``: a constraint on auto mesh axes, a ``reshard`` on
    explicit ones (where shardings are part of the arrays' types)."""
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and any(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.tree.map(lambda x: jax.sharding.reshard(x, sharding), batch)
    return jax.lax.with_sharding_constraint(batch, sharding)


def _replicated_like(sharding_tree):
    """A replicated ``NamedSharding`` on the mesh of the first leaf of ``sharding_tree``."""
    leaves = jax.tree.leaves(sharding_tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    for leaf in leaves:
        if isinstance(leaf, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec())
    raise TypeError(
        "`state_sharding` must be a jax.sharding.NamedSharding or a pytree of them "
        f"(see jaxeff.train.replicated_sharding), got {sharding_tree!r}."
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: Callable[[nnx.Module, Any, Mapping[str, jax.Array]], tuple[jax.Array, dict]],
    tx: optax.GradientTransformation,
    *,
    donate: bool = True,
    state_sharding: Any = None,
    batch_sharding: jax.sharding.Sharding | None = None,
    weights_key: str = "weights",
    per_example_stats: bool = False,
    directions_fn: Callable[[TrainState], Mapping] | None = None,
    with_sum_sq: bool = True,
    chunk_size: int | None = None,
) -> Callable[..., tuple[Any, ...]]:
    r"""Builds the jit-compiled update step ``step(state, batch, hparams) -> (state, metrics)``.

    One step computes, with :math:`\theta` the parameters and :math:`\ell` the loss,

    .. math::

       g = \nabla_\theta \ell(\theta; \text{batch}, \text{hparams}), \qquad
       (u, s') = \text{tx.update}(g, s, \theta), \qquad \theta' = \theta + u,

    and measures ``loss`` :math:`= \ell`, ``grad_norm`` :math:`= \|g\|_2` (global L2 norm of
    the gradient *before* the transform, i.e. before clipping), ``update_norm``
    :math:`= \|u\|_2`, ``param_norm`` :math:`= \|\theta'\|_2` (after the update, as in
    big_vision), and ``finite``: true when the loss, every gradient entry and every updated
    parameter are finite (an update can overflow even from a finite gradient). The flag
    is read off the two norms, which are finite exactly when every entry is, unless an
    entry is so large (about ``1e19`` in float32) that its square overflows, which is
    reported as non-finite too; this saves two passes over the model per step.
    Pass the metrics to :func:`check_finite` to stop on NaN/inf instead of training
    through it (or wrap ``tx`` in ``optax.apply_if_finite`` to skip such updates).

    The loss may be one number per example, :math:`\ell_i`: the step then minimises the
    weighted sum :math:`\ell = \sum_i w_i \ell_i` with ``batch[weights_key]`` as
    :math:`w` (e.g. the unbiasing weights of a stratified or importance sampler), or the
    mean without weights.

    When ``tx`` is an ``optax.GradientTransformationExtraArgs`` (e.g. ``optax.chain`` of
    such transforms, or ``optax.scale_by_backtracking_linesearch``), its ``update`` also
    receives ``value`` (:math:`\ell`), ``grad`` (:math:`g`), ``value_fn`` (the loss at
    other parameters, for a line search) and, for per-example losses,
    ``per_example_losses`` (:math:`\ell_i`) and ``weights``.

    With ``per_example_stats=True`` the gradient comes from
    :func:`jaxeff.pergrad.value_grad_and_stats`: the one forward/backward pass that gives
    :math:`g = \sum_i w_i g_i` also gives per-example gradient statistics (squared norms
    :math:`\|g_i\|^2`, per-coordinate sums of squares :math:`\sum_i g_i^2`, and inner
    products :math:`\langle g_i, C_k\rangle` with factored directions), at about the cost of
    the plain step plus the statistics. ``loss_fn`` must then return ``(B,)`` per-example
    losses. The statistics, a :class:`jaxeff.pergrad.PerExampleStats`, reach an
    ``ExtraArgs`` ``tx`` as the extra argument ``per_example_stats`` (so a transform can
    keep, e.g., gradient-cluster state in ``opt_state``, and with it in checkpoints) and
    are returned as a third output; ``metrics`` stays a dict of scalars. The directions
    are ``directions_fn(state)``, read from the state being updated (e.g. cluster centres
    held in ``state.opt_state``), so they change without recompiling.

    ``hparams`` is a dict of scalars (e.g. the weight of a loss schedule). Its values are
    traced arguments of the compiled function, so changing them does not recompile;
    changing its keys or the dtype/weak type of a value (``1`` vs ``1.0``) does.

    Args:
      graphdef: the graph returned by :func:`create_train_state`.
      loss_fn: ``loss_fn(model, batch, hparams) -> (loss, aux)``: a scalar loss, or a
        ``(B,)`` vector of per-example losses, and a dict of extra metrics (may be empty).
        ``model`` is the merged nnx module in whatever mode it was created in; changes the
        loss makes to non-parameter variables (batch statistics, RNG counters) are kept in
        ``state.model_state``; values it sows (``nnx.Intermediate``) are dropped.
      tx: the optax transform (clipping and schedules included).
      donate: donate the input state's buffers to the output (saves memory; the state
        passed in must not be used again).
      state_sharding: optional ``NamedSharding`` or pytree of them matching the state (e.g.
        ``replicated_sharding(mesh)``); the new state is laid out with it and the metrics
        are replicated on its mesh.
      batch_sharding: optional sharding of the batch (e.g. ``data_sharding(mesh)``),
        applied inside the step as a sharding constraint (a ``reshard`` on a mesh with
        explicit axes). The batch is best placed with :func:`jaxeff.train.shard_batch`
        beforehand.
      weights_key: the batch entry holding the per-example weights ``(B,)`` that reduce a
        per-example loss.
      per_example_stats: compute the gradient and per-example statistics in one pass (see
        above). Every batch entry then needs the leading example axis, and BatchNorm in
        training mode is refused (it couples the examples).
      directions_fn: with ``per_example_stats``, ``directions_fn(state) -> {parameter
        path: factors}``, the directions of :func:`jaxeff.pergrad.per_example_stats`
        (paths such as ``"layers/0/kernel"``; :func:`jaxeff.pergrad.direction_shapes`
        gives the factor shapes), evaluated on the state before the update. ``None``: no
        inner products.
      with_sum_sq: with ``per_example_stats``, whether to compute the per-coordinate sums
        of squares.
      chunk_size: with ``per_example_stats``, examples per chunk for parameters without a
        fast rule (``vmap(grad)`` path); ``None``: all at once.

    Returns:
      ``step(state, batch, hparams=None) -> (new_state, metrics)``, or with
      ``per_example_stats`` ``-> (new_state, metrics, stats)``; ``metrics`` holds
      ``loss``, ``grad_norm``, ``update_norm``, ``param_norm``, the aux metrics and
      ``finite``, all device scalars; ``stats`` is the
      :class:`jaxeff.pergrad.PerExampleStats` of the batch at the parameters before the
      update (laid out as the compiler chooses). ``step.jitted`` is the underlying
      ``jax.jit`` function (for ``.lower``/cost analysis).

    Example::

      def loss_fn(model, batch, hparams):
        loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
        return hparams["weight"] * loss, {"mse": loss}

      tx = optax.chain(optax.clip_by_global_norm(2.0), optax.adam(1e-3))
      graphdef, state = create_train_state(model, tx)   # the same tx in both calls
      train_step = make_train_step(graphdef, loss_fn, tx)
      state, metrics = train_step(state, batch, {"weight": 1.0})
      check_finite(metrics, step=0)

      # Per-example losses, statistics from the same pass, directions {path: factors}
      # kept in the state of tx's first transform (e.g. gradient-cluster centres).
      def per_example_loss_fn(model, batch, hparams):
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2, axis=-1), {}

      train_step = make_train_step(
          graphdef, per_example_loss_fn, tx, per_example_stats=True,
          directions_fn=lambda state: state.opt_state[0].clusters.centres)
      state, metrics, stats = train_step(state, batch)
      stats.total_sq_norms, stats.dots            # (B,), (K, B)
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"`tx` must be an optax.GradientTransformation, got {type(tx).__name__}.")
    if not isinstance(per_example_stats, bool):
        raise TypeError(f"`per_example_stats` must be a bool, got {per_example_stats!r}.")
    if not per_example_stats and (
        directions_fn is not None or with_sum_sq is not True or chunk_size is not None
    ):
        raise ValueError(
            "`directions_fn`, `with_sum_sq` and `chunk_size` apply to the per-example "
            "statistics; pass `per_example_stats=True` as well."
        )
    if directions_fn is not None and not callable(directions_fn):
        raise TypeError(
            f"`directions_fn` must be callable (state -> directions), got "
            f"{type(directions_fn).__name__}."
        )
    check_chunk_size(chunk_size)

    def per_example_loss_fn(hparams):
        """``loss_fn`` with ``hparams`` bound, for :func:`value_grad_and_stats`."""

        def fn(model, batch):
            losses, aux = _check_loss_output(loss_fn(model, batch, hparams))
            if jnp.ndim(losses) != 1:
                raise ValueError(
                    "With `per_example_stats=True`, `loss_fn` must return a (B,) vector of "
                    f"per-example losses (the step weights them), got shape "
                    f"{jnp.shape(losses)}."
                )
            return losses, dict(aux)

        return fn

    def stats_pass(state: TrainState, batch, hparams):
        """``(loss, aux, model_state, losses, weights, grads, stats)`` from one pass."""
        size = _examples_in(batch, weights_key)
        weights = None if size is None else _example_weights(batch, weights_key, size)
        model = nnx.merge(graphdef, state.params, state.model_state, copy=True)
        directions = None
        if directions_fn is not None:
            directions = directions_fn(state)
            try:
                directions = check_directions(state.params, directions)
            except (TypeError, ValueError) as err:
                raise type(err)(
                    f"`directions_fn(state)` returned unusable directions: {err}"
                ) from None
        (loss, aux), grads, stats = value_grad_and_stats(
            model,
            per_example_loss_fn(hparams),
            batch,
            weights=weights,
            directions=directions,
            with_sum_sq=with_sum_sq,
            has_aux=True,
            chunk_size=chunk_size,
        )
        _, _, _, model_state = nnx.split(model, nnx.Param, nnx.Intermediate, ...)  # type: ignore[misc]
        losses = stats.losses
        if weights is None:
            weights = _uniform_weights(losses.shape[0], losses.dtype)
        return loss, aux, model_state, losses, weights, grads, stats

    def update_fn(state: TrainState, batch, hparams):
        if batch_sharding is not None:
            batch = _constrain_batch(batch, batch_sharding)

        def compute_loss(params):
            model = nnx.merge(graphdef, params, state.model_state, copy=True)
            losses, aux = _check_loss_output(loss_fn(model, batch, hparams))
            loss, weights = _reduce_loss(losses, batch, weights_key)
            _, _, _, model_state = nnx.split(model, nnx.Param, nnx.Intermediate, ...)  # type: ignore[misc]
            return loss, (dict(aux), model_state, losses, weights)

        def value_fn(params, *, per_example_losses=None, weights=None, per_example_stats=None, **_):
            # optax's line search passes value_fn the extra arguments its signature names
            # and refuses any other, so the step's own extra arguments are named (unused).
            del per_example_losses, weights, per_example_stats
            return compute_loss(params)[0]

        stats = None
        if per_example_stats:
            loss, aux, model_state, losses, weights, grads, stats = stats_pass(
                state, batch, hparams
            )
        else:
            (loss, (aux, model_state, losses, weights)), grads = jax.value_and_grad(
                compute_loss, has_aux=True
            )(state.params)
        clash = sorted(set(aux) & set(RESERVED_METRICS))
        if clash:
            raise ValueError(
                f"`loss_fn` aux metrics use reserved names {clash}; rename them "
                f"(reserved: {RESERVED_METRICS})."
            )
        extra = {}
        if isinstance(tx, optax.GradientTransformationExtraArgs):
            extra = {"value": loss, "grad": grads, "value_fn": value_fn}
            if weights is not None:
                extra.update(per_example_losses=losses, weights=weights)
            if stats is not None:
                extra["per_example_stats"] = stats
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
        )
        grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": optax.tree.norm(updates),
            "param_norm": param_norm,
            **aux,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm),
        }
        if per_example_stats:
            return new_state, metrics, stats
        return new_state, metrics

    jit_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if state_sharding is not None:
        out_shardings = (state_sharding, _replicated_like(state_sharding))
        # None: the statistics are laid out as the compiler chooses.
        jit_kwargs["out_shardings"] = out_shardings + ((None,) if per_example_stats else ())
    jitted = jax.jit(update_fn, **jit_kwargs)

    def step(state: TrainState, batch, hparams: Mapping[str, Any] | None = None):
        if not isinstance(state, TrainState):
            raise TypeError(f"`state` must be a TrainState, got {type(state).__name__}.")
        if hparams is None:
            hparams = {}
        elif not isinstance(hparams, Mapping):
            raise TypeError(
                f"`hparams` must be a dict of scalars (or None), got {type(hparams).__name__}."
            )
        for key, value in hparams.items():
            if np.ndim(value) != 0:
                raise ValueError(
                    f"`hparams[{key!r}]` must be a scalar, got shape {np.shape(value)}."
                )
        return jitted(state, batch, dict(hparams))

    step.jitted = jitted  # type: ignore[attr-defined]  # mypy does not model function attributes
    return step


def first_non_finite_leaf(tree: chex.ArrayTree) -> str | None:
    """Path of the first leaf of ``tree`` holding a NaN or infinity, or ``None``.

    Example::

      first_non_finite_leaf(state.params)   # "['encoder']['fc']['kernel'].value"
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            continue
        arr = np.asarray(leaf)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return jax.tree_util.keystr(path)
    return None


def check_finite(
    metrics: Mapping[str, Any], step: int | jax.Array, *, params: chex.ArrayTree | None = None
) -> None:
    """Raises ``FloatingPointError`` when a train step saw a NaN or infinite loss/gradient.

    Reading ``metrics["finite"]`` waits for the step to finish (a device-to-host sync);
    call it every step for safety, or collect the steps' metrics in a
    :class:`FiniteGuard` and check them only before each save and evaluation.

    Args:
      metrics: the metrics dict returned by a step of :func:`make_train_step`.
      step: the step number to report (int or scalar array).
      params: optional parameters after the step; the error then names the first
        non-finite parameter leaf.

    Raises:
      FloatingPointError: naming the step, every non-finite scalar metric and the first
        non-finite parameter.
      KeyError: if ``metrics`` has no ``finite`` entry.

    Example::

      state, metrics = train_step(state, batch, hparams)
      check_finite(metrics, step, params=state.params)
    """
    if "finite" not in metrics:
        raise KeyError(
            "`metrics` has no 'finite' entry; pass the metrics returned by make_train_step."
        )
    if bool(np.asarray(metrics["finite"])):
        return
    bad = {}
    first = [k for k in RESERVED_METRICS if k in metrics]
    for key in first + sorted(k for k in metrics if k not in first):
        value = metrics[key]
        if key == "finite":
            continue
        arr = np.asarray(value)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            bad[key] = arr.item() if arr.ndim == 0 else "non-finite array"
    detail = ", ".join(f"{k}={v}" for k, v in bad.items()) or "some gradient entries"
    leaf = None if params is None else first_non_finite_leaf(params)
    where = f"; first non-finite parameter: {leaf}" if leaf else ""
    raise FloatingPointError(
        f"Non-finite loss or gradients at step {int(np.asarray(step))}: {detail}{where}. "
        "Lower the learning rate, clip gradients, or check the batch for NaN/inf."
    )


class FiniteGuard:
    """Collects the steps' ``finite`` flags on device; :meth:`check` before saving or evaluating.

    A diverged state must never be evaluated or written. Checking ``metrics["finite"]``
    after every step would wait for each step to finish; the guard instead keeps the
    flags since the last check and reads them all with one device-to-host transfer, so a
    loop pays only at the points where it would save or evaluate anyway.

    Example::

      guard = FiniteGuard()
      for step in range(num_steps):
        state, metrics = train_step(state, batch)
        guard.update(step + 1, metrics)
        if (step + 1) % save_every == 0:
          guard.check(state.params)        # raises FloatingPointError on NaN/inf
          ckpt.save(step + 1, state)
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, Mapping[str, Any]]] = []

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records the metrics of ``step`` (no device sync)."""
        if "finite" not in metrics:
            raise KeyError(
                "`metrics` has no 'finite' entry; pass the metrics returned by make_train_step."
            )
        self._pending.append((int(step), metrics))

    def check(self, params: chex.ArrayTree | None = None) -> None:
        """Raises ``FloatingPointError`` naming the first non-finite step since the last check.

        Args:
          params: the current parameters; the error names their first non-finite leaf.
        """
        if not self._pending:
            return
        flags = jax.device_get([m["finite"] for _, m in self._pending])
        pending, self._pending = self._pending, []
        for (step, metrics), ok in zip(pending, flags, strict=True):
            if not bool(ok):
                check_finite(metrics, step, params=params)
