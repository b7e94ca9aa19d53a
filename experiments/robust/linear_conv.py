"""Linear convolutional networks go to the Fourier-L1 max-margin: ``train_and_evaluate``.

Faghri, Gowal, Vasconcelos, Fleet, Pedregosa, Le Roux, "Bridging the Gap Between
Adversarial Robustness and Optimization Bias", https://arxiv.org/abs/2102.08868:
gradient descent on a linear network with one full-width circular convolution and a
linear readout converges in direction to the max-margin classifier in the Fourier-L1 norm
of its end-to-end weights (Gunasekar, Lee, Soudry, Srebro, "Implicit Bias of Gradient
Descent on Linear Convolutional Networks", NeurIPS 2018: in the Fourier domain the
network is diagonal, ``ŵ_f = conj(m_f) r̂_f``, and two factors per coordinate give the L1
norm of ``ŵ``), so it is the linear classifier most robust to Fourier-L∞ perturbations.
The same descent on a fully connected network of the same depth goes to the L2
max-margin classifier instead.

For each seed: Gaussian data labelled by a random teacher
(:func:`experiments.robust.train.synthetic_data`), the two networks

* ``conv``: :class:`jaxeff.models.LinearConvNet` with one single-channel circular
  convolution (kernel ``α δ``: the identity times ``α``, every frequency alike) and a
  zero readout;
* ``fully_connected``: :class:`jaxeff.models.DeepLinear` with one hidden layer of width
  ``d`` (kernel ``α I``) and a zero readout,

both starting at the zero classifier and trained by gradient descent with unit steps
``η ∇/||∇||`` on ``log L`` (:func:`jaxeff.robust.steepest_descent` in L2, normalised:
a positive rescaling of the gradient field, so the path of gradient flow on ``L``,
travelled faster; ``η = c / max_i ||x_i||_2``). Every ``log_every`` steps the equivalent
linear classifier ``w`` of each network (``model.linear_classifier()``) is measured
against the cvxpy max-margin classifiers in L1, L2, L∞, Fourier-L1 and Fourier-L∞:
``margin_ratio[q]`` (its normalised margin in ``q`` over the max-margin) and
``cosine[q]``. At the end, the exact robust test accuracy under Fourier-L∞, L∞ and L2
perturbations (:func:`jaxeff.robust.robust_accuracy`), with ``ε`` in units of the
training max-margin radius against each attack.

The run reads top to bottom: config, data, models, update step, measurements, loop,
results.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.robust import plots
from experiments.robust.train import log_logistic, synthetic_data, table_cells
from jaxeff import robust
from jaxeff import train as jt
from jaxeff.models import DeepLinear, LinearConvNet

__all__ = [
    "ATTACKS",
    "MODELS",
    "NORMS",
    "build_model",
    "classifier_measurements",
    "format_table",
    "log_loss",
    "robust_curves",
    "summarise",
    "train_and_evaluate",
    "train_steps",
    "validate_config",
]

#: The two networks and the weight norm each one's implicit bias maximises the margin in.
MODELS = {"conv": "fourier_1", "fully_connected": "2"}
#: Weight norms by name: the max-margin solutions measured against.
NORMS = {
    "1": 1.0,
    "2": 2.0,
    "inf": math.inf,
    "fourier_1": "fourier_1",
    "fourier_inf": "fourier_inf",
}
#: Perturbation norms of the robust-accuracy curves, by name (each the dual of a weight norm).
ATTACKS = {"fourier_inf": "fourier_inf", "inf": math.inf, "2": 2.0}
#: File names in the workdir (metrics.jsonl and TensorBoard events in ``seed{s}/``).
RESULTS, WEIGHTS = "results.json", "weights.npz"
TRAINING_PLOT, ROBUST_PLOT = "training.png", "robust_accuracy.png"


def norm_name(q) -> str:
    """The name in :data:`NORMS` of a weight norm."""
    return next(name for name, value in NORMS.items() if value == q)


# ----------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------
def validate_config(config) -> None:
    """Checks every field at start-up, before any data is made or anything compiled."""
    counts = (
        "num_seeds",
        "num_steps",
        "log_every",
        "data.dim",
        "data.num_train",
        "data.num_test",
        "robust.num_eps",
    )
    for field in counts:
        value = _get(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field} must be a positive integer, got {value!r}.")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"config.seed must be a non-negative integer, got {config.seed!r}.")
    jt.check_numbers(config, positive=["model.init_scale", "step_scale", "robust.max_eps_ratio"])


def _get(config, field):
    for key in field.split("."):
        config = config[key]
    return config


# ----------------------------------------------------------------------------------------
# Models: both start at the zero classifier, first layer α times the identity.
# ----------------------------------------------------------------------------------------
def build_model(name: str, dim: int, init_scale: float, seed: int) -> nnx.Module:
    """``conv`` or ``fully_connected``, no biases, first layer ``α·identity``, readout 0.

    The readout at zero makes the network's classifier ``w = 0``, like the zero init of the
    linear study; the identity first layer weighs every frequency (``conv``) or direction
    (``fully_connected``) alike, so only the architecture tells the two apart.
    """
    if name not in MODELS:
        raise ValueError(f"`name` must be one of {list(MODELS)}, got {name!r}.")
    rngs = nnx.Rngs(seed)
    if name == "conv":
        model = LinearConvNet((dim,), (1,), use_bias=False, rngs=rngs)
        kernel = model.convs[0].kernel
        kernel[...] = jnp.zeros_like(kernel[...]).at[0].set(init_scale)  # α δ: M(f) = α
        readout = model.readout.kernel
    else:
        model = DeepLinear(dim, (dim,), use_bias=False, rngs=rngs)
        model.layers[0].kernel[...] = init_scale * jnp.eye(dim)
        readout = model.layers[1].kernel
    readout[...] = jnp.zeros_like(readout[...])
    return model


# ----------------------------------------------------------------------------------------
# Update step: unit gradient steps on log L, many per compiled call.
# ----------------------------------------------------------------------------------------
def log_loss(model, x, y):
    """``log L``, ``L`` the mean logistic loss of the network's scores."""
    return jax.nn.logsumexp(log_logistic(y * model(x))) - jnp.log(x.shape[0])


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps"))
def train_steps(graphdef, state, x, y, *, num_steps: int):
    """``num_steps`` optimizer updates of the ``(model, optimizer)`` pair in ``state``."""

    def step(_, state):
        model, optimizer = nnx.merge(graphdef, state)
        optimizer.update(model, nnx.grad(log_loss)(model, x, y))
        return nnx.state((model, optimizer))

    return jax.lax.fori_loop(0, num_steps, step, state)


# ----------------------------------------------------------------------------------------
# Measurements: the network's linear classifier against the max-margin solutions.
# ----------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef",))
def classifier_measurements(graphdef, state, x, y, solutions):
    """Loss, classifier and, per norm, margin ratio and cosine to the max-margin weights.

    Args:
      solutions: ``{norm name: (w*, γ*)}``, the max-margin weights and margins.
    """
    model, _ = nnx.merge(graphdef, state)
    w = model.linear_classifier().w
    smallest = jnp.min(y * (x @ w))
    out = {"log_loss": log_loss(model, x, y), "w": w}
    for name, (best, margin) in solutions.items():
        out[f"margin_ratio/{name}"] = _ratio(smallest / margin, robust.norm(w, NORMS[name]))
        out[f"cosine/{name}"] = _ratio(
            jnp.vdot(w, best), jnp.linalg.norm(w) * jnp.linalg.norm(best)
        )
    return out


def _ratio(a, b):
    """``a / b``, and 0 for the zero classifier (``b = 0``) the networks start at."""
    return jnp.where(b > 0, a / jnp.where(b > 0, b, 1), 0.0)


def robust_curves(config, w, solutions, x_test, y_test) -> dict:
    """Exact robust test accuracy per attack, ``ε`` from 0 to ``max_eps_ratio`` times the
    training max-margin radius against the attack (the max-margin in its dual norm)."""
    ratios = np.linspace(0.0, config.robust.max_eps_ratio, config.robust.num_eps)
    out = {"eps_ratio": ratios.tolist(), "eps": {}, "robust_accuracy": {}}
    for name, p in ATTACKS.items():
        eps = ratios * solutions[norm_name(robust.dual_exponent(p))].margin
        accuracy = robust.robust_accuracy(w, x_test, y_test, eps=eps, p=p)
        out["eps"][name] = eps.tolist()
        out["robust_accuracy"][name] = np.asarray(accuracy, np.float64).tolist()
    return out


def format_table(summary: dict) -> str:
    """Rows the networks and max-margin classifiers, columns the norms; ``*`` on each
    row's own norm (for the robust accuracy, on the attack in its dual)."""
    labels = {"1": "L1", "2": "L2", "inf": "L∞", "fourier_1": "F1", "fourier_inf": "F∞"}
    norms = "".join(f"{labels[q]:>7} " for q in NORMS)
    attacks = "".join(f"{labels[p]:>7} " for p in ATTACKS)
    lines = [
        f"{'':<24}{'margin / max-margin':<42}{'cosine to max-margin':<42}robust test accuracy",
        f"{'classifier':<24}{norms}  {norms}  {attacks}",
    ]
    for row, values in summary.items():
        own = MODELS.get(row, row.removeprefix("max_margin_"))
        dual = norm_name(robust.dual_exponent(NORMS[own]))
        cells = table_cells(values, own=own, dual=dual, norms=NORMS, attacks=ATTACKS)
        lines.append(f"{row:<24}" + cells)
    return "\n".join(lines)


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds per classifier: final margin ratios, cosines and mean robust accuracy
    over the ``ε`` grid (``robust_auc``)."""
    table = {}
    for run in runs:
        table.setdefault(run["classifier"], []).append(run)
    return {
        name: {
            "margin_ratio": {q: _mean(r["margin_ratio"][q] for r in mine) for q in NORMS},
            "cosine": {q: _mean(r["cosine"][q] for r in mine) for q in NORMS},
            "robust_auc": {
                p: _mean(np.mean(r["robust_accuracy"][p]) for r in mine) for p in ATTACKS
            },
        }
        for name, mine in table.items()
    }


def _mean(values) -> float:
    return float(np.mean(list(values)))


def _cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------------------
# Loop and results.
# ----------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
    """Trains both networks on each seed's data and writes the results into ``workdir``.

    Writes: ``seed{s}/metrics.jsonl`` and TensorBoard events (per logged step and network:
    ``{network}/log_loss``, ``{network}/margin_ratio/{norm}``, ``{network}/cosine/{norm}``),
    ``results.json`` (the config, the table averaged over seeds, every classifier's final
    measurements and robust-accuracy curves, the training histories and the times),
    ``weights.npz`` (``"seed{s}/{classifier}"``: the networks' equivalent linear weights
    and the max-margin solutions; the data is :func:`synthetic_data` of the seed),
    ``training.png`` and ``robust_accuracy.png``; prints the table.

    Returns:
      ``{"summary": ..., "runs": [...], "histories": {...}, "weights": {...}, "table": str,
      "times": {...}}``.
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    runs, histories, weights = [], {}, {}
    times = {"max_margin_s": 0.0, "training_s": 0.0}
    dim, n = config.data.dim, config.data.num_train
    for s in range(config.num_seeds):
        seed = config.seed + s
        # Data and the max-margin classifiers it is measured against.
        x, y, x_test, y_test = synthetic_data(
            dim=dim, n=n, num_test=config.data.num_test, seed=seed
        )
        tick = time.perf_counter()
        solutions = {q: robust.max_margin(x, y, norm=value) for q, value in NORMS.items()}
        times["max_margin_s"] += time.perf_counter() - tick
        targets = {q: (jnp.asarray(sol.w, jnp.float32), sol.margin) for q, sol in solutions.items()}
        xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
        learning_rate = config.step_scale / float(np.max(np.linalg.norm(x, axis=1)))

        # Training, with measurements every `log_every` steps.
        tick = time.perf_counter()
        classifiers = {}
        with jt.MetricWriter(os.path.join(workdir, f"seed{seed}")) as writer:
            for name in MODELS:
                model = build_model(name, dim, config.model.init_scale, seed)
                tx = robust.steepest_descent(learning_rate, norm=2, normalize=True)
                optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
                graphdef, state = nnx.split((model, optimizer))
                history, step = [], 0
                while True:
                    measured = classifier_measurements(graphdef, state, xs, ys, targets)
                    record = {k: float(v) for k, v in measured.items() if k != "w"}
                    diverged = sorted(k for k, v in record.items() if not math.isfinite(v))
                    if diverged:
                        raise FloatingPointError(
                            f"{name} at step {step}: non-finite {', '.join(diverged)}; lower "
                            "config.step_scale."
                        )
                    history.append({"step": step, **record})
                    writer.write(step, {f"{name}/{k}": v for k, v in record.items()})
                    if step == config.num_steps:
                        break
                    chunk = min(config.log_every, config.num_steps - step)
                    state = train_steps(graphdef, state, xs, ys, num_steps=chunk)
                    step += chunk
                classifiers[name] = np.asarray(measured["w"], np.float64)
                histories[f"seed{seed}/{name}"] = history
        times["training_s"] += time.perf_counter() - tick

        # Final measurements of the networks and of the max-margin classifiers.
        classifiers.update({f"max_margin_{q}": solutions[q].w for q in MODELS.values()})
        for name, w in classifiers.items():
            weights[f"seed{seed}/{name}"] = w
            run = {"seed": seed, "classifier": name}
            run["margin_ratio"] = {
                q: float(robust.normalized_margin(w, x, y, norm=value)) / solutions[q].margin
                for q, value in NORMS.items()
            }
            run["cosine"] = {q: _cosine(w, sol.w) for q, sol in solutions.items()}
            run["max_margin"] = {q: sol.margin for q, sol in solutions.items()}
            run.update(robust_curves(config, w, solutions, x_test, y_test))
            runs.append(run)
        for q, sol in solutions.items():
            weights.setdefault(f"seed{seed}/max_margin_{q}", sol.w)
    times["total_s"] = time.perf_counter() - start

    summary = summarise(runs)
    table = format_table(summary)
    if jax.process_index() == 0:  # every process computes the (small) study; 0 writes it
        print(table, flush=True)
        _write_results(workdir, config, summary, runs, histories, times, weights)
    return {
        "summary": summary,
        "runs": runs,
        "histories": histories,
        "weights": weights,
        "table": table,
        "times": times,
    }


def _write_results(workdir, config, summary, runs, histories, times, weights) -> None:
    """``weights.npz``, ``results.json`` and the two plots."""
    np.savez(os.path.join(workdir, WEIGHTS), **weights)

    with open(os.path.join(workdir, RESULTS), "w") as f:
        json.dump(
            {
                "config": config.to_dict(),
                "summary": summary,
                "runs": runs,
                "histories": histories,
                "times": times,
            },
            f,
            indent=1,
        )
    plots.plot_conv_training(histories, os.path.join(workdir, TRAINING_PLOT))
    plots.plot_conv_robust_accuracy(runs, os.path.join(workdir, ROBUST_PLOT))
