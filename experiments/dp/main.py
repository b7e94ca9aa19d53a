r"""Entry point: ``python -m experiments.dp.main --config=CONFIG --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.privacy.noise_multipliers='(1.0,)'``.
Configs: ``experiments/dp/configs/default.py`` (the digits MLP, no download, half a
minute on two CPU cores), ``cnn.py`` (the small CNN) and ``quick.py`` (seconds, for the
tests). Rerunning the same command after a kill or a preemption (SIGTERM) resumes each
run from its checkpoint, or skips the finished ones; a workdir made by a different config
is refused unless ``--allow_config_change``. Prints the table of ``(σ, ε, test
accuracy)``; results in ``DIR/results.json``, ``DIR/accuracy_vs_epsilon.png`` and, per
run, ``DIR/runs/<run>/metrics.jsonl`` + TensorBoard events (``tensorboard --logdir
DIR/runs`` shows the runs side by side).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.dp import train

__all__ = ["main"]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep checkpointing chatter out of the way
    results = train.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )
    if results["preempted"]:
        return
    print(
        f"{results['model']}: q = {results['sampling_rate']:.4g}, {results['num_steps']} steps "
        f"({results['epochs']:.1f} epochs), C = {results['l2_clip_norm']:g}, "
        f"{results['accountant']} accountant"
    )
    print(train.format_table(results))
    print(f"time {results['times']['total_s']:.1f} s")


if __name__ == "__main__":
    # Defined here, not at import: tests import this module next to other entry points.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Model, privacy and training configuration.", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
    _ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
        "allow_config_change",
        False,
        "Continue a workdir whose saved config.json differs from --config.",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
