r"""Gradient variance of SGD-B, SGD-2B and gradient clustering on random-features models.

    python -m experiments.gvar.random_features \
        --config=experiments/gvar/configs/random_features.py --workdir=/tmp/rf

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532, random-features experiments: a teacher–student task
where only the student's last layer is trained, swept over the degree of
overparametrisation ``hidden / N``. For each ratio, learning rate and seed, plain SGD
trains the student, and every ``gvar.measure_every`` steps the variance of three
estimators of the full-data gradient is measured at the current parameters with
:func:`jaxeff.gvar.measure` (its own PRNG stream; the training run is the same with or
without measurements):

* ``sgd``: the mean gradient of ``B`` uniform draws;
* ``sgd_2b``: the same with ``2B`` draws (half the variance with replacement);
* ``gc``: gradient clustering (:func:`jaxeff.clustering.gc_estimator`): the ``N``
  examples are re-clustered by their gradients at the current parameters (``K``
  clusters, batch mode) and ``B`` examples are drawn stratified over the clusters,
  weighted ``N_k / (N n_k)``.

The claim under test: on data without duplicates GC's variance lies between SGD-B's and
SGD-2B's, close to SGD-2B under mild overparametrisation. Its position is the fraction

.. math::

   \rho = \frac{V_{B} - V_{GC}}{V_{B} - V_{2B}},

0 at SGD-B and 1 at SGD-2B (above 1: better than twice the batch).

Task (choices follow the study's code where the description allows):

* inputs ``x ~ N(0, I_d / d)``;
* teacher: a fixed random ReLU network of width ``data.teacher_hidden``,
  ``f*(x) = a^T relu(W* x) / sqrt(h*)`` with ``W*, a ~ N(0, 1)`` and ``a`` centred to
  zero sum (about balanced classes); binary labels ``y = 1[f*(x) > 0]`` (the study's
  labels were the sign of a random network's first output, with ``x ~ N(0, I)``);
* student: random features ``φ(x) = relu(W x) / sqrt(hidden)`` with ``W ~ N(0, 1)``
  fixed (a :class:`FixedWeights` variable, not an ``nnx.Param``: neither trained nor
  clustered), and a trained ``nnx.Linear(hidden, 2)`` head from zero; softmax
  cross-entropy over two logits, as the study's code. The ``1/sqrt(hidden)`` keeps
  ``||φ(x)||² ≈ 1/2`` at every width, so one learning rate means the same step at every
  ratio;
* sweep: ``hidden / N`` over ``ratios``; the study kept ``hidden = 1000`` and varied
  ``N = 1000 / ratio`` (``vary = "num_examples"``, the default); ``vary = "hidden"``
  keeps ``N = size`` and sets ``hidden = ratio · size`` instead;
* training: plain SGD (no momentum, no weight decay; the study used weight decay
  ``1e-4``), batch ``B`` from a fresh permutation each epoch (the last ``N mod B``
  examples of an epoch are left out), a constant learning rate;
* measurement: ``m`` draws for the mean and ``m`` for the variance
  (:func:`jaxeff.gvar.measure`, with replacement by default); GC is re-clustered at each
  measurement (the study re-clustered every 1000 of its 5000 steps).

Summary per (ratio, learning rate, estimator): each seed's mean average variance and mean
normalised variance over the measurements in the last ``summary_fraction`` of training,
then mean ± std over seeds; ``ρ`` per seed from those means, then mean ± std.

Writes into ``workdir``: ``config.json``; ``random_features.jsonl`` (one record per run,
measured step and estimator: the statistics of :class:`jaxeff.gvar.VarianceStats` with
``ratio``, ``hidden``, ``num_examples``, ``learning_rate``, ``seed``);
``metrics.jsonl`` and TensorBoard events (per run and measurement: the statistics and
the train/test loss and accuracy); ``results.json`` (the summary);
``random_features.png`` (variance and normalised variance against ``hidden / N``, one
panel per learning rate, one line per estimator, error bars over seeds).

On many processes (``python -m experiments.launch.local --num_processes 2 -- python -m
experiments.gvar.random_features ...``, or a pod) every process runs the whole sweep on
one device of its own, with the same seeds and keys, so every process returns the same
numbers; process 0 alone writes the files, and decides whether the workdir is free.

The module reads top to bottom: config, data, model, training, measurement, one run,
summary, plot, sweep, entry point.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff import clustering, gvar
from jaxeff import train as jt
from jaxeff.clustering.sampling import ALLOCATIONS
from jaxeff.train import distributed

__all__ = [
    "ESTIMATORS",
    "FixedWeights",
    "RandomFeaturesNet",
    "Teacher",
    "batch_indices",
    "evaluate",
    "example_loss",
    "format_table",
    "gc_fraction",
    "make_data",
    "make_estimators",
    "make_student",
    "make_teacher",
    "measure_at",
    "measurement_steps",
    "plot_sweep",
    "run_one",
    "run_sweep",
    "sizes",
    "summarize",
    "teacher_labels",
    "train_steps",
    "validate_config",
]

#: Estimators measured, in the order of the records and the plot.
ESTIMATORS = ("sgd", "sgd_2b", "gc")
#: The statistics summarised per estimator.
SUMMARY_STATS = ("variance", "normalized_variance")
#: Sizes the ratio can set (``config.vary``).
VARY = ("num_examples", "hidden")
#: File names in the workdir.
RECORDS, RESULTS, PLOT = "random_features.jsonl", "results.json", "random_features.png"
_LABELS = {"sgd": "SGD-B", "sgd_2b": "SGD-2B", "gc": "GC (B)"}
_NUM_CLASSES = 2


# ----------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------
def _check_int(config, field: str, *, minimum: int) -> None:
    node = config
    for part in field.split("."):
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or node < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ValueError(f"config.{field} must be {kind} integer, got {node!r}.")


def _distinct_positive(config, field: str) -> tuple[float, ...]:
    values = tuple(config[field])
    ok = values and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values
    )
    if not ok or len(set(values)) != len(values):
        raise ValueError(f"config.{field} must be distinct positive numbers, got {values!r}.")
    return values


def sizes(config, ratio: float) -> tuple[int, int]:
    """``(hidden, num_examples)`` for one ratio ``hidden / N``.

    ``vary = "num_examples"``: ``(size, round(size / ratio))``; ``vary = "hidden"``:
    ``(round(ratio · size), size)``.
    """
    if config.vary == "num_examples":
        return int(config.size), int(round(config.size / ratio))
    return int(round(ratio * config.size)), int(config.size)


def validate_config(config) -> None:
    """Checks every field before anything is generated or compiled, naming the bad field."""
    for field in (
        "num_seeds",
        "size",
        "batch_size",
        "num_steps",
        "data.dim",
        "data.teacher_hidden",
        "data.num_test",
        "gvar.measure_every",
        "gvar.num_draws",
        "gvar.num_clusters",
        "gvar.chunk_size",
    ):
        _check_int(config, field, minimum=1)
    for field in ("seed", "gvar.seed", "gvar.num_passes"):
        _check_int(config, field, minimum=0)
    jt.check_numbers(config, positive=["summary_fraction"], non_negative=["gvar.min_fraction"])
    if config.summary_fraction > 1:
        raise ValueError(
            f"config.summary_fraction must lie in (0, 1], got {config.summary_fraction!r}."
        )
    if not config.gvar.min_fraction < 1:
        raise ValueError(
            f"config.gvar.min_fraction must lie in [0, 1), got {config.gvar.min_fraction!r}."
        )
    if config.vary not in VARY:
        raise ValueError(f"config.vary must be one of {VARY}, got {config.vary!r}.")
    if config.gvar.allocation not in ALLOCATIONS:
        raise ValueError(
            f"config.gvar.allocation must be one of {ALLOCATIONS}, got {config.gvar.allocation!r}."
        )
    if not isinstance(config.gvar.replace, bool):
        raise ValueError(f"config.gvar.replace must be a bool, got {config.gvar.replace!r}.")
    _distinct_positive(config, "learning_rates")
    for ratio in _distinct_positive(config, "ratios"):
        hidden, size = sizes(config, ratio)
        need = max(config.batch_size, config.gvar.num_clusters)
        if hidden < 1 or size < need:
            raise ValueError(
                f"config.ratios holds {ratio}, which gives hidden={hidden} and N={size} "
                f"with config.size={config.size} (config.vary={config.vary!r}); each ratio "
                f"needs hidden >= 1 and N >= max(batch_size, gvar.num_clusters) = {need}."
            )
    if config.gvar.num_clusters > config.batch_size:
        raise ValueError(
            f"config.gvar.num_clusters ({config.gvar.num_clusters}) must not exceed "
            f"config.batch_size ({config.batch_size}): a stratified batch of B draws holds "
            "every cluster only when B >= K."
        )


# ----------------------------------------------------------------------------------------
# Data: x ~ N(0, I/d), labels from a fixed random ReLU teacher.
# ----------------------------------------------------------------------------------------
class Teacher(NamedTuple):
    """``f*(x) = output · relu(x @ weights) / sqrt(h*)``; ``weights (d, h*)``, ``output (h*,)``."""

    weights: np.ndarray
    output: np.ndarray


def make_teacher(*, dim: int, hidden: int, seed: int) -> Teacher:
    """A random teacher: ``W*, a ~ N(0, 1)``, ``a`` centred to zero sum (balanced labels)."""
    rng = np.random.default_rng([seed, 0])
    weights = rng.normal(size=(dim, hidden))
    output = rng.normal(size=hidden)
    return Teacher(weights, output - output.mean())


def teacher_labels(teacher: Teacher, x: np.ndarray) -> np.ndarray:
    """``1[f*(x) > 0]`` as int32, one per row of ``x``."""
    hidden = teacher.weights.shape[1]
    scores = np.maximum(np.asarray(x, np.float64) @ teacher.weights, 0.0) @ teacher.output
    return (scores / np.sqrt(hidden) > 0).astype(np.int32)


def make_data(teacher: Teacher, *, num_examples: int, num_test: int, seed: int):
    """``(train, test)`` dicts ``{"x": (n, d) float32, "y": (n,) int32}``, ``x ~ N(0, I/d)``.

    The training rows of a seed are nested: a smaller ``num_examples`` gives a prefix.
    """
    dim = teacher.weights.shape[0]

    def split(stream, n):
        x = np.random.default_rng([seed, stream]).normal(size=(n, dim)) / np.sqrt(dim)
        return {"x": x.astype(np.float32), "y": teacher_labels(teacher, x)}

    return split(2, num_examples), split(3, num_test)


# ----------------------------------------------------------------------------------------
# Model: fixed random ReLU features, a trained linear head.
# ----------------------------------------------------------------------------------------
class FixedWeights(nnx.Variable):
    """Weights that belong to the model's state but are not an ``nnx.Param``.

    ``nnx.state(model, nnx.Param)`` leaves them out, so gradients, optimizers and gradient
    clustering (which clusters the parameter leaves, the ``nnx.Param`` s split off with
    ``nnx.split(model, nnx.Param, ...)``) never touch them.
    """


class RandomFeaturesNet(nnx.Module):
    r"""``logits = head(relu(x W) / sqrt(hidden))`` with ``W`` fixed and ``head`` trained.

    .. math::

       \phi(x) = \frac{1}{\sqrt{h}} \max(0, W^\top x), \qquad f(x) = A\, \phi(x) + c,

    the random-features model (Rahimi & Recht, "Random Features for Large-Scale Kernel
    Machines", NeurIPS 2007; Mei & Montanari, "The generalization error of random features
    regression", arXiv 1908.05355): only ``A, c`` (an ``nnx.Linear``) are parameters.

    Args:
      weights: ``(d, hidden)`` fixed first-layer weights.
      num_classes: logits of the head.
      rngs: for the head (its initialisers are zeros, so unused in practice).

    Example::

      model = RandomFeaturesNet(np.random.normal(size=(50, 200)), 2, rngs=nnx.Rngs(0))
      logits = model(jnp.ones((4, 50)))            # (4, 2), zeros at initialisation
    """

    def __init__(self, weights, num_classes: int, *, rngs: nnx.Rngs):
        weights = jnp.asarray(weights, jnp.float32)
        if weights.ndim != 2:
            raise ValueError(f"`weights` must be (d, hidden), got shape {weights.shape}.")
        self.weights = FixedWeights(weights)
        self.head = nnx.Linear(
            weights.shape[1],
            num_classes,
            kernel_init=nnx.initializers.zeros,
            bias_init=nnx.initializers.zeros,
            rngs=rngs,
        )

    def features(self, x):
        weights = self.weights[...]
        return jax.nn.relu(x @ weights) / jnp.sqrt(jnp.float32(weights.shape[1]))

    def __call__(self, x):
        return self.head(self.features(x))


def make_student(*, dim: int, hidden: int, seed: int) -> RandomFeaturesNet:
    """The student of seed ``seed``: ``W ~ N(0, 1)`` of shape ``(dim, hidden)``, zero head."""
    weights = np.random.default_rng([seed, 1]).normal(size=(dim, hidden))
    return RandomFeaturesNet(weights, _NUM_CLASSES, rngs=nnx.Rngs(seed))


def example_loss(model, batch) -> jax.Array:
    """Per-example softmax cross-entropy ``(B,)`` of ``model(batch["x"])`` and ``batch["y"]``."""
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


# ----------------------------------------------------------------------------------------
# Training: plain SGD, one jitted scan over the steps between two measurements.
# ----------------------------------------------------------------------------------------
def batch_indices(size: int, batch_size: int, seed: int, start: int, stop: int) -> np.ndarray:
    """``(stop - start, B)`` rows of steps ``start .. stop - 1``.

    Step ``t`` takes batch ``t mod (N // B)`` of epoch ``t // (N // B)``'s permutation
    (``np.random.default_rng([seed, 4, epoch])``); a pure function of the step.
    """
    per_epoch = size // batch_size
    rows = []
    for epoch in range(start // per_epoch, (stop - 1) // per_epoch + 1):
        order = np.random.default_rng([seed, 4, epoch]).permutation(size)
        rows.append(order[: per_epoch * batch_size].reshape(per_epoch, batch_size))
    first = (start // per_epoch) * per_epoch
    return np.concatenate(rows)[start - first : stop - first].astype(np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _train_segment(graphdef, params, rest, data, indices, learning_rate):
    tx = optax.sgd(learning_rate)

    def step(carry, rows):
        params, opt_state = carry
        batch = jax.tree.map(lambda a: jnp.take(a, rows, axis=0), data)

        def loss(p):
            return jnp.mean(example_loss(nnx.merge(graphdef, p, rest), batch))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), indices)
    return params, jnp.mean(losses)


def train_steps(model: RandomFeaturesNet, data, indices, learning_rate: float) -> float:
    """Plain SGD on ``model``'s parameters over the batches ``indices`` (``(S, B)`` rows).

    ``θ ← θ - η ∇_θ (1/B) Σ_{i ∈ batch} ℓ_i(θ)``, one jit-compiled ``lax.scan``; the model
    is updated in place. Returns the mean training loss of the ``S`` steps.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, loss = _train_segment(
        graphdef, params, rest, data, jnp.asarray(indices), jnp.float32(learning_rate)
    )
    nnx.update(model, params)
    return float(loss)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _evaluate(graphdef, params, rest, data):
    model = nnx.merge(graphdef, params, rest)
    loss = jnp.mean(example_loss(model, data))
    accuracy = jnp.mean(jnp.argmax(model(data["x"]), -1) == data["y"])
    return loss, accuracy


def evaluate(model, data) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on all rows of ``data``."""
    loss, accuracy = jax.device_get(_evaluate(*nnx.split(model, nnx.Param, ...), data))
    return {"loss": float(loss), "accuracy": float(accuracy)}


# ----------------------------------------------------------------------------------------
# Measurement: SGD-B, SGD-2B and GC at the current parameters.
# ----------------------------------------------------------------------------------------
def make_estimators(config, model: RandomFeaturesNet, *, seed: int):
    r"""SGD-B, SGD-2B and GC: estimators of the full-data gradient of ``model``'s head.

    .. math::

       \hat g_{B} = \frac1B \sum_{j=1}^{B} g_{i_j}, \qquad
       \hat g_{2B} = \frac1{2B} \sum_{j=1}^{2B} g_{i_j}, \qquad
       \hat g_{GC} = \sum_k \frac{N_k}{N n_k} \sum_{j=1}^{n_k} g_{i_{kj}}, \quad
       \sum_k n_k = B,

    (Faghri et al. 2020, gradient clustering with ``K = gvar.num_clusters``). With
    replacement ``Var[ĝ_2B] = Var[ĝ_B] / 2`` exactly; GC's variance counts only the spread
    within clusters. ``gc`` clusters at its ``init(params, data)``, so initialise it at
    every measurement point (:func:`measure_at` does).

    Args:
      config: the sweep's config (``batch_size`` and ``gvar``).
      model: a student; the estimators close over its graph and fixed features, and take
        the head's parameters as an argument, so they serve every student of the same
        ratio and seed.
      seed: seeds GC's initial centres.

    Returns:
      ``{"sgd": ..., "sgd_2b": ..., "gc": ...}`` of :class:`jaxeff.gvar.GradientEstimator`.

    Example::

      estimators = make_estimators(config, model, seed=0)
      stats, states = measure_at(config, estimators, model, data, jax.random.key(0))
      stats["gc"].variance / stats["sgd"].variance
    """
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def params_loss(params, batch):
        return example_loss(nnx.merge(graphdef, params, rest), batch)

    b, g = config.batch_size, config.gvar
    return {
        "sgd": gvar.sgd_estimator(params_loss, batch_size=b, replace=g.replace),
        "sgd_2b": gvar.sgd_estimator(params_loss, batch_size=2 * b, replace=g.replace),
        "gc": clustering.gc_estimator(
            params_loss,
            batch_size=b,
            num_clusters=g.num_clusters,
            num_passes=g.num_passes,
            min_fraction=g.min_fraction,
            allocation=g.allocation,
            replace=g.replace,
            chunk_size=g.chunk_size,
            seed=seed,
        ),
    }


def measure_at(config, estimators, model, data, key) -> tuple[dict, dict]:
    """Every estimator's :class:`jaxeff.gvar.VarianceStats` at ``model``'s parameters.

    Each estimator is initialised here (GC clusters ``data`` at these parameters), then
    :func:`jaxeff.gvar.measure` draws ``gvar.num_draws`` estimates for the mean and as many
    for the variance with ``key``; nothing else is touched, so training is unaffected.

    Args:
      config: the sweep's config.
      estimators: from :func:`make_estimators`.
      model: the student at the parameters to measure.
      data: the training set (device arrays).
      key: the measurement's PRNG key.

    Returns:
      ``(stats, states)``: ``{name: VarianceStats}`` and ``{name: estimator state}``.

    Raises:
      FloatingPointError: naming the estimator, when its variance is not finite.
    """
    params = nnx.state(model, nnx.Param)
    states = {name: est.init(params, data) for name, est in estimators.items()}
    stats = gvar.measure(estimators, states, params, data, key, num_draws=config.gvar.num_draws)
    for name, s in stats.items():
        values = dict(zip(gvar.STATISTICS, map(float, jax.device_get(s)), strict=True))
        if not (math.isfinite(values["variance"]) and math.isfinite(values["normalized_variance"])):
            raise FloatingPointError(f"Estimator {name!r} measured {values}.")
    return stats, states


# ----------------------------------------------------------------------------------------
# One run: one ratio, one learning rate, one seed.
# ----------------------------------------------------------------------------------------
def measurement_steps(config) -> list[int]:
    """``0, measure_every, 2·measure_every, ...`` and the last step ``num_steps``."""
    steps = list(range(0, config.num_steps, config.gvar.measure_every))
    return [*steps, config.num_steps]


def run_one(
    config,
    *,
    ratio: float,
    learning_rate: float,
    seed: int,
    key: jax.Array,
    estimators: dict[str, gvar.GradientEstimator] | None = None,
    writer: jt.MetricWriter | None = None,
    tag: str = "",
) -> dict[str, Any]:
    """Trains one student with SGD and measures the estimators along the way.

    Args:
      config: the sweep's config.
      ratio: ``hidden / N``.
      learning_rate: SGD's constant step size.
      seed: data, teacher, random features, batch order and GC's initial centres.
      key: the measurement's PRNG key (step ``t`` measures with ``fold_in(key, t)``).
      estimators: :func:`make_estimators` of a student of the same ratio and seed (the
        same fixed features), to reuse their compiled measurement; default: new ones.
      writer: optional; each measurement is written under ``tag``.
      tag: prefix of the metric names.

    Returns:
      ``{"records": [one per measured step and estimator], "model": the trained student,
      "initial_weights": the fixed features at the start, "hidden", "num_examples"}``.
    """
    hidden, size = sizes(config, ratio)
    teacher = make_teacher(dim=config.data.dim, hidden=config.data.teacher_hidden, seed=seed)
    train, test = make_data(teacher, num_examples=size, num_test=config.data.num_test, seed=seed)
    model = make_student(dim=config.data.dim, hidden=hidden, seed=seed)
    initial_weights = np.array(model.weights[...])
    if estimators is None:
        estimators = make_estimators(config, model, seed=seed)
    train_on_device, test_on_device = jax.device_put(train), jax.device_put(test)
    info = {
        "ratio": float(ratio),
        "hidden": hidden,
        "num_examples": size,
        "learning_rate": float(learning_rate),
        "seed": int(seed),
    }
    records, previous = [], 0
    for step in measurement_steps(config):
        if step > previous:
            rows = batch_indices(size, config.batch_size, seed, previous, step)
            train_steps(model, train_on_device, rows, learning_rate)
            previous = step
        stats, _ = measure_at(
            config, estimators, model, train_on_device, jax.random.fold_in(key, step)
        )
        scores = {f"train_{k}": v for k, v in evaluate(model, train_on_device).items()}
        scores.update({f"test_{k}": v for k, v in evaluate(model, test_on_device).items()})
        batch = {"sgd": config.batch_size, "sgd_2b": 2 * config.batch_size}
        for name in ESTIMATORS:
            records.append(
                gvar.stats_record(
                    step,
                    name,
                    stats[name],
                    batch_size=batch.get(name, config.batch_size),
                    **info,
                    **scores,
                )
            )
        if writer is not None:
            flat = {
                f"{tag}{r['estimator']}/{s}": r[s]
                for r in records[-len(ESTIMATORS) :]
                for s in gvar.STATISTICS
            }
            flat.update({f"{tag}{k}": v for k, v in scores.items()})
            writer.write(step, flat)
    return {
        "records": records,
        "model": model,
        "initial_weights": initial_weights,
        "hidden": hidden,
        "num_examples": size,
    }


# ----------------------------------------------------------------------------------------
# Summary: last part of training, mean over measurements, then mean ± std over seeds.
# ----------------------------------------------------------------------------------------
def gc_fraction(v_b, v_gc, v_2b) -> float:
    """``(V_B - V_GC) / (V_B - V_2B)``: 0 at SGD-B, 1 at SGD-2B; NaN if ``V_2B >= V_B``."""
    gap = v_b - v_2b
    return float((v_b - v_gc) / gap) if gap > 0 else math.nan


def _mean_std(values) -> dict[str, float]:
    values = np.asarray(values, np.float64)
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def summarize(config, records) -> list[dict[str, Any]]:
    r"""One entry per (ratio, learning rate), in the order of the config.

    For seed ``s`` and statistic ``V`` (average or normalised variance) of estimator ``e``,

    .. math::

       \bar V_{e,s} = \operatorname{mean}_{t \ge (1 - f) T} V_{e,s}(t), \qquad
       \rho_s = \frac{\bar V_{B,s} - \bar V_{GC,s}}{\bar V_{B,s} - \bar V_{2B,s}},

    with ``f = summary_fraction`` and ``T = num_steps``; the entry holds the mean and std
    (population, over seeds) of ``V̄_{e,s}`` per estimator and statistic, of ``ρ_s`` per
    statistic (``fraction``), and of the final train and test accuracy and train loss.

    Args:
      config: the sweep's config.
      records: the records of :func:`run_one` (any order).

    Returns:
      ``[{"ratio", "learning_rate", "hidden", "num_examples", "num_seeds", "sgd",
      "sgd_2b", "gc", "fraction", "train_accuracy", "test_accuracy", "train_loss"}]``;
      e.g. ``entry["gc"]["variance"] == {"mean": ..., "std": ...}``.
    """
    start = (1.0 - config.summary_fraction) * config.num_steps
    entries = []
    for ratio in config.ratios:
        for lr in config.learning_rates:
            runs = [
                r for r in records if r["ratio"] == float(ratio) and r["learning_rate"] == float(lr)
            ]
            seeds = sorted({r["seed"] for r in runs})
            per_seed = {}  # (seed, estimator, stat) -> mean over the measurements
            for seed in seeds:
                for name in ESTIMATORS:
                    chosen = [
                        r
                        for r in runs
                        if r["seed"] == seed and r["estimator"] == name and r["step"] >= start
                    ]
                    for stat in SUMMARY_STATS:
                        per_seed[seed, name, stat] = float(np.mean([r[stat] for r in chosen]))
            entry = {
                "ratio": float(ratio),
                "learning_rate": float(lr),
                "hidden": runs[0]["hidden"],
                "num_examples": runs[0]["num_examples"],
                "num_seeds": len(seeds),
            }
            for name in ESTIMATORS:
                entry[name] = {
                    stat: _mean_std([per_seed[s, name, stat] for s in seeds])
                    for stat in SUMMARY_STATS
                }
            entry["fraction"] = {
                stat: _mean_std(
                    [
                        gc_fraction(
                            per_seed[s, "sgd", stat],
                            per_seed[s, "gc", stat],
                            per_seed[s, "sgd_2b", stat],
                        )
                        for s in seeds
                    ]
                )
                for stat in SUMMARY_STATS
            }
            last = max(r["step"] for r in runs)
            finals = [r for r in runs if r["step"] == last and r["estimator"] == "sgd"]
            for metric in ("train_accuracy", "test_accuracy", "train_loss"):
                entry[metric] = _mean_std([r[metric] for r in finals])
            entries.append(entry)
    return entries


def format_table(summary, stat: str = "variance") -> str:
    """The summary as a text table: ratio, lr, each estimator's ``stat``, GC's fraction."""
    head = (
        f"{'hidden/N':>9} {'lr':>7} {'V_SGD-B':>20} {'V_GC':>20} {'V_SGD-2B':>20} "
        f"{'(V_B-V_GC)/(V_B-V_2B)':>22} {'train acc':>9}"
    )
    lines = [f"{stat}, mean ± std over seeds", head]
    for e in summary:
        cells = [f"{e[n][stat]['mean']:.4g} ± {e[n][stat]['std']:.2g}" for n in ESTIMATORS[:1]]
        cells += [f"{e['gc'][stat]['mean']:.4g} ± {e['gc'][stat]['std']:.2g}"]
        cells += [f"{e['sgd_2b'][stat]['mean']:.4g} ± {e['sgd_2b'][stat]['std']:.2g}"]
        frac = e["fraction"][stat]
        lines.append(
            f"{e['ratio']:>9g} {e['learning_rate']:>7g} {cells[0]:>20} {cells[1]:>20} "
            f"{cells[2]:>20} {frac['mean']:>13.3f} ± {frac['std']:<6.2f} "
            f"{e['train_accuracy']['mean']:>9.3f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Plot: variance against hidden / N, one panel per learning rate.
# ----------------------------------------------------------------------------------------
def plot_sweep(summary, path, *, title: str | None = None) -> None:
    """Average and normalised variance against ``hidden / N`` (log x), error bars over seeds.

    Two rows (the statistics), one column per learning rate, one line per estimator.
    Uses matplotlib's Agg canvas directly (no pyplot).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not summary:
        raise ValueError("`summary` is empty; there is nothing to plot.")
    rates = list(dict.fromkeys(e["learning_rate"] for e in summary))
    fig = Figure(figsize=(4.0 * len(rates), 6.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(SUMMARY_STATS), len(rates), squeeze=False)
    titles = {"variance": "average variance", "normalized_variance": "normalized variance"}
    for row, stat in enumerate(SUMMARY_STATS):
        for col, lr in enumerate(rates):
            ax = axes[row][col]
            entries = sorted(
                (e for e in summary if e["learning_rate"] == lr), key=lambda e: e["ratio"]
            )
            ratios = [e["ratio"] for e in entries]
            for name in ESTIMATORS:
                means = [e[name][stat]["mean"] for e in entries]
                stds = [e[name][stat]["std"] for e in entries]
                ax.errorbar(
                    ratios, means, yerr=stds, marker="o", ms=3, capsize=3, label=_LABELS[name]
                )
            ax.set_xscale("log")
            if stat == "variance":
                ax.set_yscale("log")
            ax.set_xlabel("hidden / N")
            ax.set_title(f"{titles[stat]}, lr {lr:g}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)


# ----------------------------------------------------------------------------------------
# The sweep.
# ----------------------------------------------------------------------------------------
def run_sweep(config, workdir: str) -> dict[str, Any]:
    """Every (ratio, learning rate, seed) run, its records, the summary, table and plot.

    Runs :func:`run_one` for each ratio ``hidden / N`` of ``config.ratios``, learning rate
    and seed, writes the records, metrics, ``results.json`` and the plot, and returns the
    summary (:func:`summarize`), where GC's position between SGD-B and SGD-2B is the
    fraction of :func:`gc_fraction`.

    Args:
      config: see ``experiments/gvar/configs/random_features.py``.
      workdir: directory for the outputs (see the module docstring); one that already
        holds this sweep's records is refused (the sweep does not resume). Written by
        process 0 alone.

    Returns:
      ``{"summary": summarize(...), "records": all records, "table": format_table(...),
      "seconds": wall time}``.

    Example::

      config = random_features_quick.get_config()
      results = run_sweep(config, "/tmp/rf_quick")
      print(results["table"])
    """
    # Config and workdir -------------------------------------------------------------------
    validate_config(config)
    begin = time.time()
    records_path = os.path.join(workdir, RECORDS)

    def claim_workdir():
        if os.path.exists(records_path):
            raise ValueError(
                f"{workdir} already holds a random-features sweep ({RECORDS}); use a new workdir."
            )
        jt.config_to_json(config, os.path.join(workdir, "config.json"))

    # Process 0 alone looks at the workdir and writes to it; the others learn its verdict.
    distributed.broadcast_from_process_zero(claim_workdir)
    # Ordered so that the runs of one (ratio, seed), which share the fixed features, share
    # their estimators and so compile the measurement once.
    runs = [
        (i, ratio, j, lr, s)
        for i, ratio in enumerate(config.ratios)
        for s in range(config.num_seeds)
        for j, lr in enumerate(config.learning_rates)
    ]
    jt.announce(
        f"{len(runs)} runs: hidden/N in {tuple(config.ratios)}, learning rates "
        f"{tuple(config.learning_rates)}, {config.num_seeds} seeds, {config.num_steps} steps "
        f"each, measuring {', '.join(ESTIMATORS)} every {config.gvar.measure_every} steps."
    )

    # Runs: one student per (ratio, learning rate, seed), measured along its training ------
    measure_key = jax.random.key(config.gvar.seed)
    records, shared = [], {}
    with (
        jt.MetricWriter(workdir) as writer,
        jt.progress_bar(len(runs), desc="runs") as bar,
    ):
        for i, ratio, j, lr, s in runs:
            seed = config.seed + s
            if (ratio, seed) not in shared:
                shared.clear()
                student = make_student(
                    dim=config.data.dim, hidden=sizes(config, ratio)[0], seed=seed
                )
                shared[ratio, seed] = make_estimators(config, student, seed=seed)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(measure_key, i), j), s)
            run = run_one(
                config,
                ratio=ratio,
                learning_rate=lr,
                seed=seed,
                key=key,
                estimators=shared[ratio, seed],
                writer=writer,
                tag=f"ratio_{ratio:g}/lr_{lr:g}/seed_{seed}/",
            )
            gvar.append_records(records_path, run["records"])
            records.extend(run["records"])
            bar.update(1)

    # Summary, table, plot ----------------------------------------------------------------
    summary = summarize(config, records)
    table = "\n\n".join(format_table(summary, stat) for stat in SUMMARY_STATS)
    seconds = time.time() - begin
    if jax.process_index() == 0:
        with open(os.path.join(workdir, RESULTS), "w", encoding="utf-8") as f:
            json.dump({"summary": summary, "seconds": seconds}, f, indent=2)
        hidden_or_n = "hidden" if config.vary == "num_examples" else "N"
        plot_sweep(
            summary,
            os.path.join(workdir, PLOT),
            title=(
                f"random features, {hidden_or_n} = {config.size}, d = {config.data.dim}, "
                f"B = {config.batch_size}, K = {config.gvar.num_clusters}"
            ),
        )
    return {"summary": summary, "records": records, "table": table, "seconds": seconds}


# ----------------------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------------------
def main(argv):
    from absl import app, logging

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    cluster_flags.initialize()  # several processes: join them first
    results = run_sweep(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() != 0:
        return
    print(results["table"])
    print(f"{len(results['records'])} records in {results['seconds']:.1f} s")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from experiments.launch import cluster_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Sweep configuration.", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the results.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
