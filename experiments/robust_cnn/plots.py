"""Figures of the CNN attacks: robust accuracy against ε, and the perturbations' spectra."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["NORM_LABELS", "plot_robust_accuracy", "plot_spectra"]

NORM_LABELS = {"linf": "L∞", "l2": "L2", "l1": "L1", "fourier_inf": "Fourier-L∞"}
COLOURS = {"linf": "C0", "l2": "C2", "l1": "C3", "fourier_inf": "C1"}
# Norms whose radii are in the same units share a panel (ε bounds a pixel or a coefficient).
PANELS = (("linf", "fourier_inf"), ("l2",), ("l1",))


def plot_robust_accuracy(
    attacks: dict, path: str, *, clean_accuracy: float, title: str = ""
) -> None:
    """Robust test accuracy against ε: L∞ and Fourier-L∞ in one panel (same ε), L2 and L1
    in their own; the closed form of a linear model dashed; the clean accuracy dotted.

    Args:
      attacks: ``{norm: {"eps": [...], "robust_accuracy": [...], ["closed_form": [...]]}}``
        as in ``train_and_evaluate``'s results.
      path: output PNG.
      clean_accuracy: accuracy of the attacked points without perturbation.
      title: the figure's title.
    """
    panels = [[n for n in group if n in attacks] for group in PANELS]
    panels = [group for group in panels if group]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for ax, group in zip(axes[0], panels, strict=True):
        for name in group:
            curve = attacks[name]
            label = f"{NORM_LABELS[name]} PGD"
            ax.plot(curve["eps"], curve["robust_accuracy"], "o-", ms=3, color=COLOURS[name],
                    label=label)  # fmt: skip
            if "closed_form" in curve:
                ax.plot(curve["eps"], curve["closed_form"], "--", color="k", lw=1, zorder=3,
                        label=f"{NORM_LABELS[name]} exact (linear)")  # fmt: skip
        ax.axhline(clean_accuracy, color="grey", ls=":", lw=1, label="clean")
        ax.set_xlabel("ε (" + " / ".join(NORM_LABELS[n] for n in group) + ")")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("robust test accuracy")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(spectra: dict, path: str, *, title: str = "") -> None:
    """Mean modulus of the per-channel DFT of the perturbations, ``mean |F δ| / ε``, one
    panel per attack norm, zero frequency in the centre, one colour scale for all.

    Args:
      spectra: ``{norm: {"eps": ε, "mean_abs": (H, W) centred spectrum, "top_share": s}}``.
      path: output PNG.
      title: the figure's title.
    """
    names = list(spectra)
    images = {n: np.asarray(spectra[n]["mean_abs"]) / spectra[n]["eps"] for n in names}
    vmax = max(float(im.max()) for im in images.values()) or 1.0
    fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names) + 0.8, 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        image = images[name]
        h, w = image.shape
        shown = ax.imshow(image, cmap="magma", vmin=0, vmax=vmax,
                          extent=(-w // 2 - 0.5, w - w // 2 - 0.5, h - h // 2 - 0.5,
                                  -h // 2 - 0.5))  # fmt: skip
        ax.set_title(
            f"{NORM_LABELS[name]} PGD, ε = {spectra[name]['eps']:.4g}\n"
            f"top 10% of coefficients: {100 * spectra[name]['top_share']:.0f}% of energy",
            fontsize=9,
        )
        ax.set_xlabel("horizontal frequency")
    axes[0][0].set_ylabel("vertical frequency")
    fig.colorbar(shown, ax=axes[0].tolist(), label="mean |F δ| / ε", shrink=0.85)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
