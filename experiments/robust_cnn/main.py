r"""Entry point: ``python -m experiments.robust_cnn.main --config=CONFIG --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.attack.steps=20``. Configs:
``experiments/robust_cnn/configs/default.py`` (digits, no download, about a minute on two
CPU cores), ``cifar10.py`` (the real run, on prepared tfds files) and ``linear.py`` (a
linear model whose exact robust accuracy checks the attack). Rerunning the same command
resumes training from its checkpoint, or skips finished training and attacks the saved
model again (the ``attack`` and ``eval`` fields may change between runs). Results:
``DIR/results.json``, ``DIR/attacks.npz``, ``DIR/robust_accuracy.png``,
``DIR/spectrum.png``, ``DIR/metrics.jsonl`` + TensorBoard events.

On several processes, start the same command on every one: on a Cloud TPU pod slice or
under SLURM / Open MPI they find each other; elsewhere pass ``--coordinator_address``,
``--num_processes`` and ``--process_id``, or start them all with ``python -m
experiments.launch.local --num_processes N -- python -m experiments.robust_cnn.main ...``.
Training is data parallel over every device, the attacks are split by rows over the
processes, and process 0 alone prints and writes the results (the same as on one
process). The workdir must be a directory every process sees.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.launch import cluster_flags
from experiments.robust_cnn import plots, train

__all__ = ["main"]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cluster_flags.initialize()  # several processes: join them first
    logging.set_verbosity(logging.WARNING)  # keep checkpointing chatter out of the way
    results = train.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )
    if results["preempted"] or jax.process_index() != 0:
        return
    print(
        f"clean accuracy {results['clean_accuracy']:.4f} "
        f"({results['num_attacked']} points attacked, "
        f"{results['attacked_clean_accuracy']:.4f} of them clean)"
    )
    for name, curve in results["attacks"].items():
        cells = "  ".join(
            f"{eps:g}: {acc:.3f}"
            for eps, acc in zip(curve["eps"], curve["robust_accuracy"], strict=True)
        )
        print(f"{plots.NORM_LABELS[name]:>11} robust accuracy  {cells}")
        if "closed_form" in curve:
            exact = "  ".join(
                f"{eps:g}: {acc:.3f}"
                for eps, acc in zip(curve["eps"], curve["closed_form"], strict=True)
            )
            print(f"{'':>11} exact (linear)   {exact}")
    for name, spectrum in results["spectrum"].items():
        print(
            f"{plots.NORM_LABELS[name]:>11} perturbations at ε={spectrum['eps']:g}: the top "
            f"{100 * train.TOP_FRACTION:.0f}% of DFT coefficients hold "
            f"{100 * spectrum['top_share']:.1f}% of the energy"
        )


if __name__ == "__main__":
    # Defined here, not at import: tests import this module next to other entry points.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Training and attack configuration.", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
    _ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
        "allow_config_change",
        False,
        "Continue a workdir whose saved config.json differs from --config.",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
