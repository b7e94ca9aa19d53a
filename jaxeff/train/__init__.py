"""Training skeleton shared by the experiments: small functions, no framework.

An experiment's ``train_and_evaluate`` reads top to bottom (big_vision style) and calls:

* :func:`make_mesh`, :func:`replicate`, :func:`shard_batch` -- data parallelism on one
  CPU, 8 fake devices or many hosts; :func:`initialize_distributed`,
  :func:`broadcast_from_process_zero`, :func:`run_in_turn`, :func:`gather_rows` -- joining
  a cluster, process-0 decisions, dataset preparation in turn, sharded evaluation;
* :func:`create_train_state`, :func:`make_train_step`, :func:`merge_model` -- the
  jit-compiled update step of an nnx model (optionally with per-example gradient
  statistics from the same pass); :class:`FiniteGuard`, :func:`check_finite` -- no
  diverged state is evaluated or saved;
* :class:`Checkpointer` -- latest and best checkpoints with orbax, plus a JSON extra dict;
  :class:`PreemptionSignal` -- SIGTERM saves and stops the loop;
* :class:`MetricWriter`, :func:`read_metrics`, :func:`progress_bar` -- JSON-lines and
  TensorBoard logging;
* :func:`check_numbers`, :func:`bind_config_to_workdir`, :func:`config_to_json` --
  ml_collections configs checked at start-up and bound to their workdir.
"""

from jaxeff.train.checkpoint import (
    Checkpointer,
    CheckpointWriteError,
    abstract_like,
    finish_saves_on_error,
)
from jaxeff.train.config import (
    bind_config_to_workdir,
    check_numbers,
    config_differences,
    config_to_json,
)
from jaxeff.train.distributed import (
    broadcast_from_process_zero,
    gather_rows,
    initialize_distributed,
    run_in_turn,
)
from jaxeff.train.metrics import (
    MetricWriter,
    announce,
    mean_metrics,
    progress_bar,
    read_metrics,
    to_python_scalars,
)
from jaxeff.train.preemption import PreemptionSignal
from jaxeff.train.sharding import (
    AXIS_TYPES,
    data_sharding,
    local_rows,
    make_mesh,
    replicate,
    replicated_sharding,
    shard_batch,
    with_auto_axes,
)
from jaxeff.train.step import (
    RESERVED_METRICS,
    FiniteGuard,
    TrainState,
    check_finite,
    create_train_state,
    first_non_finite_leaf,
    make_train_step,
    merge_model,
)

__all__ = [
    "mean_metrics",
    "finish_saves_on_error",
    "announce",
    "with_auto_axes",
    "local_rows",
    "run_in_turn",
    "initialize_distributed",
    "gather_rows",
    "broadcast_from_process_zero",
    "AXIS_TYPES",
    "RESERVED_METRICS",
    "CheckpointWriteError",
    "Checkpointer",
    "FiniteGuard",
    "MetricWriter",
    "PreemptionSignal",
    "TrainState",
    "abstract_like",
    "bind_config_to_workdir",
    "check_finite",
    "check_numbers",
    "config_differences",
    "config_to_json",
    "create_train_state",
    "data_sharding",
    "first_non_finite_leaf",
    "make_mesh",
    "make_train_step",
    "merge_model",
    "progress_bar",
    "read_metrics",
    "replicate",
    "replicated_sharding",
    "shard_batch",
    "to_python_scalars",
]
