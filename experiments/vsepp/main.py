r"""Entry point: ``python -m experiments.vsepp.main --config=CONFIG --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.batch_size=64``. See
``experiments/vsepp/configs/`` for VSE0, VSE++, Order0, Order++ and the generated-data
quick configs. Rerunning the same command after a kill or a preemption (SIGTERM) resumes
the run; a workdir made by a different config is refused unless ``--allow_config_change``.

On several processes, start the same command on every one: on a Cloud TPU pod slice or
under SLURM / Open MPI they find each other; elsewhere pass ``--coordinator_address``,
``--num_processes`` and ``--process_id``, or start them all with
``python -m experiments.launch.local --num_processes N -- python -m experiments.vsepp.main
...``. The workdir must be a directory every process sees.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.launch import cluster_flags
from experiments.vsepp import train
from jaxeff import retrieval

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
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
    if not results["preempted"] and jax.process_index() == 0:
        table = {"dev (best)": results["dev"]}
        if results["test"] is not None:
            table["test"] = results["test"]
        print(retrieval.format_table(table))


if __name__ == "__main__":
    app.run(main)
