"""The figures: training loss against examples seen and seconds per regime; the speed-ups.

``loss_<regime>.png``: the full training loss (log scale) of each sampler at its tuned
learning rate, mean over the seeds with the min–max band, against examples seen and
against the clock (refreshes included, evaluation excluded), the per-seed targets' mean
as a dashed line. ``speedup.png``: the speed-up in steps and in seconds to the target per
regime and sampler, mean ± std over the seeds that reached it.
"""

from __future__ import annotations

import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["COLOURS", "LABELS", "plot_all", "plot_regime", "plot_speedups"]

LABELS = {
    "uniform": "uniform, batch B",
    "uniform_2b": "uniform, batch 2B",
    "uniform_iid": "uniform i.i.d. draws, batch B",
    "gc": "GC (stratified over clusters)",
    "importance": "importance (∝ gradient norm)",
}
#: One colour per sampler in every figure.
COLOURS = {
    "uniform": "tab:blue",
    "uniform_2b": "tab:orange",
    "uniform_iid": "tab:purple",
    "gc": "tab:green",
    "importance": "tab:red",
}


def _mean_curves(records: list[dict]) -> dict[str, np.ndarray]:
    """Curves of the seeds, cut to the shortest (a diverged seed stops early)."""
    length = min(len(r["curve"]) for r in records)
    stack = {
        key: np.array([[p[key] for p in r["curve"][:length]] for r in records])
        for key in ("examples", "seconds", "train_loss")
    }
    return stack


def plot_regime(regime: str, entry: dict, records: list[dict], path: str, *, title: str = ""):
    """``loss_<regime>.png``: training loss against examples seen and against seconds."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for sampler, row in entry["samplers"].items():
        mine = [
            r
            for r in records
            if r["sampler"] == sampler and float(r["learning_rate"]) == row["learning_rate"]
        ]
        curves = _mean_curves(mine)
        loss = curves["train_loss"]
        label = f"{LABELS.get(sampler, sampler)}, lr {row['learning_rate']:g}"
        xs = (curves["examples"].mean(0), curves["seconds"].mean(0))
        for ax, x in zip(axes, xs, strict=True):
            colour = COLOURS.get(sampler)
            ax.plot(x, loss.mean(0), label=label, color=colour)
            ax.fill_between(x, loss.min(0), loss.max(0), color=colour, alpha=0.2)
    target = np.mean([t["loss"] for t in entry["targets"].values()])
    for ax, xlabel in zip(axes, ("examples seen", "seconds (refreshes included)"), strict=True):
        ax.axhline(target, color="k", ls="--", lw=0.8, label="target (uniform at target step)")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (whole set)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or regime)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedups(results: dict, path: str) -> None:
    """``speedup.png``: bars of the speed-up in steps and in seconds, per regime and sampler."""
    others = [s for s in results["samplers"] if s != "uniform"]
    regimes = list(results["regimes"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.8 / max(len(others), 1)
    for ax, unit in zip(axes, ("steps", "seconds"), strict=True):
        for i, sampler in enumerate(others):
            means, stds = [], []
            for regime in regimes:
                s = results["regimes"][regime]["samplers"][sampler]["summary"]
                value = s[f"speedup_{unit}_loss"]
                means.append(value["mean"] or 0.0)
                stds.append(value["std"] or 0.0)
            x = np.arange(len(regimes)) + (i - (len(others) - 1) / 2) * width
            label, colour = LABELS.get(sampler, sampler), COLOURS.get(sampler)
            ax.bar(x, means, width, yerr=stds, label=label, color=colour, capsize=2)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(regimes)), regimes, rotation=20)
        ax.set_title(f"speed-up in {unit} to the target loss (uniform = 1)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(results: dict, records: list[dict], workdir: str) -> list[str]:
    """Every figure into ``workdir``; returns their paths."""
    paths = []
    for regime, entry in results["regimes"].items():
        path = os.path.join(workdir, f"loss_{regime}.png")
        title = (
            f"{regime}: N = {entry['num_train']}, batch {results['batch_size']}, "
            f"{results['num_seeds']} seeds (mean, min–max)"
        )
        plot_regime(regime, entry, [r for r in records if r["regime"] == regime], path, title=title)
        paths.append(path)
    path = os.path.join(workdir, "speedup.png")
    plot_speedups(results, path)
    return [*paths, path]
