"""Figures of the robustness study: margin ratios against d/n, robust accuracy against ε."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

NORM_LABELS = {"1": "L1", "2": "L2", "inf": "L∞"}
# One colour per norm: an optimiser and the max-margin solution it converges to share it.
COLOURS = {
    "gradient_descent": "C0",
    "max_margin_2": "C0",
    "coordinate_descent": "C1",
    "max_margin_1": "C1",
    "sign_descent": "C2",
    "max_margin_inf": "C2",
}


def method_label(method: str) -> str:
    if method.startswith("max_margin_"):
        return f"max-margin {NORM_LABELS[method.removeprefix('max_margin_')]}"
    return method.replace("_", " ")


def _by(runs, key):
    out = {}
    for run in runs:
        out.setdefault(run[key], []).append(run)
    return out


def plot_margin_ratios(runs: list[dict], path: str) -> None:
    """Margin in each norm over that norm's max-margin against d/n, one panel per optimiser.

    Mean over seeds, with the range shaded. Max-margin methods are left out (their own
    ratio is 1 by definition).

    Args:
      runs: the ``runs`` of ``train_and_evaluate`` (one dict per ``d/n``, seed, method).
      path: output PNG.
    """
    methods = {m: r for m, r in _by(runs, "method").items() if not m.startswith("max_margin")}
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), squeeze=False)
    for ax, (method, mine) in zip(axes[0], methods.items(), strict=True):
        ratios = sorted(_by(mine, "d_over_n"))
        for q, label in NORM_LABELS.items():
            values = [[r["margin_ratio"][q] for r in _by(mine, "d_over_n")[k]] for k in ratios]
            mean = [np.mean(v) for v in values]
            ax.plot(ratios, mean, marker="o", ms=3, label=f"{label} margin / max-margin")
            ax.fill_between(ratios, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_title(method_label(method))
        ax.set_xlabel("d / n")
        ax.set_ylim(top=1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("margin ratio")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_robust_accuracy(runs: list[dict], path: str) -> None:
    """Test accuracy under the worst perturbation against ε, one panel per d/n and attack.

    ``ε`` is in units of the training max-margin radius against the attack (the
    max-margin in the dual norm); mean over seeds. Optimisers solid, max-margin dashed.

    Args:
      runs: the ``runs`` of ``train_and_evaluate``.
      path: output PNG.
    """
    by_ratio = _by(runs, "d_over_n")
    attacks = list(runs[0]["robust_accuracy"])
    fig, axes = plt.subplots(
        len(by_ratio),
        len(attacks),
        figsize=(4.2 * len(attacks), 3.0 * len(by_ratio)),
        squeeze=False,
    )
    for row, ratio in zip(axes, sorted(by_ratio), strict=True):
        for ax, p in zip(row, attacks, strict=True):
            for method, mine in _by(by_ratio[ratio], "method").items():
                accuracy = np.mean([r["robust_accuracy"][p] for r in mine], axis=0)
                style = "--" if method.startswith("max_margin") else "-"
                ax.plot(
                    mine[0]["eps_ratio"],
                    accuracy,
                    style,
                    color=COLOURS.get(method),
                    label=method_label(method),
                )
            ax.set_title(f"d/n = {ratio}, {NORM_LABELS[p]} attack")
            ax.set_xlabel("ε / dual max-margin radius")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("robust test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
