r"""DP-SGD on the digits, accuracy against ε: ``train_and_evaluate(config, workdir)``.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential
Privacy", CCS 2016, https://arxiv.org/abs/1607.00133. One training run per noise
multiplier ``σ`` of ``config.privacy.noise_multipliers``; at step ``t``

.. math::

  \tilde g_t = \frac{1}{qN}\Big(\sum_{i \in S_t} \min\Big(1, \frac{C}{\|g_i\|_2}\Big) g_i
  + \mathcal N(0, \sigma^2 C^2 I)\Big),

with ``S_t`` a Poisson sample (each of the ``N`` examples in it with probability ``q``,
:class:`jaxeff.privacy.PoissonSampler`, padded to a fixed batch whose weight-0 slots are
``is_padding_example``), the clipped sum from :func:`jaxeff.privacy.clipped_grad` and the
noise from jax-privacy's ``gaussian_privatizer`` chained before the optax optimizer
(``stddev = σ · grad_fn.sensitivity() = σ C / (qN)``, on the gradient already divided by
``qN``). After every evaluated step ``t``, ``ε(δ)`` of the ``t`` steps so far is
:func:`jaxeff.privacy.dpsgd_epsilon` at the sampler's rate.

The baselines of ``config.privacy.baselines`` train on the same batches with the same
optimizer: ``"non_private"`` on the plain gradient ``Σ_{i∈S_t} g_i / (qN)`` and
``"clip_only"`` on the clipped sum without noise (``σ = 0``: what clipping alone costs).
Every run starts from the same weights, draws the same batches (the sampler's seed) and
the same standard normals (the privatizer's key), so the runs differ only in ``σ``.

Each evaluation records the test accuracy and loss, the mean loss of the examples drawn
since the previous evaluation, the fraction of them whose gradient was clipped, how many
had a non-finite gradient (left out of the sum by ``clipped_grad``) and how many drawn
examples the padded batch could not hold (``PoissonSampler.overflow``: at such a step the
batch is not exactly Poisson, which the accountant assumes; ``padded_batch_size`` makes it
rare). These are facts of the training data, not privatised: they are for the
experimenter, not for release.

The noise's standard deviation is an argument of the jitted step, not a constant of it:
every σ and the ``clip_only`` run share one compiled program (``non_private`` has its
own). One process (the study is small); its runs are checkpointed one by one, so a
killed or preempted run resumes where it stopped, to the numbers of an uninterrupted run.

The run reads top to bottom: config, data, model, update step, then per run: sampler and
optimizer, checkpoint/resume, evaluation, loop; then results and the plot.
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
from flax import linen as nn
from jax_privacy import noise_addition

from experiments.dp import models, plots
from jaxeff import privacy
from jaxeff import train as jt
from jaxeff.data import digits

__all__ = [
    "BASELINES",
    "Run",
    "StepSpec",
    "build_model",
    "epsilon_after",
    "evaluate",
    "example_losses",
    "format_table",
    "load_data",
    "make_optimizer",
    "runs_of",
    "train_and_evaluate",
    "train_step",
    "validate_config",
]

#: Reference runs (``config.privacy.baselines``): the plain gradient, the clipped one.
BASELINES = ("non_private", "clip_only")
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam")
#: File names in the workdir; each run has ``runs/<name>/`` with its metrics.jsonl,
#: TensorBoard events and checkpoints.
RESULTS, PLOT, RUNS_DIR = "results.json", "accuracy_vs_epsilon.png", "runs"
# Fields a rerun in the same workdir may change: none changes what a step computes (the
# learning rate is constant, so neither does the run's length).
RESUMABLE_FIELDS = ("num_steps", "eval_every", "checkpoint_every")


# ----------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------
def _widths(config, field: str) -> tuple[int, ...]:
    values = config.model[field]
    ok = isinstance(values, tuple | list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    )
    if not ok:
        raise ValueError(f"config.model.{field} must be a tuple of positive ints, got {values!r}.")
    return tuple(values)


def _choice(value, name: str, options) -> None:
    if value not in options:
        raise ValueError(f"config.{name} must be one of {tuple(options)}, got {value!r}.")


def validate_config(config) -> None:
    """Checks every field at start-up, before anything is read, built or written."""
    jt.check_numbers(
        config,
        positive=[
            "privacy.l2_clip_norm",
            "privacy.delta",
            "overflow_probability",
            "expected_batch_size",
            "learning_rate",
            "data.test_fraction",
        ],
        fraction=["momentum", "privacy.delta", "overflow_probability", "data.test_fraction"],
        integers={
            "num_steps": 1,
            "eval_every": 1,
            "checkpoint_every": 1,
            "batch_size": 0,
            "data.seed": 0,
            "seed": 0,
        },
    )
    if config.seed >= 2**32:
        raise ValueError(f"config.seed must be below 2**32, got {config.seed!r}.")
    sigmas = config.privacy.noise_multipliers
    ok = isinstance(sigmas, tuple | list) and len(sigmas) > 0
    ok = ok and all(
        isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) and s > 0
        for s in sigmas
    )
    if not ok or len(set(sigmas)) != len(sigmas):
        raise ValueError(
            f"config.privacy.noise_multipliers must be distinct positive numbers, got {sigmas!r}."
        )
    baselines = tuple(config.privacy.baselines)
    if any(b not in BASELINES for b in baselines) or len(set(baselines)) != len(baselines):
        raise ValueError(
            f"config.privacy.baselines must be distinct names from {BASELINES}, got "
            f"{config.privacy.baselines!r}."
        )
    _choice(config.privacy.method, "privacy.method", ("book-keeping", "ghost"))
    _choice(config.privacy.accountant, "privacy.accountant", ("pld", "rdp"))
    _choice(config.optimizer, "optimizer", OPTIMIZERS)
    _choice(config.model.name, "model.name", MODELS)
    _choice(config.model.activation, "model.activation", tuple(models.ACTIVATIONS))
    if config.model.name == "mlp":
        _widths(config, "hidden")
    else:
        features = _widths(config, "features")
        jt.check_numbers(config, integers={"model.dense": 1})
        height, width, _ = digits.DIGITS_SHAPE
        scale = 2 ** len(features)
        if height % scale or width % scale:
            raise ValueError(
                f"config.model.features has {len(features)} pooling stages, which need an "
                f"image size divisible by {scale}; the digits are {height}x{width}."
            )


# ----------------------------------------------------------------------------------------
# Runs: one per noise multiplier, then the baselines.
# ----------------------------------------------------------------------------------------
class Run(NamedTuple):
    """One training run: its name, ``σ`` (0 for the baselines) and whether it clips."""

    name: str
    noise_multiplier: float
    clipped: bool

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0


def runs_of(config) -> list[Run]:
    """``sigma_<σ>`` for each noise multiplier, then the baselines, in config order."""
    out = [Run(f"sigma_{s:g}", float(s), True) for s in config.privacy.noise_multipliers]
    for name in config.privacy.baselines:
        out.append(Run(name, 0.0, name == "clip_only"))
    return out


# ----------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------
def load_data(config) -> dict[str, dict[str, np.ndarray]]:
    """The digits split: ``{"train", "test"}``, each ``{"image": (n, 8, 8, 1), "label"}``."""
    return digits.load_digits(test_fraction=config.data.test_fraction, seed=config.data.seed)


# ----------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------
def build_model(config) -> nn.Module:
    m = config.model
    if m.name == "mlp":
        return models.MLP(tuple(m.hidden), digits.DIGITS_CLASSES, m.activation)
    return models.CNN(tuple(m.features), m.dense, digits.DIGITS_CLASSES, m.activation)


def example_losses(model: nn.Module, params, batch) -> jax.Array:
    """``(B,)`` cross-entropies of ``batch["image"]``, ``batch["label"]``."""
    logits = model.apply({"params": params}, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])


@functools.partial(jax.jit, static_argnames="model")
def evaluate(params, images, labels, *, model: nn.Module):
    """``(accuracy, mean loss)`` on the whole of ``images``, ``labels``."""
    logits = model.apply({"params": params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(jnp.argmax(logits, -1) == labels), jnp.mean(loss)


# ----------------------------------------------------------------------------------------
# Update step.
# ----------------------------------------------------------------------------------------
class StepSpec(NamedTuple):
    """The static settings of one compiled step (hashable)."""

    model: nn.Module
    l2_clip_norm: float | None  # None: the plain gradient (the non_private baseline)
    normalize_by: float  # qN
    method: str
    optimizer: str
    learning_rate: float
    momentum: float


def clipped_grad_fn(spec: StepSpec):
    """:func:`jaxeff.privacy.clipped_grad` of the per-example losses, divided by ``qN``."""
    return privacy.clipped_grad(
        functools.partial(example_losses, spec.model),
        l2_clip_norm=spec.l2_clip_norm,
        method=spec.method,
        normalize_by=spec.normalize_by,
    )


def make_optimizer(spec: StepSpec, stddev, prng_key) -> optax.GradientTransformation:
    """jax-privacy's Gaussian privatizer (``stddev`` on the clipped gradient), then the
    optimizer of ``spec``.

    The privatizer's state is its PRNG key, split at every update: ``prng_key`` seeds
    ``init`` only, and each update draws from the key in the optimizer state.
    """
    if spec.optimizer == "adam":
        inner = optax.adam(spec.learning_rate)
    else:
        inner = optax.sgd(spec.learning_rate, momentum=spec.momentum or None)
    noise = noise_addition.gaussian_privatizer(stddev=stddev, prng_key=prng_key)
    return optax.chain(noise, inner)


def zero_totals() -> dict[str, jax.Array]:
    """Sums over the examples drawn since the last evaluation, kept on device."""
    return {k: jnp.zeros((), jnp.float32) for k in ("loss", "examples", "clipped", "non_finite")}


@functools.partial(jax.jit, static_argnames="spec", donate_argnums=(0, 1, 2))
def train_step(params, opt_state, totals, batch, stddev, *, spec: StepSpec):
    """One DP-SGD step on a padded Poisson batch (``batch["weights"] == 0``: padding).

    Returns ``(params, opt_state, totals, metrics)``: ``totals`` adds this batch's real
    examples (their loss, count, clipped count, non-finite count); ``metrics["finite"]``
    says whether the new parameters are finite (:class:`jaxeff.train.FiniteGuard`).
    ``stddev`` is traced: one program serves every ``σ``.
    """
    padding = batch["weights"] == 0
    real = ~padding
    examples = {"image": batch["image"], "label": batch["label"]}
    if spec.l2_clip_norm is None:  # the non-private baseline: Σ g_i / (qN)
        losses = example_losses(spec.model, params, examples)

        def weighted_sum(p):
            return jnp.sum(batch["weights"] * example_losses(spec.model, p, examples))

        grads = jax.tree.map(lambda g: g / spec.normalize_by, jax.grad(weighted_sum)(params))
        clipped = jnp.zeros_like(real)
        non_finite = real & ~jnp.isfinite(losses)
    else:
        grads, report = clipped_grad_fn(spec)(params, examples, is_padding_example=padding)
        losses = report.values
        clipped = real & (report.grad_norms > spec.l2_clip_norm)
        non_finite = report.non_finite
    tx = make_optimizer(spec, stddev, prng_key=0)  # the key in opt_state is the one used
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    kept = real & ~non_finite
    totals = {
        "loss": totals["loss"] + jnp.sum(jnp.where(kept, losses, 0.0)),
        "examples": totals["examples"] + jnp.sum(real),
        "clipped": totals["clipped"] + jnp.sum(clipped),
        "non_finite": totals["non_finite"] + jnp.sum(non_finite),
    }
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    return params, opt_state, totals, {"finite": finite}


@functools.cache
def epsilon_after(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str
) -> float:
    """:func:`jaxeff.privacy.dpsgd_epsilon`, remembered (a rerun asks the same again)."""
    return privacy.dpsgd_epsilon(
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        steps=steps,
        delta=delta,
        accountant=accountant,
    )


# ----------------------------------------------------------------------------------------
# Train and evaluate.
# ----------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Trains one DP-SGD run per noise multiplier and the baselines; writes the results.

    A rerun in the same workdir resumes each run from its latest checkpoint (or skips a
    finished one) to the numbers of an uninterrupted run; SIGTERM saves and returns
    ``{"preempted": True, "run": name, "step": N}``; non-finite parameters stop the run
    before they are evaluated or saved; a workdir made by a different config is refused
    unless ``allow_config_change`` (``num_steps``, ``eval_every`` and
    ``checkpoint_every`` may change; a run trained past ``num_steps`` is refused).

    Writes into ``workdir``: ``config.json``; per run ``runs/<name>/metrics.jsonl`` and
    TensorBoard events (one record per evaluation: ``epoch``, ``noise_multiplier``,
    ``epsilon`` for the private runs, ``train_loss``, ``test_loss``, ``test_accuracy``,
    ``clipped_fraction``, ``non_finite``, ``examples``, ``overflow``, ``overflowed``) and
    ``runs/<name>/checkpoints/``; ``results.json``; ``accuracy_vs_epsilon.png``.

    Returns:
      The contents of ``results.json`` (``"private"``: per σ the final ``epsilon`` and
      ``test_accuracy``; ``"baselines"``; ``"curves"``: each run's records; the sizes)
      with ``"params"`` (``{run: final parameters}``), ``"trained_steps"`` (``{run: steps
      trained by this call}``) and ``"preempted": False``.
    """
    # Config: checked, and bound to the workdir, before anything is built ----------------
    start_time = time.perf_counter()
    validate_config(config)
    if jax.process_count() > 1:
        raise ValueError("experiments.dp runs on one process; start it without a cluster.")
    changes = jt.bind_config_to_workdir(
        config, workdir, may_differ=RESUMABLE_FIELDS, allow_changes=allow_config_change
    )
    if changes:
        jt.announce(f"Continuing {workdir} with changed config fields: {', '.join(changes)}.")
    runs = runs_of(config)

    # Data: Poisson sampling at q = expected_batch_size / N, padded to batch_size slots ---
    data = load_data(config)
    train_images, train_labels = data["train"]["image"], data["train"]["label"]
    test_images = jnp.asarray(data["test"]["image"])
    test_labels = jnp.asarray(data["test"]["label"])
    num_train = len(train_labels)
    if config.expected_batch_size > num_train:
        raise ValueError(
            f"config.expected_batch_size ({config.expected_batch_size}) exceeds the "
            f"{num_train} training examples (the sampling rate would pass 1)."
        )
    sampling_rate = config.expected_batch_size / num_train
    batch_size = config.batch_size or privacy.padded_batch_size(
        num_train, sampling_rate, config.overflow_probability
    )

    # Model: the same initial weights for every run ---------------------------------------
    model = build_model(config)
    init_params = model.init(jax.random.key(config.seed), train_images[:1])["params"]

    # Update step: one spec for the clipped runs (every σ), one for the plain gradient ----
    common = dict(
        model=model,
        normalize_by=sampling_rate * num_train,
        method=config.privacy.method,
        optimizer=config.optimizer,
        learning_rate=float(config.learning_rate),
        momentum=float(config.momentum),
    )
    clipped_spec = StepSpec(l2_clip_norm=float(config.privacy.l2_clip_norm), **common)
    plain_spec = StepSpec(l2_clip_norm=None, **common)
    sensitivity = clipped_grad_fn(clipped_spec).sensitivity()  # C / (qN)
    jt.announce(
        f"{num_train} training examples, q = {sampling_rate:.4g} (expected batch "
        f"{config.expected_batch_size}, padded to {batch_size}), {config.num_steps} steps "
        f"({config.num_steps * sampling_rate:.1f} epochs), runs: " + ", ".join(r.name for r in runs)
    )

    def train_run(run: Run):
        """Trains (or resumes, or restores) one run; ``None`` when preempted."""
        run_dir = os.path.join(workdir, RUNS_DIR, run.name)
        spec = clipped_spec if run.clipped else plain_spec
        stddev = jnp.float32(run.noise_multiplier * sensitivity)

        # Sampler and optimizer: the same batches and standard normals for every run -----
        sampler = privacy.PoissonSampler(num_train, sampling_rate, batch_size, seed=config.seed)
        # The step donates its inputs: each run gets its own copies of the weights and key.
        noise_key = jax.random.fold_in(jax.random.key(config.seed), 1)
        tx = make_optimizer(spec, float(stddev), noise_key)
        params = jax.tree.map(jnp.copy, init_params)
        tree = {
            "params": params,
            "opt_state": tx.init(params),
            "totals": zero_totals(),
            "sampler": sampler.get_state(),
        }
        records: list[dict[str, Any]] = []

        # Checkpoint: resume, or restore a finished run ----------------------------------
        ckpt = jt.Checkpointer(os.path.join(run_dir, "checkpoints"))
        if ckpt.latest_step is not None:
            if ckpt.latest_step > config.num_steps:
                ckpt.close()
                raise ValueError(
                    f"{run_dir} holds a run trained for {ckpt.latest_step} steps, more than "
                    f"config.num_steps={config.num_steps}; use a new workdir."
                )
            tree, extra = ckpt.restore(tree)
            sampler.set_state(tree["sampler"])
            records = extra["records"]
            done = sampler.next_step
            jt.announce(
                f"{run.name}: finished run restored ({done} steps)."
                if done == config.num_steps
                else f"{run.name}: resumed from step {done} of {config.num_steps}."
            )
        params, opt_state, totals = tree["params"], tree["opt_state"], tree["totals"]
        start = sampler.next_step

        # Evaluation: test accuracy, ε so far, the drawn examples since the last one -----
        def evaluation(step: int, params, totals) -> dict[str, Any]:
            accuracy, loss = evaluate(params, test_images, test_labels, model=model)
            sums = {k: float(v) for k, v in jax.device_get(totals).items()}
            seen = max(sums["examples"], 1.0)
            before = records[-1]["overflowed"] if records else 0
            record = {
                "step": step,
                "epoch": step * sampling_rate,
                "noise_multiplier": run.noise_multiplier,
                "train_loss": sums["loss"] / max(seen - sums["non_finite"], 1.0),
                "test_loss": float(loss),
                "test_accuracy": float(accuracy),
                "clipped_fraction": sums["clipped"] / seen,
                "non_finite": int(sums["non_finite"]),
                "examples": int(sums["examples"]),
                "overflow": sampler.overflowed - before,
                "overflowed": sampler.overflowed,
            }
            if run.private:
                record["epsilon"] = epsilon_after(
                    run.noise_multiplier,
                    sampler.sampling_rate,
                    step,
                    float(config.privacy.delta),
                    config.privacy.accountant,
                )
            return record

        # Loop ---------------------------------------------------------------------------
        writer = jt.MetricWriter(run_dir)
        guard = jt.FiniteGuard()  # no diverged state is ever evaluated or saved
        with (
            jt.finish_saves_on_error(ckpt, writer),
            jt.PreemptionSignal(ckpt) as preempted,
            jt.progress_bar(config.num_steps, initial=start, desc=run.name) as bar,
        ):
            for step in range(start, config.num_steps):
                sample = sampler.batch(step)
                batch = {
                    "image": train_images[sample.indices],
                    "label": train_labels[sample.indices],
                    "weights": sample.weights,
                }
                params, opt_state, totals, metrics = train_step(
                    params, opt_state, totals, batch, stddev, spec=spec
                )
                done = step + 1
                guard.update(done, metrics)
                if done % config.eval_every == 0 or done == config.num_steps:
                    guard.check(params)
                    record = evaluation(done, params, totals)
                    records.append(record)
                    writer.write(done, {k: v for k, v in record.items() if k != "step"})
                    totals = zero_totals()
                    bar.set_postfix(accuracy=f"{record['test_accuracy']:.3f}")
                stop = preempted(done)
                if stop or done % config.checkpoint_every == 0 or done == config.num_steps:
                    guard.check(params)
                    saved = {
                        "params": params,
                        "opt_state": opt_state,
                        "totals": totals,
                        "sampler": sampler.get_state(),
                    }
                    ckpt.save(done, saved, extra={"records": records})
                ckpt.check_for_errors()  # a failed background save stops the run here
                bar.update(1)
                if stop:
                    writer.close()
                    ckpt.close()
                    jt.announce(
                        f"Preempted at step {done} of {run.name}: checkpoint saved in "
                        f"{workdir}; run the same command again to resume."
                    )
                    return None, done
            guard.check(params)
        writer.close()
        ckpt.close()
        return {
            "records": records,
            "params": jax.device_get(params),
            "trained_steps": config.num_steps - start,
        }, config.num_steps

    # Runs, one after the other ------------------------------------------------------------
    outcomes = {}
    for run in runs:
        outcome, step = train_run(run)
        if outcome is None:
            return {"preempted": True, "run": run.name, "step": step}
        outcomes[run.name] = outcome
    train_seconds = time.perf_counter() - start_time

    # Results and the plot ---------------------------------------------------------------
    curves = {name: o["records"] for name, o in outcomes.items()}
    private = []
    for run in runs:
        if run.private:
            last = curves[run.name][-1]
            private.append(
                {
                    "run": run.name,
                    "noise_multiplier": run.noise_multiplier,
                    "epsilon": last["epsilon"],
                    "test_accuracy": last["test_accuracy"],
                    "test_loss": last["test_loss"],
                    "overflowed": last["overflowed"],
                }
            )
    baselines = {
        run.name: {k: curves[run.name][-1][k] for k in ("test_accuracy", "test_loss")}
        for run in runs
        if not run.private
    }
    results = {
        "model": config.model.name,
        "num_train": num_train,
        "num_test": int(test_labels.shape[0]),
        "sampling_rate": sampling_rate,
        "expected_batch_size": config.expected_batch_size,
        "batch_size": batch_size,
        "num_steps": config.num_steps,
        "epochs": config.num_steps * sampling_rate,
        "l2_clip_norm": config.privacy.l2_clip_norm,
        "delta": config.privacy.delta,
        "accountant": config.privacy.accountant,
        "private": private,
        "baselines": baselines,
        "curves": curves,
        "times": {"total_s": time.perf_counter() - start_time, "train_s": train_seconds},
    }
    with open(os.path.join(workdir, RESULTS), "w") as f:
        json.dump(results, f, indent=1)
    plots.plot_accuracy_vs_epsilon(
        curves,
        {run.name: run.noise_multiplier for run in runs if run.private},
        os.path.join(workdir, PLOT),
        delta=config.privacy.delta,
        title=(
            f"DP-SGD on digits, {config.model.name}, C = {config.privacy.l2_clip_norm:g}, "
            f"q = {sampling_rate:.3g}, {config.num_steps} steps"
        ),
    )
    return {
        **results,
        "params": {name: o["params"] for name, o in outcomes.items()},
        "trained_steps": {name: o["trained_steps"] for name, o in outcomes.items()},
        "preempted": False,
    }


def format_table(results: dict) -> str:
    """The final ``(σ, ε, test accuracy)`` of each private run, then the baselines."""
    delta = results["delta"]
    lines = [f"{'run':<14}{'σ':>6}{f'ε (δ={delta:g})':>16}{'test accuracy':>16}"]
    for row in results["private"]:
        lines.append(
            f"{row['run']:<14}{row['noise_multiplier']:>6g}{row['epsilon']:>16.3f}"
            f"{row['test_accuracy']:>16.4f}"
        )
    for name, row in results["baselines"].items():
        lines.append(f"{name:<14}{0:>6g}{'∞':>16}{row['test_accuracy']:>16.4f}")
    return "\n".join(lines)
