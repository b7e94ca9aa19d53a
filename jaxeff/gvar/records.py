"""Variance measurements as JSON lines, and their plot against the training step.

One record per (step, estimator)::

  {"step": 100, "estimator": "sgd_b", "variance": 1.2e-05, "normalized_variance": 0.93,
   "snr": 0.41, "grad_norm": 0.12, "active_fraction": 0.87}

:func:`append_records` writes them (process 0 only), :func:`read_records` reads them back
(a later record for the same step and estimator, written by a resumed run, replaces the
earlier one), :func:`plot_records` draws each statistic against the step, one line per
estimator, on a log scale.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxeff._extras import require
from jaxeff.gvar.measure import STATISTICS, VarianceStats

__all__ = ["append_records", "plot_records", "read_records", "stats_record"]

_TITLES = {
    "variance": "average variance",
    "normalized_variance": "normalized variance",
    "snr": "SNR",
    "grad_norm": "gradient norm",
    "active_fraction": "active coordinates",
}


def stats_record(step: int, estimator: str, stats: VarianceStats, **extra: Any) -> dict[str, Any]:
    """``{"step", "estimator", <each statistic as a float>, **extra}``."""
    if not isinstance(stats, VarianceStats):
        raise TypeError(f"`stats` must be VarianceStats, got {type(stats).__name__}.")
    values = jax.device_get(stats)
    record = {"step": int(step), "estimator": str(estimator)}
    record.update({name: float(np.asarray(v)) for name, v in zip(STATISTICS, values, strict=True)})
    record.update(extra)
    return record


def append_records(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """Appends records as JSON lines to ``path`` (its directory is created); process 0 only.

    Non-finite floats are written as ``Infinity``/``NaN``, which ``json`` reads back.
    """
    if jax.process_index() != 0:
        return
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lines = "".join(json.dumps(dict(r)) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``path``, sorted by step, the last one kept per (step, estimator).

    An incomplete last line (a run killed mid-write) is skipped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"`path`: no variance records at {path}.")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    latest: dict[tuple[int, str], dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        latest[(record["step"], record["estimator"])] = record
    return sorted(latest.values(), key=lambda r: r["step"])


def plot_records(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    quantities: Sequence[str] = ("variance", "normalized_variance"),
    title: str | None = None,
) -> None:
    """Draws each statistic against the training step, one line per estimator, log y.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    Estimators named ``exact*`` (exact statistics, not draws) are dashed.
    Non-positive and non-finite values (SVRG's exact zero at its snapshot) are left out
    of the log-scale lines.

    Args:
      records: as written by :func:`append_records` (e.g. :func:`read_records`).
      path: the PNG to write.
      quantities: the statistics to draw, one panel each.
      title: optional figure title.
    """
    agg = require(
        "matplotlib.backends.backend_agg", extra="plots", feature="jaxeff.gvar.plot_records"
    )
    figure = require("matplotlib.figure", extra="plots", feature="jaxeff.gvar.plot_records")

    if not records:
        raise ValueError("`records` is empty; there is nothing to plot.")
    unknown = [q for q in quantities if q not in STATISTICS]
    if unknown:
        raise ValueError(f"`quantities` {unknown} are not statistics; choose from {STATISTICS}.")
    names = list(dict.fromkeys(r["estimator"] for r in records))
    fig = figure.Figure(figsize=(4.2 * len(quantities), 3.4))
    agg.FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(quantities), squeeze=False)[0]
    for ax, quantity in zip(axes, quantities, strict=True):
        for name in names:
            points = [
                (r["step"], r[quantity])
                for r in records
                if r["estimator"] == name and math.isfinite(r[quantity]) and r[quantity] > 0
            ]
            if points:
                steps, values = zip(*points, strict=True)
                style = "--" if name.startswith("exact") else "-"
                ax.plot(steps, values, style, marker="o", ms=2.5, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(_TITLES.get(quantity, quantity))
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
