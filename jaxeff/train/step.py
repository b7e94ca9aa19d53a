"""Train state and the jit-compiled update step for flax nnx models used functionally.

The model is split once into a static ``graphdef`` and a pytree :class:`TrainState`
(parameters, optimizer state, other model variables such as batch statistics or RNG
counters). The update step merges them back inside ``jax.jit``, differentiates the user's
loss with respect to the parameters, applies the optax transform and returns the new state
with a dict of measurements (loss, gradient norm, parameter norm, the loss's own metrics,
and a ``finite`` flag), as in big_vision's ``update_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

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


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation):
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
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
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


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


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
    if isinstance(batch, Mapping) and weights_key in batch:
        weights = batch[weights_key]
        if jnp.shape(weights) != (b,):
            raise ValueError(
                f"`batch[{weights_key!r}]` must hold one weight per example, shape ({b},), "
                f"got {jnp.shape(weights)}."
            )
    else:
        weights = jnp.full((b,), 1.0 / b, jnp.result_type(losses))
    return jnp.sum(weights * losses), weights


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
    state_sharding=None,
    batch_sharding=None,
    weights_key: str = "weights",
):
    r"""Builds the jit-compiled update step ``step(state, batch, hparams) -> (state, metrics)``.

    One step computes, with :math:`\theta` the parameters and :math:`\ell` the loss,

    .. math::

       g = \nabla_\theta \ell(\theta; \text{batch}, \text{hparams}), \qquad
       (u, s') = \text{tx.update}(g, s, \theta), \qquad \theta' = \theta + u,

    and measures ``loss`` :math:`= \ell`, ``grad_norm`` :math:`= \|g\|_2` (global L2 norm of
    the gradient *before* the transform, i.e. before clipping), ``update_norm``
    :math:`= \|u\|_2`, ``param_norm`` :math:`= \|\theta'\|_2` (after the update, as in
    big_vision), and ``finite``: true when the loss, every gradient entry and every updated
    parameter are finite (an update can overflow even from a finite gradient).
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
        applied as a sharding constraint inside the step. The batch is best placed with
        :func:`jaxeff.train.shard_batch` beforehand.
      weights_key: the batch entry holding the per-example weights ``(B,)`` that reduce a
        per-example loss.

    Returns:
      ``step(state, batch, hparams=None) -> (new_state, metrics)``; ``metrics`` holds
      ``loss``, ``grad_norm``, ``update_norm``, ``param_norm``, the aux metrics and
      ``finite``, all device scalars. ``step.jitted`` is the underlying ``jax.jit``
      function (for ``.lower``/cost analysis).

    Example::

      def loss_fn(model, batch, hparams):
        loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
        return hparams["weight"] * loss, {"mse": loss}

      tx = optax.chain(optax.clip_by_global_norm(2.0), optax.adam(1e-3))
      graphdef, state = create_train_state(model, tx)   # the same tx in both calls
      train_step = make_train_step(graphdef, loss_fn, tx)
      state, metrics = train_step(state, batch, {"weight": 1.0})
      check_finite(metrics, step=0)
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"`tx` must be an optax.GradientTransformation, got {type(tx).__name__}.")

    def update_fn(state: TrainState, batch, hparams):
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)

        def compute_loss(params):
            model = nnx.merge(graphdef, params, state.model_state, copy=True)
            out = loss_fn(model, batch, hparams)
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
                raise TypeError(
                    f"`loss_fn` must return (loss, aux_metrics_dict), got {type(out).__name__}."
                )
            losses, aux = out
            loss, weights = _reduce_loss(losses, batch, weights_key)
            _, _, _, model_state = nnx.split(model, nnx.Param, nnx.Intermediate, ...)
            return loss, (dict(aux), model_state, losses, weights)

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
            extra = {"value": loss, "grad": grads, "value_fn": lambda p, **_: compute_loss(p)[0]}
            if weights is not None:
                extra.update(per_example_losses=losses, weights=weights)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(params),
            **aux,
            "finite": jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params),
        }
        return new_state, metrics

    jit_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if state_sharding is not None:
        jit_kwargs["out_shardings"] = (state_sharding, _replicated_like(state_sharding))
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

    step.jitted = jitted
    return step


def first_non_finite_leaf(tree) -> str | None:
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


def check_finite(metrics: Mapping[str, Any], step, *, params=None) -> None:
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

    def __init__(self):
        self._pending: list[tuple[int, Mapping[str, Any]]] = []

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records the metrics of ``step`` (no device sync)."""
        if "finite" not in metrics:
            raise KeyError(
                "`metrics` has no 'finite' entry; pass the metrics returned by make_train_step."
            )
        self._pending.append((int(step), metrics))

    def check(self, params=None) -> None:
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
