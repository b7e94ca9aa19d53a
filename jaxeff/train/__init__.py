"""Training skeleton shared by the experiments: small functions, no framework.

An experiment's ``train_and_evaluate`` reads top to bottom (big_vision style) and calls:

* :func:`make_mesh`, :func:`replicate`, :func:`shard_batch` -- data parallelism on one
  CPU, 8 fake devices or many hosts;
* :func:`create_train_state`, :func:`make_train_step`, :func:`check_finite`,
  :func:`merge_model` -- the jit-compiled update step of an nnx model;
* :class:`Checkpointer` -- latest and best checkpoints with orbax, plus a JSON extra dict;
* :class:`MetricWriter`, :func:`read_metrics`, :func:`progress_bar` -- JSON-lines and
  TensorBoard logging;
* :func:`load_config`, :func:`parse_config_overrides`, :func:`config_to_json` --
  ml_collections configs.
"""

from jaxeff.train.checkpoint import Checkpointer, abstract_like
from jaxeff.train.config import config_to_json, load_config, parse_config_overrides
from jaxeff.train.metrics import MetricWriter, progress_bar, read_metrics, to_python_scalars
from jaxeff.train.sharding import (
    data_sharding,
    make_mesh,
    replicate,
    replicated_sharding,
    shard_batch,
)
from jaxeff.train.step import (
    RESERVED_METRICS,
    TrainState,
    check_finite,
    create_train_state,
    make_train_step,
    merge_model,
)

__all__ = [
    "RESERVED_METRICS",
    "Checkpointer",
    "MetricWriter",
    "TrainState",
    "abstract_like",
    "check_finite",
    "config_to_json",
    "create_train_state",
    "data_sharding",
    "load_config",
    "make_mesh",
    "make_train_step",
    "merge_model",
    "parse_config_overrides",
    "progress_bar",
    "read_metrics",
    "replicate",
    "replicated_sharding",
    "shard_batch",
    "to_python_scalars",
]
