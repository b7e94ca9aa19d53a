"""Tuning, targets and speed-ups from the stored runs; the table.

* Tuning: each sampler's learning rate, per regime, is the one of the grid with the lowest
  mean final training loss over the seeds (the same seeds the table reports: the grid is
  small, and every sampler is tuned alike). A rate at which any seed diverged is never
  chosen.
* Targets, per seed: the tuned uniform run's training loss and test accuracy at
  ``target_step`` (the final values of a uniform run of ``target_step`` steps: constant
  learning rate, so that run is the first part of this one).
* Steps (examples, seconds) to a target: the first evaluation at which the run's full
  training loss is at or below it (test accuracy at or above it); ``None`` if the run never
  gets there within ``num_steps``, reported as such.
* Speed-up, per seed: uniform's steps (seconds) to the target over the sampler's; the table
  gives the mean ± standard deviation over the seeds that reached the target and how many
  did.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["first_crossing", "format_details", "format_table", "mean_std", "summarize", "tune"]

TARGETS = {"loss": ("train_loss", False), "accuracy": ("test_accuracy", True)}


def first_crossing(curve: list[dict], metric: str, target: float, *, higher_is_better=False):
    """The first point of ``curve`` whose ``metric`` reaches ``target``; ``None`` if none."""
    for point in curve:
        value = point[metric]
        if (value >= target) if higher_is_better else (value <= target):
            return point
    return None


def mean_std(values) -> dict:
    """``{"mean", "std", "n"}`` of the values that are not ``None`` (std with ``n - 1``)."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    return {"mean": float(np.mean(kept)), "std": std, "n": len(kept)}


def _final_loss(record) -> float:
    if record is None or record["diverged"]:
        return math.inf
    return record["curve"][-1]["train_loss"]


def tune(runs: dict, sampler: str, rates, seeds) -> tuple[float, dict]:
    """``(chosen rate, {rate: mean final training loss})`` of ``sampler``; inf: diverged."""
    scores = {}
    for rate in rates:
        losses = [_final_loss(runs.get((sampler, rate, seed))) for seed in seeds]
        scores[rate] = float(np.mean(losses)) if all(np.isfinite(losses)) else math.inf
    return min(rates, key=lambda r: scores[r]), scores


def _at_step(curve, step):
    return next(p for p in curve if p["step"] == step)


def _ratio(reference, point, key):
    if reference is None or point is None or point[key] <= 0:
        return None
    return reference[key] / point[key]


def summarize(config, records: list[dict]) -> dict:
    """The tuned rates, per-seed targets, steps and seconds to them, and the speed-ups."""
    seeds = list(range(config.num_seeds))
    rates = [float(r) for r in config.learning_rates]
    out = {
        "samplers": list(config.samplers),
        "learning_rates": rates,
        "num_seeds": config.num_seeds,
        "num_steps": config.num_steps,
        "target_step": config.target_step,
        "batch_size": config.batch_size,
        "regimes": {},
    }
    for regime in config.regimes:
        runs = {
            (r["sampler"], float(r["learning_rate"]), r["seed"]): r
            for r in records
            if r["regime"] == regime
        }
        tuning = {s: tune(runs, s, rates, seeds) for s in config.samplers}
        chosen = {s: rate for s, (rate, _) in tuning.items()}
        uniform = {seed: runs[("uniform", chosen["uniform"], seed)]["curve"] for seed in seeds}
        targets = {
            seed: {
                metric: _at_step(curve, config.target_step)[key]
                for metric, (key, _) in TARGETS.items()
            }
            for seed, curve in uniform.items()
        }
        samplers = {}
        for sampler in config.samplers:
            per_seed = []
            for seed in seeds:
                record = runs[(sampler, chosen[sampler], seed)]
                curve = record["curve"]
                row = {"seed": seed, "diverged": record["diverged"]}
                for metric, (key, higher) in TARGETS.items():
                    target = targets[seed][metric]
                    mine = first_crossing(curve, key, target, higher_is_better=higher)
                    ref = first_crossing(uniform[seed], key, target, higher_is_better=higher)
                    for unit in ("step", "examples", "seconds"):
                        row[f"{unit}_to_{metric}"] = None if mine is None else mine[unit]
                    row[f"speedup_steps_{metric}"] = _ratio(ref, mine, "step")
                    row[f"speedup_seconds_{metric}"] = _ratio(ref, mine, "seconds")
                last, base = curve[-1], uniform[seed][-1]
                row["final_train_loss"] = last["train_loss"]
                row["final_test_accuracy"] = last["test_accuracy"]
                row["final_train_loss_minus_uniform"] = last["train_loss"] - base["train_loss"]
                row["final_test_accuracy_minus_uniform"] = (
                    last["test_accuracy"] - base["test_accuracy"]
                )
                row["seconds_per_step"] = last["seconds"] / max(last["step"], 1)
                row["refresh_fraction"] = last["refresh_seconds"] / max(last["seconds"], 1e-12)
                per_seed.append(row)
            summary = {
                key: mean_std([row[key] for row in per_seed])
                for key in per_seed[0]
                if key not in ("seed", "diverged")
            }
            samplers[sampler] = {
                "learning_rate": chosen[sampler],
                "tuning": {f"{r:g}": v for r, v in tuning[sampler][1].items()},
                "per_seed": per_seed,
                "summary": summary,
            }
        first = next(iter(runs.values()))
        out["regimes"][regime] = {
            "num_train": first["num_train"],
            "initial_train_loss": first["curve"][0]["train_loss"],
            "targets": {str(s): t for s, t in targets.items()},
            "samplers": samplers,
        }
    return out


def _cell(summary: dict, metric: str, seeds: int) -> str:
    steps, seconds = summary[f"speedup_steps_{metric}"], summary[f"speedup_seconds_{metric}"]
    if not steps["n"]:
        return f"not reached (0/{seeds})"
    text = (
        f"{steps['mean']:.2f} ± {steps['std']:.2f} / {seconds['mean']:.2f} ± {seconds['std']:.2f}"
    )
    return text if steps["n"] == seeds else f"{text} ({steps['n']}/{seeds})"


def format_table(results: dict, metric: str = "loss") -> str:
    """Markdown: rows are regimes, columns the samplers other than uniform; each cell the
    speed-up in steps / in seconds to the target, mean ± std over seeds (``k/n``: only ``k``
    of the ``n`` seeds reached it)."""
    others = [s for s in results["samplers"] if s != "uniform"]
    seeds = results["num_seeds"]
    what = "training loss" if metric == "loss" else "test accuracy"
    lines = [
        f"Speed-up to uniform's {what} at step {results['target_step']} (per seed), "
        f"steps / seconds, mean ± std over {seeds} seeds:",
        "",
        "| regime | " + " | ".join(others) + " |",
        "| --- | " + " | ".join("---" for _ in others) + " |",
    ]
    for regime, entry in results["regimes"].items():
        cells = [_cell(entry["samplers"][s]["summary"], metric, seeds) for s in others]
        lines.append(f"| {regime} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_details(results: dict) -> str:
    """Per regime and sampler: the tuned rate, final loss and accuracy, seconds per step."""
    lines = [
        "| regime | sampler | lr | final train loss | final test acc. | "
        "Δ loss vs uniform (paired) | ms / step | refresh share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for regime, entry in results["regimes"].items():
        for sampler, row in entry["samplers"].items():
            s = row["summary"]
            lines.append(
                f"| {regime} | {sampler} | {row['learning_rate']:g} | "
                f"{s['final_train_loss']['mean']:.4f} ± {s['final_train_loss']['std']:.4f} | "
                f"{s['final_test_accuracy']['mean']:.3f} | "
                f"{s['final_train_loss_minus_uniform']['mean']:+.4f} ± "
                f"{s['final_train_loss_minus_uniform']['std']:.4f} | "
                f"{1000 * s['seconds_per_step']['mean']:.3f} | "
                f"{s['refresh_fraction']['mean']:.2f} |"
            )
    return "\n".join(lines)
