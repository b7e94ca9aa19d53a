"""Device mesh, replicated state and data-parallel batches, from 1 CPU to many hosts.

Data parallelism in the big_vision style: a 1-D ``jax.sharding.Mesh`` over every device
of every process, the train state replicated on it, the batch split along its leading
axis. Each process loads only its own slice of the global batch (``global batch = local
batch × process count``) and :func:`shard_batch` assembles the global array without any
cross-host copy. The same code runs on one CPU, on 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and after
``jax.distributed.initialize`` on many hosts.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "data_sharding",
    "make_mesh",
    "replicate",
    "replicated_sharding",
    "shard_batch",
]


def make_mesh(axis_name: str = "data", *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all devices (of all processes), for data parallelism.

    Args:
      axis_name: name of the single mesh axis the batch is split along.
      devices: the devices to use; default ``jax.devices()`` (every device of every
        process, ordered by process so each process's devices are contiguous).

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(len(devices),)`` with axis ``axis_name``.

    Example::

      mesh = make_mesh()            # Mesh('data': 8) on 8 fake CPU devices
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"`axis_name` must be a non-empty string, got {axis_name!r}.")
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("`devices` must not be empty.")
    return Mesh(np.asarray(devices), (axis_name,))


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy of an array on every device of ``mesh``."""
    _check_mesh(mesh)
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh, axis_name: str | None = None) -> NamedSharding:
    """The sharding that splits an array's leading (batch) axis over ``axis_name``.

    Args:
      mesh: the device mesh.
      axis_name: the mesh axis to split over; default the mesh's first axis.
    """
    _check_mesh(mesh)
    axis_name = mesh.axis_names[0] if axis_name is None else axis_name
    if axis_name not in mesh.axis_names:
        raise ValueError(f"`axis_name` {axis_name!r} is not an axis of the mesh {mesh.axis_names}.")
    return NamedSharding(mesh, PartitionSpec(axis_name))


def replicate(tree, mesh: Mesh):
    """Places every array of ``tree`` fully replicated on ``mesh``.

    Every process must pass the same values (e.g. a state created from the same seed, or
    one restored from a checkpoint).

    Args:
      tree: a pytree of arrays (e.g. a ``TrainState``).
      mesh: the device mesh.

    Returns:
      The same pytree with each leaf a ``jax.Array`` replicated on all devices of ``mesh``.

    Example::

      state = replicate(state, mesh)
    """
    return jax.device_put(tree, replicated_sharding(mesh))


def shard_batch(batch, mesh: Mesh, *, axis_name: str | None = None):
    """Assembles a global batch sharded along axis 0 from each process's local batch.

    Uses ``jax.make_array_from_process_local_data``: on one host the local batch is the
    global batch; on ``P`` hosts each passes its own ``b`` examples and the result has
    ``P·b`` rows, split evenly over the devices of ``axis_name``.

    Args:
      batch: a pytree (usually a dict) of host-local numpy arrays with the same leading
        (batch) dimension.
      mesh: the device mesh.
      axis_name: the mesh axis the batch is split over; default the mesh's first axis.

    Returns:
      The pytree of global ``jax.Array`` s sharded as :func:`data_sharding`.

    Raises:
      ValueError: if a leaf is a scalar, or if the global batch size is not divisible by
        the number of devices along ``axis_name``.

    Example::

      batch = shard_batch({"x": np.zeros((64, 3)), "y": np.zeros((64,))}, mesh)
    """
    sharding = data_sharding(mesh, axis_name)
    axis_name = sharding.spec[0]
    num_shards = mesh.shape[axis_name]
    num_processes = len({d.process_index for d in mesh.devices.flat})

    def place(path, x):
        name = "batch" + jax.tree_util.keystr(path)
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"shard_batch: `{name}` is a scalar; every leaf needs a batch axis.")
        global_size = x.shape[0] * num_processes
        if global_size % num_shards:
            raise ValueError(
                f"shard_batch: `{name}` has local batch size {x.shape[0]} (global "
                f"{global_size} over {num_processes} process(es)), not divisible by the "
                f"{num_shards} devices of mesh axis {axis_name!r}."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(place, batch)
