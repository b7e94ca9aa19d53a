"""Figures of the robustness studies: margin ratios against d/n or step, robust accuracy
against ε."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_conv_robust_accuracy",
    "plot_conv_training",
    "plot_margin_ratios",
    "plot_robust_accuracy",
]

NORM_LABELS = {"1": "L1", "2": "L2", "inf": "L∞"}
# One colour per norm: an optimiser, the penalty and the max-margin solution they converge
# to share it; the line style tells the kind of method.
COLOURS = {
    "gradient_descent": "C0",
    "regularized_2": "C0",
    "max_margin_2": "C0",
    "coordinate_descent": "C1",
    "regularized_1": "C1",
    "max_margin_1": "C1",
    "sign_descent": "C2",
    "regularized_inf": "C2",
    "max_margin_inf": "C2",
}


def method_label(method: str) -> str:
    if method.startswith("max_margin_"):
        return f"max-margin {NORM_LABELS[method.removeprefix('max_margin_')]}"
    if method.startswith("regularized_"):
        return f"{NORM_LABELS[method.removeprefix('regularized_')]}-regularised"
    return method.replace("_", " ")


def line_style(method: str) -> str:
    """Optimisers solid, regularised losses dash-dotted, max-margin solutions dashed."""
    if method.startswith("max_margin"):
        return "--"
    return "-." if method.startswith("regularized") else "-"


def _by(runs, key):
    out = {}
    for run in runs:
        out.setdefault(run[key], []).append(run)
    return out


def plot_margin_ratios(runs: list[dict], path: str) -> None:
    """Margin in each norm over that norm's max-margin against d/n, one panel per optimiser
    or regulariser (three to a row).

    Mean over seeds, with the range shaded. Max-margin methods are left out (their own
    ratio is 1 by definition).

    Args:
      runs: the ``runs`` of ``train_and_evaluate`` (one dict per ``d/n``, seed, method).
      path: output PNG.
    """
    methods = {m: r for m, r in _by(runs, "method").items() if not m.startswith("max_margin")}
    columns = 3
    rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, (method, mine) in zip(axes.flat, methods.items(), strict=False):
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
    for row in axes:
        row[0].set_ylabel("margin ratio")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_robust_accuracy(runs: list[dict], path: str) -> None:
    """Test accuracy under the worst perturbation against ε, one panel per d/n and attack.

    ``ε`` is in units of the training max-margin radius against the attack (the
    max-margin in the dual norm); mean over seeds. Optimisers solid, regularised losses
    dash-dotted, max-margin dashed.

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
                ax.plot(
                    mine[0]["eps_ratio"],
                    accuracy,
                    line_style(method),
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


# ----------------------------------------------------------------------------------------
# The linear circular-convolution experiment.
# ----------------------------------------------------------------------------------------
CONV_LABELS = {
    "conv": "linear conv net",
    "fully_connected": "fully connected",
    "max_margin_fourier_1": "max-margin Fourier-L1",
    "max_margin_2": "max-margin L2",
}
CONV_COLOURS = {
    "conv": "C3",
    "max_margin_fourier_1": "C3",
    "fully_connected": "C0",
    "max_margin_2": "C0",
}
FOURIER_LABELS = {"fourier_1": "Fourier-L1", "2": "L2", "fourier_inf": "Fourier-L∞", "inf": "L∞"}


def plot_conv_training(histories: dict, path: str) -> None:
    """Margin ratio and cosine to the Fourier-L1 and L2 max-margins against the step.

    One line per network and norm (solid Fourier-L1, dashed L2), the mean over seeds with
    the range shaded.

    Args:
      histories: ``{"seed{s}/{network}": [{"step", "margin_ratio/{q}", "cosine/{q}", ...}]}``
        from ``linear_conv.train_and_evaluate``.
      path: output PNG.
    """
    by_network = {}
    for key, history in histories.items():
        by_network.setdefault(key.split("/", 1)[1], []).append(history)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, quantity, title in zip(
        axes,
        ("margin_ratio", "cosine"),
        ("normalised margin / max-margin", "cosine to the max-margin classifier"),
        strict=True,
    ):
        for network, seeds in by_network.items():
            # Step 0 is the zero classifier, where neither quantity is defined.
            steps = np.array([r["step"] for r in seeds[0][1:]])
            for q, style in (("fourier_1", "-"), ("2", "--")):
                values = np.array([[r[f"{quantity}/{q}"] for r in h[1:]] for h in seeds])
                ax.plot(
                    steps,
                    values.mean(0),
                    style,
                    color=CONV_COLOURS[network],
                    label=f"{CONV_LABELS[network]}, {FOURIER_LABELS[q]}",
                )
                ax.fill_between(
                    steps,
                    values.min(0),
                    values.max(0),
                    color=CONV_COLOURS[network],
                    alpha=0.15,
                )
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_conv_robust_accuracy(runs: list[dict], path: str) -> None:
    """Robust test accuracy against ε under Fourier-L∞, L∞ and L2 perturbations.

    ``ε`` is in units of the training max-margin radius against the attack; mean over
    seeds. The networks solid, the max-margin classifiers they converge to dashed.

    Args:
      runs: the ``runs`` of ``linear_conv.train_and_evaluate``.
      path: output PNG.
    """
    by_classifier = _by(runs, "classifier")
    attacks = list(runs[0]["robust_accuracy"])
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.4), squeeze=False)
    for ax, p in zip(axes[0], attacks, strict=True):
        for name, mine in by_classifier.items():
            accuracy = np.mean([r["robust_accuracy"][p] for r in mine], axis=0)
            ax.plot(
                mine[0]["eps_ratio"],
                accuracy,
                "--" if name.startswith("max_margin") else "-",
                color=CONV_COLOURS.get(name),
                label=CONV_LABELS.get(name, name),
            )
        ax.set_title(f"{FOURIER_LABELS[p]} attack")
        ax.set_xlabel("ε / max-margin radius")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("robust test accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
