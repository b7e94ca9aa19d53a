r"""Entry point: ``python -m experiments.robust.main --config=CONFIG --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.num_steps=5000``. The config's
``experiment`` field picks the study:

* ``"linear"`` (``configs/default.py``: the full d/n sweep, 3 seeds; ``configs/quick.py``:
  one d/n, one seed): steepest descent and norm regularisation in L1/L2/L∞ against the
  max-margin classifiers. Prints the table per d/n (rows the methods, columns the norms,
  ``*`` on each method's own norm); results in ``DIR/results.json``,
  ``DIR/measurements.jsonl``, ``DIR/weights.npz``, ``DIR/margin_ratio.png`` and
  ``DIR/robust_accuracy.png``.
* ``"linear_conv"`` (``configs/linear_conv.py``, ``configs/linear_conv_quick.py``): gradient
  descent on a linear circular-convolution network and on a fully connected one, against
  the Fourier-L1 and L2 max-margin classifiers. Prints the final table; results in
  ``DIR/results.json``, ``DIR/metrics.jsonl`` + TensorBoard events, ``DIR/weights.npz``,
  ``DIR/training.png`` and ``DIR/robust_accuracy.png``.

On several processes (``python -m experiments.launch.local --num_processes N -- python -m
experiments.robust.main ...``, or a pod) every process computes the study, which is small
and deterministic, and process 0 alone prints and writes the results.
"""

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments.launch import cluster_flags
from experiments.robust import linear_conv, train

__all__ = ["EXPERIMENTS", "main"]

EXPERIMENTS = {"linear": train, "linear_conv": linear_conv}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config.get("experiment") not in EXPERIMENTS:
        raise app.UsageError(
            f"config.experiment must be one of {sorted(EXPERIMENTS)}, got "
            f"{config.get('experiment')!r}."
        )
    cluster_flags.initialize()  # several processes: join them first
    results = EXPERIMENTS[config.experiment].train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() != 0:
        return
    times = dict(results["times"])
    total = times.pop("total_s")
    parts = ", ".join(
        f"{name.removesuffix('_s').replace('_', ' ')} {s:.1f} s" for name, s in times.items()
    )
    print(f"time {total:.1f} s ({parts})")


if __name__ == "__main__":
    # Defined here, not at import: tests import this module next to other entry points.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Data, optimiser and measurement configuration.", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the results.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
