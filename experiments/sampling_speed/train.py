r"""Time to a target loss for uniform, GC and importance sampling: ``train_and_evaluate``.

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532, and Faghri's thesis "Training Efficiency and
Robustness in Deep Learning", https://arxiv.org/abs/2112.01423: does a redundancy-aware
modification to the sampling of training data improve the training speed?

One run per (regime, sampler, learning rate, seed): plain SGD at a constant learning rate,

.. math::

   \theta_{t+1} = \theta_t - \eta \sum_{j=1}^{b} w_j \nabla \ell_{i_j}(\theta_t),

with the indices and weights of :mod:`experiments.sampling_speed.samplers` (unbiased for the
mean gradient over the training set). The steps between two evaluations are one jitted
``lax.scan``. The clock of a run holds, and only holds, the sampler's refreshes
(re-clusterings, norm refreshes: whole passes over the training set), its host-side inputs
and the training steps, each segment timed to ``jax.block_until_ready``; evaluation (the
loss and accuracy over the whole training and test sets) is outside it. Every program is
compiled once per (regime, sampler) before any clock starts (``compile_seconds`` in the
results), so no run pays for compilation.

Runs are stored one JSON line each in ``runs.jsonl`` as they finish; a rerun skips the
stored runs and reruns an interrupted one from its start with its seed, so its curve in
steps and examples seen is bit for bit the uninterrupted one (its seconds are a new
measurement). Then :mod:`~experiments.sampling_speed.analysis` tunes each sampler's
learning rate, sets the targets and computes the speed-ups, and
:mod:`~experiments.sampling_speed.plots` draws them.

The code reads top to bottom: config, model and loss, update step, evaluation, one run,
train and evaluate.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.gvar import models
from experiments.sampling_speed import analysis, plots, samplers
from experiments.sampling_speed.data import load_regime
from jaxeff import clustering, gvar
from jaxeff import train as jt

__all__ = [
    "build_model",
    "evaluate",
    "model_functions",
    "read_runs",
    "run_name",
    "train_and_evaluate",
    "train_run",
    "train_segment",
    "validate_config",
]

#: File names in the workdir; each run also has ``runs/<regime>/<sampler>/<lr_seed>/``.
RUNS, RESULTS, TABLE, RUNS_DIR = "runs.jsonl", "results.json", "table.md", "runs"
#: Fields a rerun may change: none changes what a run computes.
RESUMABLE_FIELDS = ("data.data_dir",)
REGIME_FIELDS = ("majority_factor", "label_noise", "duplicates", "duplicate_copies")


# ----------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------
def validate_config(config) -> None:
    """Checks every field at start-up, before any data is read or anything is written."""
    jt.check_numbers(
        config,
        integers={
            "num_seeds": 1,
            "batch_size": 1,
            "num_steps": 1,
            "target_step": 1,
            "eval_every": 1,
            "refresh_every": 1,
            "chunk_size": 1,
            "gc.num_clusters": 1,
            "gc.num_passes": 1,
            "data.max_examples": 0,
            "data.seed": 0,
        },
    )
    for field in ("num_steps", "target_step", "refresh_every"):
        if config[field] % config.eval_every:
            raise ValueError(
                f"config.{field} ({config[field]}) must be a multiple of config.eval_every "
                f"({config.eval_every}): the runs are evaluated, and refreshed, between segments."
            )
    if config.target_step > config.num_steps:
        raise ValueError(
            f"config.target_step ({config.target_step}) exceeds config.num_steps "
            f"({config.num_steps})."
        )
    names = tuple(config.samplers)
    if not names or any(n not in samplers.SAMPLERS for n in names) or len(set(names)) < len(names):
        raise ValueError(
            f"config.samplers must be distinct names from {samplers.SAMPLERS}, got {names!r}."
        )
    if names[0] != "uniform":
        raise ValueError(f"config.samplers must start with 'uniform' (the reference), got {names}.")
    rates = tuple(config.learning_rates)
    ok = bool(rates) and len(set(rates)) == len(rates)
    ok = ok and all(isinstance(r, float | int) and not isinstance(r, bool) for r in rates)
    if not ok or not all(np.isfinite(r) and r > 0 for r in rates):
        raise ValueError(f"config.learning_rates must be distinct positive numbers, got {rates!r}.")
    jt.check_numbers(
        config,
        non_negative=["gc.min_fraction", "importance.smoothing"],
        fraction=["data.test_fraction", "gc.min_fraction"],
    )
    if not 0 < config.importance.smoothing <= 1:
        raise ValueError(
            "config.importance.smoothing must lie in (0, 1] (p_i > 0 for every example keeps "
            f"importance sampling unbiased), got {config.importance.smoothing!r}."
        )
    for field, value, options in (
        ("gc.allocation", config.gc.allocation, clustering.ALLOCATIONS),
        ("importance.score", config.importance.score, ("grad_norm", "loss")),
        ("model.name", config.model.name, ("mlp", "cnn")),
    ):
        if value not in options:
            raise ValueError(f"config.{field} must be one of {tuple(options)}, got {value!r}.")
    if not isinstance(config.gc.replace, bool):
        raise ValueError(f"config.gc.replace must be True or False, got {config.gc.replace!r}.")
    if "gc" in names and config.batch_size < config.gc.num_clusters:
        raise ValueError(
            f"config.batch_size ({config.batch_size}) must be >= config.gc.num_clusters "
            f"({config.gc.num_clusters}): a GC batch holds every cluster."
        )
    if config.data.name != "digits" and not config.data.data_dir:
        raise ValueError(
            f"config.data.data_dir must name the tfds data directory where "
            f"{config.data.name!r} was prepared (as array_record); see jaxeff.data.mnist_cifar."
        )
    if not config.regimes:
        raise ValueError("config.regimes must name at least one data regime.")
    for name, regime in config.regimes.items():
        unknown = sorted(set(regime) - set(REGIME_FIELDS))
        if unknown:
            raise ValueError(f"config.regimes.{name} has unknown fields {unknown}.")
        jt.check_numbers(
            config,
            integers={
                f"regimes.{name}.majority_factor": 1,
                f"regimes.{name}.duplicates": 0,
                f"regimes.{name}.duplicate_copies": 0,
            },
        )
        noise = regime.label_noise
        if isinstance(noise, bool) or not isinstance(noise, float | int) or not 0 <= noise <= 1:
            raise ValueError(f"config.regimes.{name}.label_noise must lie in [0, 1], got {noise}.")


# ----------------------------------------------------------------------------------------
# Model and loss: one function object per graph, so every program compiles once.
# ----------------------------------------------------------------------------------------
def build_model(config, data, seed: int):
    """``(graphdef, params)`` of ``config.model`` at initialisation seed ``seed``."""
    rngs, m = nnx.Rngs(seed), config.model
    shape = data.train["image"].shape[1:]
    if m.name == "mlp":
        model = models.MLP(int(np.prod(shape)), tuple(m.hidden), data.num_classes, rngs=rngs)
    else:
        model = models.CNN(shape, tuple(m.features), m.dense, data.num_classes, rngs=rngs)
    return nnx.split(model)


@functools.cache
def model_functions(graphdef):
    """``(logits(params, images), example_loss(params, batch) -> (B,))`` of ``graphdef``."""

    def logits(params, images):
        return nnx.merge(graphdef, params)(images)

    def example_loss(params, batch):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits(params, batch["image"]), batch["label"]
        )

    return logits, example_loss


# ----------------------------------------------------------------------------------------
# Update step: ``eval_every`` SGD steps as one scan.
# ----------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("loss_fn", "draw"))
def train_segment(params, data, state, xs, learning_rate, *, loss_fn, draw):
    """SGD steps on ``Σ_j w_j ℓ_{i_j}``, one per row of ``xs``, the sample ``draw(state, x)``."""

    def step(params, x):
        grads = gvar.weighted_gradient(loss_fn, params, data, draw(state, x))
        return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads), None

    return jax.lax.scan(step, params, xs)[0]


# ----------------------------------------------------------------------------------------
# Evaluation: mean loss and accuracy over every row (outside the clock).
# ----------------------------------------------------------------------------------------
def as_chunks(arrays: dict, chunk_size: int) -> dict:
    """``arrays`` as ``(C, chunk, ...)`` device chunks, the padding masked out."""
    size = len(arrays["label"])
    chunk = min(chunk_size, size)
    count = -(-size // chunk)
    rows = np.arange(count * chunk) % size
    out = {k: jnp.asarray(v[rows].reshape(count, chunk, *v.shape[1:])) for k, v in arrays.items()}
    out["mask"] = jnp.asarray((np.arange(count * chunk) < size).reshape(count, chunk))
    return out


def chunk_list(chunks: dict) -> list[dict]:
    """The chunks of :func:`as_chunks` one by one (the clustering passes read them)."""
    return [{k: v[c] for k, v in chunks.items()} for c in range(chunks["mask"].shape[0])]


def _scores(params, chunks, logits_fn):
    def sums(chunk):
        logits = logits_fn(params, chunk["image"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, chunk["label"])
        right = jnp.argmax(logits, -1) == chunk["label"]
        return jnp.sum(jnp.where(chunk["mask"], losses, 0.0)), jnp.sum(chunk["mask"] & right)

    losses, right = jax.lax.map(sums, chunks)
    count = jnp.sum(chunks["mask"])
    return {"loss": jnp.sum(losses) / count, "accuracy": jnp.sum(right) / count}


@functools.partial(jax.jit, static_argnames="logits_fn")
def evaluate(params, train_chunks, test_chunks, *, logits_fn):
    """``{"train_loss", "train_accuracy", "test_loss", "test_accuracy"}`` over every row of
    the chunks of :func:`as_chunks`: mean cross-entropy and accuracy."""
    out = {}
    for split, chunks in (("train", train_chunks), ("test", test_chunks)):
        out.update({f"{split}_{k}": v for k, v in _scores(params, chunks, logits_fn).items()})
    return out


# ----------------------------------------------------------------------------------------
# One run.
# ----------------------------------------------------------------------------------------
def run_name(regime: str, sampler: str, learning_rate: float, seed: int) -> str:
    return f"{regime}/{sampler}/lr{learning_rate:g}_seed{seed}"


def train_run(config, setup, sampler_name, learning_rate, seed, *, writer=None, hook=None):
    """One run from its seed; returns its record (the curve at every ``eval_every`` steps)."""
    graphdef, params = build_model(config, setup["data"], seed)
    logits_fn, loss_fn = model_functions(graphdef)
    sampler = samplers.make_sampler(
        sampler_name, loss_fn, setup["train"], config=config, seed=seed, chunks=setup["chunks"]
    )
    batch_size = samplers.batch_size_of(sampler_name, config.batch_size)
    name = run_name(setup["regime"], sampler_name, learning_rate, seed)
    lr = jnp.float32(learning_rate)
    clock = refresh_clock = 0.0
    curve, refreshes, diverged = [], [], False
    for start in range(0, config.num_steps + 1, config.eval_every):
        if start:  # train eval_every steps: the refresh, the inputs, the scan, all timed
            tick = time.perf_counter()
            if sampler.refreshes and (start - config.eval_every) % config.refresh_every == 0:
                refreshes.append(sampler.refresh(params))
                refresh_clock += time.perf_counter() - tick
            xs = sampler.inputs(start - config.eval_every, config.eval_every)
            params = train_segment(
                params, setup["train"], sampler.state, xs, lr, loss_fn=loss_fn, draw=sampler.draw
            )
            jax.block_until_ready(params)
            clock += time.perf_counter() - tick
        scores = evaluate(params, setup["train_chunks"], setup["test_chunks"], logits_fn=logits_fn)
        point = {"step": start, "examples": start * batch_size, "seconds": clock}
        point["refresh_seconds"] = refresh_clock
        point.update({k: float(v) for k, v in jax.device_get(scores).items()})
        if not np.isfinite(point["train_loss"]):
            diverged = True  # a diverged state is recorded as such, never evaluated on
            break
        curve.append(point)
        if writer is not None:
            writer.write(start, {k: v for k, v in point.items() if k != "step"})
        if hook is not None:
            hook(name, start)
    record = {"regime": setup["regime"], "sampler": sampler_name, "learning_rate": learning_rate}
    record.update(seed=seed, batch_size=batch_size, num_train=gvar.num_examples(setup["train"]))
    record.update(diverged=diverged, curve=curve)
    if sampler_name == "gc":
        record["cluster_sizes"] = [r["cluster_sizes"] for r in refreshes]
    return record


def warm_up(config, setup, sampler_name) -> float:
    """Compiles every program of ``sampler_name`` on this regime (two refreshes: seeding and
    a warm start, one segment, one evaluation); returns the seconds it took."""
    tick = time.perf_counter()
    graphdef, params = build_model(config, setup["data"], 0)
    logits_fn, loss_fn = model_functions(graphdef)
    sampler = samplers.make_sampler(
        sampler_name, loss_fn, setup["train"], config=config, seed=0, chunks=setup["chunks"]
    )
    for _ in range(2 if sampler.refreshes else 0):
        sampler.refresh(params)
    xs = sampler.inputs(0, config.eval_every)
    lr = jnp.float32(config.learning_rates[0])
    params = train_segment(
        params, setup["train"], sampler.state, xs, lr, loss_fn=loss_fn, draw=sampler.draw
    )
    chunks = (setup["train_chunks"], setup["test_chunks"])
    jax.block_until_ready(evaluate(params, *chunks, logits_fn=logits_fn))
    return time.perf_counter() - tick


# ----------------------------------------------------------------------------------------
# Stored runs: one JSON line each.
# ----------------------------------------------------------------------------------------
def read_runs(path: str) -> list[dict]:
    """The complete lines of ``runs.jsonl`` (a line cut short by a kill is dropped)."""
    if not os.path.exists(path):
        return []
    runs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return runs


def _append_run(path: str, record: dict) -> None:
    with open(path, "a+", encoding="utf-8") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # a line cut short by a kill: end it, so this one stands alone
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _key(record) -> tuple:
    return (record["regime"], record["sampler"], float(record["learning_rate"]), record["seed"])


# ----------------------------------------------------------------------------------------
# Train and evaluate.
# ----------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False, hook=None):
    """Every (regime, sampler, learning rate, seed) run, then the tuning, table and plots.

    A rerun in the same workdir skips the runs stored in ``runs.jsonl`` and reruns an
    interrupted one from its start; a workdir made by a different config is refused unless
    ``allow_config_change``. ``hook(run_name, step)``, if given, is called after every
    evaluation (the tests stop a run from it).

    Writes into ``workdir``: ``config.json``; ``runs.jsonl`` (one record per run: its curve
    of ``step``, ``examples``, ``seconds``, ``refresh_seconds``, ``train_loss``,
    ``train_accuracy``, ``test_loss``, ``test_accuracy``); per run
    ``runs/<regime>/<sampler>/lr<lr>_seed<seed>/metrics.jsonl`` and TensorBoard events;
    ``results.json`` (:func:`experiments.sampling_speed.analysis.summarize`); ``table.md``
    (the speed-ups to the loss and to the accuracy targets, the tuned rates and finals);
    ``loss_<regime>.png`` per regime and ``speedup.png``.

    Returns:
      The contents of ``results.json`` with ``"runs"`` (every record) and ``"trained"``
      (the runs this call trained).
    """
    # Config: checked, and bound to the workdir, before anything is read or built --------
    start_time = time.perf_counter()
    validate_config(config)
    changes = jt.bind_config_to_workdir(
        config, workdir, may_differ=RESUMABLE_FIELDS, allow_changes=allow_config_change
    )
    if changes:
        jt.announce(f"Continuing {workdir} with changed config fields: {', '.join(changes)}.")
    runs_path = os.path.join(workdir, RUNS)
    stored = {_key(r): r for r in read_runs(runs_path)}
    seeds, rates = range(config.num_seeds), tuple(float(r) for r in config.learning_rates)
    compile_seconds, trained = {}, []

    for regime_name, regime in config.regimes.items():
        todo = [
            (seed, lr, sampler)
            for seed in seeds  # samplers side by side in time: the machine's load hits all
            for lr in rates
            for sampler in config.samplers
            if (regime_name, sampler, lr, seed) not in stored
        ]
        if not todo:
            continue
        # Data: the regime's training set, on the device, and its evaluation chunks ------
        data = load_regime(config, regime)
        setup = {"regime": regime_name, "data": data, "train": jax.device_put(data.train)}
        setup["train_chunks"] = as_chunks(data.train, config.chunk_size)
        setup["test_chunks"] = as_chunks(data.test, config.chunk_size)
        setup["chunks"] = chunk_list(setup["train_chunks"])
        jt.announce(
            f"{regime_name}: {len(data.train['label'])} training examples, {len(todo)} runs."
        )
        # Runs: each compiled program warmed up before the first clock starts ------------
        with jt.progress_bar(len(todo), desc=regime_name) as bar:
            for seed, lr, sampler in todo:
                if (regime_name, sampler) not in compile_seconds:
                    compile_seconds[(regime_name, sampler)] = warm_up(config, setup, sampler)
                name = run_name(regime_name, sampler, lr, seed)
                run_dir = os.path.join(workdir, RUNS_DIR, *name.split("/"))
                shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
                with jt.MetricWriter(run_dir) as writer:
                    record = train_run(config, setup, sampler, lr, seed, writer=writer, hook=hook)
                _append_run(runs_path, record)
                stored[_key(record)] = record
                trained.append(name)
                bar.update(1)

    # Results: tuning, targets, speed-ups; the table and the plots ------------------------
    runs = [r for r in stored.values() if r["regime"] in config.regimes]
    results = analysis.summarize(config, runs)
    results["compile_seconds"] = {f"{r}/{s}": v for (r, s), v in compile_seconds.items()}
    results["total_seconds"] = time.perf_counter() - start_time
    table = analysis.format_table(results)
    with open(os.path.join(workdir, RESULTS), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(workdir, TABLE), "w") as f:  # the accuracy table and details too
        accuracy, details = (
            analysis.format_table(results, "accuracy"),
            analysis.format_details(results),
        )
        f.write(f"{table}\n\n{accuracy}\n\n{details}\n")
    plots.plot_all(results, runs, workdir)
    return {**results, "runs": runs, "trained": trained, "table": table}
