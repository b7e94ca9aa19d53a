"""Multi-process runs: join the cluster, let process 0 decide, prepare shared files in turn.

A JAX program on many hosts runs one process per host (or per group of accelerators);
:func:`initialize_distributed` joins them into one cluster with
``jax.distributed.initialize``, after which ``jax.devices()`` lists every device of every
process and one jitted step spans them all. On one process it does nothing.

Everything else here keeps the processes in agreement without any of them reading a file
that another one wrote:

* :func:`broadcast_from_process_zero` -- a value computed on process 0 only (a decision
  that reads the workdir, the vocabulary) is sent to every process; an exception there
  stops every process instead of leaving them waiting;
* :func:`run_in_turn` -- a preparation step (building a dataset in a directory that may be
  shared) runs on process 0 first, then on one process per other machine, then on the
  rest, so no two processes write the same directory at once;
* :func:`gather_rows` -- rows computed by each process for its slice of every global
  batch (an evaluation split over processes), reassembled in order on every process.

Every function is a collective: all processes must call it, in the same order.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from numpy.typing import ArrayLike

__all__ = [
    "COORDINATOR_ADDRESS_ENV",
    "NUM_PROCESSES_ENV",
    "PROCESS_ID_ENV",
    "broadcast_from_process_zero",
    "check_global_batch",
    "detected_cluster",
    "gather_rows",
    "initialize_distributed",
    "run_in_turn",
]

_log = logging.getLogger(__name__)

#: Environment variables read when the arguments are not given; ``experiments.launch.local``
#: sets them for each process it starts.
COORDINATOR_ADDRESS_ENV = "JAXEFF_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAXEFF_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXEFF_PROCESS_ID"


def _cluster_environment() -> Any:
    try:
        from jax._src.clusters import ClusterEnv

        environments = list(ClusterEnv._cluster_types)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the JAX version
        _log.warning("JAX's cluster detection is unavailable; pass the cluster explicitly.")
        return None
    for env in environments:
        if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
            return env
    return None


def detected_cluster() -> str | None:
    """The cluster JAX can configure itself from (Cloud TPU, SLURM, Open MPI, ...), or ``None``.

    Asks ``jax.distributed``'s own environment detection, the one
    ``jax.distributed.initialize()`` without arguments uses: Cloud TPU VM pod slices (GCE
    and GKE), SLURM jobs (``srun``), Open MPI (``mpirun``) and Kubernetes indexed jobs.
    That detection is not public API; should it move, this returns ``None`` and a run
    needs the explicit arguments of :func:`initialize_distributed`.
    """
    env = _cluster_environment()
    return None if env is None else env.__name__


def _from_env(value: Any, name: str, convert: Callable[[str], Any]) -> Any:
    if value is not None:
        return value
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return convert(text)
    except ValueError:
        raise ValueError(f"Environment variable {name}={text!r} is not valid.") from None


def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Joins this process to its multi-process cluster; does nothing on a single process.

    Where the cluster comes from, the first that applies:

    1. the arguments (the experiments' ``--coordinator_address``, ``--num_processes`` and
       ``--process_id`` flags): all three, or, in a detected cluster, those to override;
    2. the environment variables :data:`COORDINATOR_ADDRESS_ENV`,
       :data:`NUM_PROCESSES_ENV` and :data:`PROCESS_ID_ENV` (set by
       ``python -m experiments.launch.local``);
    3. a cluster that JAX detects by itself (:func:`detected_cluster`): a Cloud TPU pod
       slice, a SLURM or Open MPI job, where ``jax.distributed.initialize()`` needs no
       arguments (unless it holds a single process: a one-task job, a one-host TPU VM);
    4. none: a single process, and nothing is done.

    ``num_processes=1`` always means a single process. On a cluster, the CPU backend's
    collectives go through gloo (``jax_cpu_collectives_implementation``, unless another
    implementation was chosen), so that a CPU-only cluster computes across processes.

    Call it first thing, before anything touches a JAX backend (``jax.devices()``,
    creating an array).

    Args:
      coordinator_address: ``host:port`` of process 0, which every process can reach.
      num_processes: the number of processes of the cluster.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      local_device_ids: optional devices of this host that this process drives (one
        process per GPU); default all of them.
      initialization_timeout: seconds to wait for every process to join.

    Returns:
      Whether this process is part of a multi-process cluster.

    Raises:
      ValueError: naming the missing value when only some of the three are given and no
        cluster is detected, or when ``process_id`` is out of range.

    Example::

      initialize_distributed()          # on a TPU pod slice, under srun, or via the launcher
      initialize_distributed(coordinator_address="10.0.0.2:8476", num_processes=2,
                             process_id=1)
    """
    coordinator_address = _from_env(coordinator_address, COORDINATOR_ADDRESS_ENV, str)
    num_processes = _from_env(num_processes, NUM_PROCESSES_ENV, int)
    process_id = _from_env(process_id, PROCESS_ID_ENV, int)
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"`num_processes` must be positive, got {num_processes}.")
    if num_processes == 1:
        return False
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    environment = _cluster_environment()
    cluster = None if environment is None else environment.__name__
    if environment is not None and num_processes is None:
        try:
            num_processes = environment.get_process_count()
        except Exception:  # let jax.distributed.initialize report what is missing
            num_processes = None
        if num_processes == 1:  # e.g. a single-task SLURM job, a single-host TPU VM
            return False
    if cluster is None:
        given = [k for k, v in explicit.items() if v is not None]
        if not given:
            return False
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(
                f"No cluster environment detected and only {', '.join(given)} given: also "
                f"pass {', '.join(missing)} (flags --{' --'.join(missing)}, or the "
                f"{COORDINATOR_ADDRESS_ENV}/{NUM_PROCESSES_ENV}/{PROCESS_ID_ENV} variables)."
            )
        assert process_id is not None and num_processes is not None  # none is missing
        if not 0 <= process_id < num_processes:
            raise ValueError(f"`process_id` must be in [0, {num_processes}), got {process_id}.")
    # jax's config options are attributes it adds at run time (so: ignore[attr-defined]).
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):  # type: ignore[attr-defined]
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    _log.info(
        "Process %d of %d joined the cluster (%s).",
        jax.process_index(),
        jax.process_count(),
        cluster or "explicit",
    )
    return jax.process_count() > 1


def _all_succeeded(error: BaseException | None, what: str) -> None:
    """Agrees on whether ``what`` succeeded everywhere (a barrier); raises if not.

    The process that failed re-raises its own error; the others raise ``RuntimeError``
    naming the processes that failed, instead of waiting for them forever.
    """
    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    failed = np.flatnonzero(failed.reshape(-1))
    if error is not None:
        raise error
    if failed.size:
        raise RuntimeError(
            f"{what} failed on process(es) {failed.tolist()}; see their error output."
        )


def check_global_batch(batch_size: int, *, name: str = "config.batch_size") -> None:
    """Raises ``ValueError`` naming ``name`` when a multi-process run's global batch does
    not split evenly over all devices of all processes.

    Checked once before training, so a pod job fails at start-up rather than at its first
    batch (:func:`jaxeff.train.shard_batch` checks every batch). One process places its
    batch as it likes, so the check applies only with several.
    """
    if jax.process_count() > 1 and batch_size % jax.device_count():
        raise ValueError(
            f"{name} ({batch_size}) must be divisible by the {jax.device_count()} devices "
            "of a multi-process run."
        )


def broadcast_from_process_zero(fn: Callable[[], Any]) -> Any:
    """``fn()`` computed on process 0 only and received by every process.

    For decisions that read files only process 0 may read (``config.json``, the saved
    vocabulary) or that should be computed once. The value travels as JSON, so every
    process, process 0 included, gets the same plain object back (tuples become lists).

    Args:
      fn: a function of no arguments returning a JSON-serialisable value. Called on
        process 0 only.

    Returns:
      ``json.loads(json.dumps(fn()))`` on every process.

    Raises:
      Whatever ``fn`` raised, on process 0; ``RuntimeError`` with its message on the
      others.

    Example::

      tokens = broadcast_from_process_zero(lambda: Vocabulary.load(path).tokens)
    """
    if jax.process_count() == 1:
        return json.loads(json.dumps(fn()))
    error, data = None, b""
    if jax.process_index() == 0:
        try:
            payload = {"value": fn()}
            data = json.dumps(payload).encode("utf-8")
        except Exception as e:  # every process must reach the broadcast below
            error = e
            data = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode("utf-8")
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buffer = np.frombuffer(data, np.uint8) if data else np.zeros((size,), np.uint8)
    received = json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))))
    if error is not None:
        raise error
    if "error" in received:
        raise RuntimeError(f"Process 0 failed: {received['error']}")
    return received["value"]


def run_in_turn(fn: Callable[[], Any], *, what: str = "preparation") -> Any:
    """Runs ``fn`` on every process, process 0 first, so a shared directory is written once.

    Three turns with a barrier after each: process 0; then the first process of every
    other machine (by host name); then all the others. A directory that every process
    sees (NFS, one machine) is thus prepared by process 0 alone and only opened by the
    rest; on machines with their own disks, one process per machine prepares its copy
    (in parallel with the other machines) before the other processes of that machine
    open it. ``fn`` must reuse what is already prepared, as tfds ``download_and_prepare``
    does.

    Args:
      fn: the preparation; called once on each process.
      what: its name in the error raised when it fails somewhere.

    Returns:
      ``fn()`` of this process.

    Raises:
      Whatever ``fn`` raised, on the process where it failed; ``RuntimeError`` on the
      others, at the end of that turn.
    """
    if jax.process_count() == 1:
        return fn()
    host = np.uint32(zlib.crc32(socket.gethostname().encode("utf-8")))
    hosts = np.asarray(multihost_utils.process_allgather(host)).reshape(-1).tolist()
    me = jax.process_index()
    my_turn = 0 if me == 0 else (1 if hosts.index(hosts[me]) == me else 2)
    result = None
    for turn in range(3):
        error = None
        if turn == my_turn:
            try:
                result = fn()
            except Exception as e:
                error = e
        _all_succeeded(error, what)
    return result


def gather_rows(
    local_rows: ArrayLike, local_mask: ArrayLike, *, num_batches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reassembles on every process the rows each process computed for its batch slices.

    An evaluation split over ``P`` processes cuts its rows into ``num_batches`` global
    batches of ``P·s`` rows; process ``p`` computes the ``s`` rows ``[t·P·s + p·s,
    t·P·s + (p+1)·s)`` of batch ``t`` (padded at the end of the data and flagged false in
    its mask), so it holds ``num_batches·s`` rows. Every process then receives all of them
    (``process_allgather``), put back in global order with the padding removed.

    Args:
      local_rows: ``(num_batches·s, ...)`` array, this process's rows in batch order.
      local_mask: ``(num_batches·s,)`` bool, false on padding rows.
      num_batches: the number of global batches.

    Returns:
      ``(rows, counts)``: the real rows of every process in global order, and the number
      of real rows each process computed, ``(P,)``.
    """
    local_rows, local_mask = np.asarray(local_rows), np.asarray(local_mask, bool)
    if local_mask.shape != local_rows.shape[:1] or local_rows.shape[0] % num_batches:
        raise ValueError(
            f"`local_rows` {local_rows.shape} and `local_mask` {local_mask.shape} must have "
            f"the same number of rows, a multiple of num_batches={num_batches}."
        )
    rows, mask = multihost_utils.process_allgather((local_rows, local_mask))
    rows, mask = np.asarray(rows), np.asarray(mask)  # (P, T·s, ...), (P, T·s)
    processes = mask.shape[0]
    order = lambda x: np.swapaxes(x.reshape(processes, num_batches, -1, *x.shape[2:]), 0, 1)
    rows = order(rows).reshape(-1, *rows.shape[2:])
    keep = order(mask).reshape(-1)
    return rows[keep], mask.sum(axis=1)
