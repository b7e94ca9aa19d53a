r"""Training with gradient-clustering batches against uniform batches, at equal examples seen.

    python -m experiments.gvar.compare --config=experiments/gvar/configs/gc_training.py \
        --workdir=/tmp/gvar_gc_training

Runs :func:`experiments.gvar.train.train_and_evaluate` once per sampler of
``SAMPLERS`` (``<workdir>/<sampler>``) with everything else equal: the same model
initialisation, learning rate and batch size, so step ``t`` has seen ``t · B`` examples in
both runs. ``"gc"`` draws each batch stratified over gradient clusters of the training
set with weights ``N_k/(N n_k)`` (an unbiased, lower-variance gradient), re-clustered every
``gc.recluster_every`` steps. Writes ``sampler_comparison.png`` (full training loss and
test accuracy against examples seen, one line per sampler) and ``comparison.json``.
Runs unchanged on many processes (``python -m experiments.launch.local --num_processes 2
-- python -m experiments.gvar.compare ...``, or on a pod): process 0 writes the files.
Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532.
"""

from __future__ import annotations

import json
import os

import jax
import matplotlib
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.gvar import train
from experiments.launch import cluster_flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["SAMPLERS", "compare_samplers", "plot_comparison"]

#: The samplers compared, in plotting order.
SAMPLERS = ("uniform", "gc")
PLOT, RESULTS = "sampler_comparison.png", "comparison.json"


def compare_samplers(config, workdir: str) -> dict:
    """Trains once per sampler; returns ``{sampler: [{"step", "examples", metrics...}]}``.

    Each run resumes on its own like any gradient-variance run; the curves are the
    evaluations at the measured steps (``gvar.measure_every``) over the whole training
    and test sets, as the runs return them (the same on every process; process 0 writes
    the plot and ``comparison.json``).
    """
    if not config.gvar.measure_every:
        raise ValueError(
            "config.gvar.measure_every must be positive: the curves are its evaluations."
        )
    curves = {}
    for sampler in SAMPLERS:
        run_config = config.copy_and_resolve_references()
        run_config.sampler = sampler
        run_dir = os.path.join(workdir, sampler)
        result = train.train_and_evaluate(run_config, run_dir)
        if result["preempted"]:
            return {"preempted": True}
        curves[sampler] = [
            {**m, "examples": m["step"] * config.batch_size} for m in result["evaluations"]
        ]
    if jax.process_index() == 0:
        plot_comparison(curves, os.path.join(workdir, PLOT), title=_title(config))
        with open(os.path.join(workdir, RESULTS), "w") as f:
            json.dump(curves, f, indent=1)
    return curves


def _title(config) -> str:
    return (
        f"{config.data.name}, {config.model.name}, batch {config.batch_size}, "
        f"{config.gc.num_clusters} clusters"
    )


def plot_comparison(curves: dict, path: str, *, title: str = "") -> None:
    """Training loss (log scale) and test accuracy (or loss) against examples seen."""
    second = (
        "test_accuracy" if all("test_accuracy" in r[0] for r in curves.values()) else "test_loss"
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = {"uniform": "SGD (uniform batches)", "gc": "GC (stratified batches)"}
    for sampler, rows in curves.items():
        x = [r["examples"] for r in rows]
        axes[0].plot(x, [r["train_loss"] for r in rows], label=labels.get(sampler, sampler))
        axes[1].plot(x, [r[second] for r in rows], label=labels.get(sampler, sampler))
    axes[0].set_yscale("log")
    axes[0].set_ylabel("training loss (whole set)")
    axes[1].set_ylabel(second.replace("_", " "))
    for ax in axes:
        ax.set_xlabel("examples seen")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    cluster_flags.initialize()  # several processes: join them first
    curves = compare_samplers(_CONFIG.value, _WORKDIR.value)
    if curves.get("preempted") or jax.process_index() != 0:
        return
    print(f"{'sampler':<10}{'examples':>10}{'train loss':>12}{'test acc.':>10}")
    for sampler, rows in curves.items():
        last = rows[-1]
        print(
            f"{sampler:<10}{last['examples']:>10}{last['train_loss']:>12.4g}"
            f"{last.get('test_accuracy', float('nan')):>10.3f}"
        )


if __name__ == "__main__":
    # Defined here, not at import: tests import this module next to other entry points.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Configuration.", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for both runs and the plot.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
