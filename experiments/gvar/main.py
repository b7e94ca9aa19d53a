r"""Entry point: ``python -m experiments.gvar.main --config=CONFIG --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.gvar.measure_every=50``. See
``experiments/gvar/configs/`` for linear regression, the digits MLP (default, no
download), MNIST and CIFAR-10. Rerunning the same command after a kill or a preemption
(SIGTERM) resumes the run; a workdir made by a different config is refused unless
``--allow_config_change``. Results: ``DIR/gvar.jsonl`` (one record per measured step and
estimator), ``DIR/gvar.png``, ``DIR/metrics.jsonl`` + TensorBoard events, ``DIR/results.json``.

On several processes, start the same command on every one: on a Cloud TPU pod slice or
under SLURM / Open MPI they find each other; elsewhere pass ``--coordinator_address``,
``--num_processes`` and ``--process_id``, or start them all with
``python -m experiments.launch.local --num_processes N -- python -m experiments.gvar.main
...``. The workdir must be a directory every process sees; process 0 writes the files.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.gvar import train
from experiments.launch import cluster_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training and measurement configuration.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Continue a workdir whose saved config.json differs from --config.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep checkpointing chatter out of the way
    cluster_flags.initialize()  # several processes: join them first
    results = train.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )
    if results["preempted"] or jax.process_index() != 0:
        return
    last = {}
    for record in results["records"]:
        last[record["estimator"]] = record
    print(" ".join(f"{k}={v:.4g}" for k, v in results["final"].items()))
    print(f"{'estimator':<12}{'variance':>12}{'norm. var':>12}{'SNR':>10}{'|g|':>10}")
    for name, r in last.items():
        print(
            f"{name:<12}{r['variance']:>12.4g}{r['normalized_variance']:>12.4g}"
            f"{r['snr']:>10.4g}{r['grad_norm']:>10.4g}"
        )


if __name__ == "__main__":
    app.run(main)
