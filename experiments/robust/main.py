r"""Entry point: ``python -m experiments.robust.main --config=CONFIG --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.num_steps=5000``. Configs:
``experiments/robust/configs/default.py`` (the full d/n sweep, 3 seeds) and ``quick.py``
(one d/n, one seed). Prints the table per d/n (rows the methods, columns the norms, ``*``
on each method's own norm); results in ``DIR/results.json``, ``DIR/measurements.jsonl``,
``DIR/weights.npz``, ``DIR/margin_ratio.png`` and ``DIR/robust_accuracy.png``.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments.robust import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Data, optimiser and measurement configuration.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    times = results["times"]
    print(
        f"time {times['total_s']:.1f} s (optimisers {times['optimisers_s']:.1f} s, "
        f"max-margin {times['max_margin_s']:.1f} s)"
    )


if __name__ == "__main__":
    app.run(main)
