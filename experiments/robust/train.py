"""Optimisation bias and robustness of linear classifiers: ``train_and_evaluate(config, workdir)``.

Faghri, Gowal, Vasconcelos, Fleet, Pedregosa, Le Roux, "Bridging the Gap Between
Adversarial Robustness and Optimization Bias", https://arxiv.org/abs/2102.08868, synthetic
study. For each ratio ``d/n`` of ``config.data.d_over_n`` and each seed: Gaussian data
labelled by a random teacher, and nine linear classifiers ("methods"):

* implicit bias: gradient descent (L2), coordinate descent (L1) and sign descent (L∞)
  from zero on the logistic loss (:func:`jaxeff.robust.steepest_descent`, unit steps);
* explicit regularisation: the logistic loss plus ``λ ||w||_q`` for ``q`` in L1, L2, L∞,
  minimised along a path ``λ = 1 -> e^min_log_lambda``
  (:func:`jaxeff.robust.regularization_path`: proximal gradient in JAX, warm-started, with
  ``λ`` carried by its logarithm because the path only reaches the max-margin direction
  where ``λ`` underflows). As ``λ -> 0`` the minimiser turns, in direction, into the
  max-margin classifier of ``q`` (Rosset, Zhu, Hastie, "Margin Maximizing Loss
  Functions", NeurIPS 2003); cvxpy solves a single ``λ`` exactly but fails beyond
  ``λ ≈ 1e-8``, where the margin is still 3 to 4 % short of the max-margin;
* the cvxpy max-margin classifiers in L1, L2 and L∞ (:func:`jaxeff.robust.max_margin`).

Each method is measured against each max-margin solution:

* ``margin_ratio[q]``: its normalised training margin in the weight norm ``q``
  (:func:`jaxeff.robust.normalized_margin`) over the max-margin ``γ*_q``, at most 1;
* ``cosine[q]``: the cosine similarity of its weights to the max-margin weights in ``q``;
* ``robust_accuracy[p]``: exact accuracy on held-out points under ``||δ||_p <= ε``
  (:func:`jaxeff.robust.robust_accuracy`) for ``ε`` from 0 to ``robust.max_eps_ratio``
  times ``γ*_{q(p)}``, the training max-margin radius against ``p`` (``q`` the dual of
  ``p``).

Steepest descent in a norm, and the logistic loss regularised by a norm, converge in
direction to the max-margin classifier in that norm: each method should be most aligned
with its own norm's solution (the diagonal of the table) and most robust to
perturbations in the dual norm.

The run reads top to bottom: config, data, optimisers, regularisation, measurements,
loop, results. The linear circular-convolution experiment is in
:mod:`experiments.robust.linear_conv`.
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

from experiments.robust import plots
from jaxeff import robust

__all__ = [
    "ATTACKS",
    "METHODS",
    "NORMS",
    "OPTIMISERS",
    "REGULARIZED",
    "format_table",
    "log_lambdas",
    "measure",
    "summarise",
    "synthetic_data",
    "train_and_evaluate",
    "train_optimiser",
    "train_regularized",
    "validate_config",
]

#: The optimisers and the norm of their steps (the config's ``step_scale`` fields).
OPTIMISERS = {
    "gradient_descent": 2.0,
    "coordinate_descent": 1.0,
    "sign_descent": math.inf,
}
#: Weight norms by name: the max-margin solutions and the columns of the table.
NORMS = {"1": 1.0, "2": 2.0, "inf": math.inf}
#: The explicitly regularised classifiers and the norm of their penalty.
REGULARIZED = {f"regularized_{q}": value for q, value in NORMS.items()}
#: Perturbation norms ``p`` of the attacks, by name.
ATTACKS = {"inf": math.inf, "2": 2.0, "1": 1.0}
#: The classifiers compared: the optimisers, the regularised logistic losses, then the
#: max-margin solution in each norm.
METHODS = (*OPTIMISERS, *REGULARIZED, *(f"max_margin_{q}" for q in NORMS))
#: File names in the workdir.
RESULTS, RECORDS, WEIGHTS = "results.json", "measurements.jsonl", "weights.npz"
MARGIN_PLOT, ROBUST_PLOT = "margin_ratio.png", "robust_accuracy.png"


def norm_name(q) -> str:
    """The name in :data:`NORMS` of a weight norm."""
    return next(name for name, value in NORMS.items() if value == q)


def own_norm(method: str) -> str:
    """The norm a method is biased towards: its step norm, its penalty or its max-margin
    norm."""
    if method in OPTIMISERS:
        return norm_name(OPTIMISERS[method])
    if method in REGULARIZED:
        return norm_name(REGULARIZED[method])
    return method.removeprefix("max_margin_")


# ----------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------
def validate_config(config) -> None:
    """Checks every field at start-up, before any data is made or anything compiled."""
    for field in (
        "num_seeds",
        "num_steps",
        "data.dim",
        "data.num_test",
        "robust.num_eps",
        "regularization.path_length",
        "regularization.steps_per_lambda",
    ):
        node, leaf = _node(config, field)
        value = node[leaf]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field} must be a positive integer, got {value!r}.")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"config.seed must be a non-negative integer, got {config.seed!r}.")
    ratios = tuple(config.data.d_over_n)
    if not ratios or any(not r > 0 for r in ratios) or len(set(ratios)) != len(ratios):
        raise ValueError(
            f"config.data.d_over_n must be distinct positive ratios, got {config.data.d_over_n!r}."
        )
    for ratio in ratios:
        if num_train(config.data.dim, ratio) < 1:
            raise ValueError(
                f"config.data.d_over_n holds {ratio}, which leaves no training point at "
                f"dim={config.data.dim}."
            )
    for name in OPTIMISERS:
        scale = config.step_scale[name]
        if not scale > 0:
            raise ValueError(f"config.step_scale.{name} must be positive, got {scale!r}.")
    end = config.regularization.min_log_lambda
    if isinstance(end, bool) or not isinstance(end, int | float) or not -math.inf < end < 0:
        raise ValueError(
            "config.regularization.min_log_lambda must be a finite negative number (the path "
            f"ends at λ = e^min_log_lambda < 1), got {end!r}."
        )
    if not config.robust.max_eps_ratio > 0:
        raise ValueError(
            f"config.robust.max_eps_ratio must be positive, got {config.robust.max_eps_ratio!r}."
        )


def _node(config, field):
    *parents, leaf = field.split(".")
    for parent in parents:
        config = config[parent]
    return config, leaf


def num_train(dim: int, ratio) -> int:
    """The number of training points ``n = round(d / ratio)``."""
    return int(round(dim / ratio))


# ----------------------------------------------------------------------------------------
# Data: x ~ N(0, I), labels sign(<x, w_teacher>), train and test from one teacher.
# ----------------------------------------------------------------------------------------
def synthetic_data(*, dim: int, n: int, num_test: int, seed: int):
    """``(x, y, x_test, y_test)`` in float64; the same arguments give the same arrays."""
    rng = np.random.default_rng((seed, dim, n))
    teacher = rng.normal(size=dim)
    x = rng.normal(size=(n + num_test, dim))
    y = np.where(x @ teacher >= 0, 1.0, -1.0)
    return x[:n], y[:n], x[n:], y[n:]


# ----------------------------------------------------------------------------------------
# Optimisers: unit steepest-descent steps on log L from zero.
# ----------------------------------------------------------------------------------------
def log_logistic(margins):
    """``log(softplus(-m))``, finite for large margins (it tends to ``-m``)."""
    large = margins > 15
    safe = jnp.where(large, 0.0, margins)
    return jnp.where(large, -margins, jnp.log(jax.nn.softplus(-safe)))


@functools.partial(jax.jit, static_argnames=("norm", "num_steps"))
def steepest_descent_weights(x, y, learning_rate, *, norm, num_steps: int):
    """Weights after ``num_steps`` unit steps of steepest descent in ``norm`` from zero.

    The objective is ``log L(w)``, ``L`` the mean logistic loss: its unit steepest-descent
    direction is that of ``L``, and its gradient does not underflow in float32 once the
    margins are large.
    """
    tx = robust.steepest_descent(learning_rate, norm=norm, normalize=True)

    def objective(w):
        return jax.nn.logsumexp(log_logistic(y * (x @ w))) - jnp.log(x.shape[0])

    def step(carry, _):
        w, state = carry
        updates, state = tx.update(jax.grad(objective)(w), state, w)
        return (w + updates, state), None

    w = jnp.zeros(x.shape[1], x.dtype)
    return jax.lax.scan(step, (w, tx.init(w)), None, length=num_steps)[0][0]


def train_optimiser(config, name: str, x, y) -> np.ndarray:
    """One optimiser's weights, step size ``c / max_i ||x_i||_*``."""
    norm = OPTIMISERS[name]
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    scale = float(jnp.max(robust.dual_norm(x, norm, batch_dims=1)))
    learning_rate = config.step_scale[name] / scale
    w = steepest_descent_weights(x, y, learning_rate, norm=norm, num_steps=config.num_steps)
    return np.asarray(w, np.float64)


# ----------------------------------------------------------------------------------------
# Explicit regularisation: the logistic loss plus λ||w||_q along a path λ -> 0.
# ----------------------------------------------------------------------------------------
def log_lambdas(config) -> np.ndarray:
    """``path_length`` values of ``log λ`` from 0 down to ``min_log_lambda``, evenly spaced."""
    path = config.regularization
    return np.linspace(0.0, path.min_log_lambda, path.path_length)


def train_regularized(config, name: str, x, y) -> np.ndarray:
    """The weights at the end of the regularisation path of one penalty, float64."""
    path = robust.regularization_path(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y, jnp.float32),
        norm=REGULARIZED[name],
        log_lambdas=log_lambdas(config),
        steps_per_lambda=config.regularization.steps_per_lambda,
    )
    return np.asarray(path[-1], np.float64)


# ----------------------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------------------
def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def eps_ratios(config) -> np.ndarray:
    """``num_eps`` radii from 0 to ``max_eps_ratio``, in units of the max-margin radius."""
    return np.linspace(0.0, config.robust.max_eps_ratio, config.robust.num_eps)


def measure(config, w, solutions, x, y, x_test, y_test) -> dict:
    """One classifier against the max-margin solutions: margins, cosines, robust accuracy.

    Args:
      w: ``(d,)`` weights.
      solutions: ``{norm name: MaxMarginSolution}`` on ``x, y``.

    Returns:
      ``{"margin": {q: γ_q(w)}, "margin_ratio": {q: γ_q(w) / γ*_q}, "cosine": {q: ...},
      "robust_accuracy": {p: [accuracy at each ε]}, "eps": {p: [ε]}, "eps_ratio": [ε / γ*]}``.
    """
    ratios = eps_ratios(config)
    out = {"margin": {}, "margin_ratio": {}, "cosine": {}, "robust_accuracy": {}, "eps": {}}
    out["eps_ratio"] = ratios.tolist()
    for q, value in NORMS.items():
        margin = float(robust.normalized_margin(w, x, y, norm=value))
        out["margin"][q] = margin
        out["margin_ratio"][q] = margin / solutions[q].margin
        out["cosine"][q] = cosine(w, solutions[q].w)
    for p, value in ATTACKS.items():
        eps = ratios * solutions[norm_name(robust.dual_exponent(value))].margin
        accuracy = robust.robust_accuracy(w, x_test, y_test, eps=eps, p=value)
        out["eps"][p] = eps.tolist()
        out["robust_accuracy"][p] = np.asarray(accuracy, np.float64).tolist()
    return out


def records_of(run: dict) -> list[dict]:
    """The flat JSON-lines records of one run's measurement (one per norm, one per ε)."""
    keys = {k: run[k] for k in ("d_over_n", "n", "seed", "method")}
    out = [
        {
            "kind": "margin",
            **keys,
            "norm": q,
            "margin": run["margin"][q],
            "margin_ratio": run["margin_ratio"][q],
            "cosine": run["cosine"][q],
        }
        for q in NORMS
    ]
    for p in ATTACKS:
        grid = zip(run["eps"][p], run["eps_ratio"], run["robust_accuracy"][p], strict=True)
        for eps, eps_ratio, accuracy in grid:
            out.append(
                {
                    "kind": "robust",
                    **keys,
                    "attack": p,
                    "eps": eps,
                    "eps_ratio": eps_ratio,
                    "accuracy": accuracy,
                }
            )
    return out


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds per ``d/n`` and method: margin ratios, cosines, mean robust accuracy.

    ``robust_auc[p]`` is the mean robust accuracy over the ``ε`` grid (the area under the
    curve over the grid's span).
    """
    table = {}
    for run in runs:
        table.setdefault(str(run["d_over_n"]), {}).setdefault(run["method"], []).append(run)
    summary = {}
    for ratio, methods in table.items():
        summary[ratio] = {}
        for method, mine in methods.items():
            summary[ratio][method] = {
                "margin_ratio": {q: _mean(r["margin_ratio"][q] for r in mine) for q in NORMS},
                "cosine": {q: _mean(r["cosine"][q] for r in mine) for q in NORMS},
                "robust_auc": {
                    p: _mean(np.mean(r["robust_accuracy"][p]) for r in mine) for p in ATTACKS
                },
            }
    return summary


def _mean(values) -> float:
    return float(np.mean(list(values)))


def table_cells(row: dict, *, own: str, dual: str, norms, attacks) -> str:
    """A table row's cells: margin ratio and cosine per weight norm, then the robust
    accuracy per attack, with ``*`` on the method's own norm and on the dual attack."""
    cells = [
        "".join(f"{row[key][q]:>7.4f}{'*' if q == own else ' '}" for q in norms)
        for key in ("margin_ratio", "cosine")
    ]
    cells.append(
        "".join(f"{row['robust_auc'][p]:>7.4f}{'*' if p == dual else ' '}" for p in attacks)
    )
    return "  ".join(cells)


def format_table(summary: dict) -> str:
    """The table per ``d/n``: rows the methods, columns the norms, ``*`` on a method's own norm
    (the diagonal; for the robust accuracy, on the attack in the dual of its own norm)."""
    norms = "".join(f"{'L' + q.replace('inf', '∞'):>7} " for q in NORMS)
    attacks = "".join(f"{'L' + p.replace('inf', '∞'):>7} " for p in ATTACKS)
    lines = []
    for ratio, methods in summary.items():
        lines.append(f"d/n = {ratio}")
        lines.append(
            f"{'':<20}{'margin / max-margin':<26}{'cosine to max-margin':<26}"
            "mean robust test accuracy"
        )
        lines.append(f"{'method':<20}{norms}  {norms}  {attacks}")
        for method, row in methods.items():
            own = own_norm(method)
            dual = norm_name(robust.dual_exponent(NORMS[own]))
            cells = table_cells(row, own=own, dual=dual, norms=NORMS, attacks=ATTACKS)
            lines.append(f"{method:<20}" + cells)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Loop and results.
# ----------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
    """Runs the study of ``config`` and writes its results into ``workdir``.

    Writes: ``results.json`` (the config, the table per ``d/n`` averaged over seeds, every
    run's measurements and the times), ``measurements.jsonl`` (flat records:
    ``kind="margin"`` per method and norm, ``kind="robust"`` per method, attack and ``ε``),
    ``weights.npz`` (``"dn{ratio}_seed{seed}/{method}"``: every classifier's weights;
    the data is :func:`synthetic_data` of the run's ``n`` and seed), ``margin_ratio.png``
    and ``robust_accuracy.png``; prints the table.

    Returns:
      ``{"summary": ..., "runs": [...], "weights": {key: w}, "table": str}``.
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    runs, weights = [], {}
    times = {"max_margin_s": 0.0, "optimisers_s": 0.0, "regularization_s": 0.0}
    for ratio in config.data.d_over_n:
        n = num_train(config.data.dim, ratio)
        for s in range(config.num_seeds):
            seed = config.seed + s
            x, y, x_test, y_test = synthetic_data(
                dim=config.data.dim, n=n, num_test=config.data.num_test, seed=seed
            )
            tick = time.perf_counter()
            solutions = {q: robust.max_margin(x, y, norm=value) for q, value in NORMS.items()}
            times["max_margin_s"] += time.perf_counter() - tick
            tick = time.perf_counter()
            classifiers = {name: train_optimiser(config, name, x, y) for name in OPTIMISERS}
            times["optimisers_s"] += time.perf_counter() - tick
            tick = time.perf_counter()
            classifiers.update(
                {name: train_regularized(config, name, x, y) for name in REGULARIZED}
            )
            times["regularization_s"] += time.perf_counter() - tick
            classifiers.update({f"max_margin_{q}": sol.w for q, sol in solutions.items()})
            for method, w in classifiers.items():
                weights[f"dn{ratio}_seed{seed}/{method}"] = w
                run = {"d_over_n": ratio, "n": n, "seed": seed, "method": method}
                run["max_margin"] = {q: sol.margin for q, sol in solutions.items()}
                run.update(measure(config, w, solutions, x, y, x_test, y_test))
                runs.append(run)
    times["total_s"] = time.perf_counter() - start

    summary = summarise(runs)
    table = format_table(summary)
    if jax.process_index() != 0:  # every process computes the (small) study; 0 writes it
        return {
            "summary": summary,
            "runs": runs,
            "weights": weights,
            "table": table,
            "times": times,
        }
    print(table, flush=True)
    with open(os.path.join(workdir, RECORDS), "w") as f:
        for run in runs:
            for record in records_of(run):
                f.write(json.dumps(record) + "\n")
    np.savez(os.path.join(workdir, WEIGHTS), **weights)
    with open(os.path.join(workdir, RESULTS), "w") as f:
        json.dump(
            {"config": config.to_dict(), "summary": summary, "runs": runs, "times": times},
            f,
            indent=1,
        )
    plots.plot_margin_ratios(runs, os.path.join(workdir, MARGIN_PLOT))
    plots.plot_robust_accuracy(runs, os.path.join(workdir, ROBUST_PLOT))
    return {"summary": summary, "runs": runs, "weights": weights, "table": table, "times": times}
