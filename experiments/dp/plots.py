"""The figure of the DP-SGD runs: test accuracy against ε and against the epoch."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

__all__ = ["plot_accuracy_vs_epsilon"]

BASELINE_STYLES = {"non_private": ("k", "--"), "clip_only": ("grey", ":")}


def plot_accuracy_vs_epsilon(
    curves: dict, noise_multipliers: dict, path: str, *, delta: float, title: str = ""
) -> None:
    """Left: test accuracy against ε over training, one curve per σ (ε on a log axis, the
    step-0 point at ε = 0 left out), each baseline's final accuracy a horizontal line.
    Right: test accuracy against the epoch for every run.

    Args:
      curves: ``{run: [record, ...]}``, records with ``"epoch"``, ``"test_accuracy"`` and,
        for the private runs, ``"epsilon"`` (as ``train_and_evaluate`` returns them).
      noise_multipliers: ``{run: σ}`` of the private runs; the other runs are baselines.
      path: output PNG.
      delta: the ``δ`` of the ε values.
      title: the figure's title.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, (run, sigma) in enumerate(noise_multipliers.items()):
        points = [r for r in curves[run] if r["epsilon"] > 0]
        left.plot([r["epsilon"] for r in points], [r["test_accuracy"] for r in points],
                  "o-", ms=3, color=f"C{k}", label=f"σ = {sigma:g}")  # fmt: skip
    for run, records in curves.items():
        if run in noise_multipliers:
            k = list(noise_multipliers).index(run)
            colour, style, label = f"C{k}", "-", f"σ = {noise_multipliers[run]:g}"
        else:
            colour, style = BASELINE_STYLES.get(run, ("k", "-."))
            label = run.replace("_", " ")
            left.axhline(records[-1]["test_accuracy"], color=colour, ls=style, lw=1.2,
                         label=f"{label} (ε = ∞)")  # fmt: skip
        right.plot([r["epoch"] for r in records], [r["test_accuracy"] for r in records],
                   style, color=colour, label=label)  # fmt: skip
    left.set_xscale("log")
    left.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    left.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    left.xaxis.set_minor_formatter(ticker.NullFormatter())
    left.set_xlabel(f"ε at δ = {delta:g}")
    left.set_ylabel("test accuracy")
    right.set_xlabel("epoch (expected examples seen / N)")
    for ax in (left, right):
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
