"""Command-line flags that join an experiment's processes into one cluster.

An entry point imports this module (which defines the flags) and calls
:func:`initialize` first thing in ``main``::

    from experiments.launch import cluster_flags

    def main(argv):
        cluster_flags.initialize()
        ...

With none of the flags, a Cloud TPU pod slice, a SLURM or an Open MPI job is detected,
and the variables set by ``python -m experiments.launch.local`` are read; on a single
process nothing happens. See :func:`jaxeff.train.distributed.initialize_distributed`.
"""

from absl import flags

from jaxeff.train import distributed

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, reachable by every process (multi-process runs outside a "
    "detected cluster).",
)
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of the run (1: a single process)."
)
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process, from 0.")


def initialize() -> bool:
    """Joins the cluster the flags (or the environment) describe; returns whether it did."""
    return distributed.initialize_distributed(
        coordinator_address=COORDINATOR_ADDRESS.value,
        num_processes=NUM_PROCESSES.value,
        process_id=PROCESS_ID.value,
    )
