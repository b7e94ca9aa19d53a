r"""Entry point: ``python -m experiments.sampling_speed.main --config=CONFIG --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.num_seeds=3``. Configs:
``experiments/sampling_speed/configs/default.py`` (five digits regimes, no download, about
10 minutes on two CPU cores), ``mnist.py`` and ``cifar10.py`` (tensorflow-datasets prepared
as array_record, ``--config.data.data_dir``) and ``quick.py`` (seconds, for the tests).
Rerunning the same command after a kill skips the finished runs and reruns the
interrupted one from its start; a workdir made by a different config is refused unless
``--allow_config_change``. Prints the speed-up table; results in ``DIR/results.json``,
``DIR/table.md``, ``DIR/loss_<regime>.png``, ``DIR/speedup.png`` and, per run,
``DIR/runs/<regime>/<sampler>/<lr_seed>/metrics.jsonl`` + TensorBoard events
(``tensorboard --logdir DIR/runs``).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.sampling_speed import analysis, train

__all__ = ["main"]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    results = train.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )
    print(results["table"])
    print()
    print(analysis.format_table(results, "accuracy"))
    print()
    print(analysis.format_details(results))
    print(f"time {results['total_seconds']:.0f} s ({len(results['trained'])} runs trained)")


if __name__ == "__main__":
    # Defined here, not at import: tests import this module next to other entry points.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Regimes, samplers, learning-rate grid and training.", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the results.")
    _ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
        "allow_config_change",
        False,
        "Continue a workdir whose saved config.json differs from --config.",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
