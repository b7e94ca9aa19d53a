"""Figures of the VSE++ experiments: dev recall during training and final test recalls."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxeff import retrieval  # noqa: E402


def plot_dev_curves(histories: dict[str, list[list[dict]]], path: str) -> None:
    """Dev R@1 (both directions) and rsum against training step, mean ± range over seeds.

    Args:
      histories: ``{run name: [per-seed list of logged dev metric dicts]}``.
      path: output PNG.
    """
    keys = [
        ("dev_i2t_r1", "image→text R@1"),
        ("dev_t2i_r1", "text→image R@1"),
        ("dev_rsum", "rsum"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, seeds in histories.items():
        steps = [r["step"] for r in seeds[0]]
        for ax, (key, title) in zip(axes, keys, strict=True):
            values = np.array([[r[key] for r in h][: len(steps)] for h in seeds])
            ax.plot(steps, values.mean(0), marker="o", ms=3, label=name)
            if len(seeds) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_test_recalls(results: dict[str, list], path: str) -> None:
    """Grouped bars of test R@1/5/10 per direction, one bar per run (mean over seeds).

    Args:
      results: ``{run name: [per-seed RetrievalResult]}``.
      path: output PNG.
    """
    labels = ["i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(results)
    x = np.arange(len(labels))
    for i, (name, runs) in enumerate(results.items()):
        mean = retrieval.average(runs)
        values = [*mean.i2t[:3], *mean.t2i[:3]]
        bars = ax.bar(x + i * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x + width * (len(results) - 1) / 2, labels)
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
