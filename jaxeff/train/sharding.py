"""Device mesh, replicated state and data-parallel batches, from 1 CPU to many hosts.

Data parallelism in the big_vision style: a 1-D ``jax.sharding.Mesh`` over every device
of every process, the train state replicated on it, the batch split along its leading
axis. Each process loads only its own slice of the global batch (``global batch = local
batch × process count``) and :func:`shard_batch` assembles the global array without any
cross-host copy. The same code runs on one CPU, on 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and on many hosts after
:func:`jaxeff.train.distributed.initialize_distributed`.

Meshes come in two kinds: with *auto* axes (the default here) the compiler chooses how
intermediate values are laid out; with *explicit* axes (``axis_type="explicit"``, the
default of ``jax.make_mesh``) each array's sharding is part of its type. Both run the
same data-parallel step; per-example code without explicit-sharding rules (an embedding
lookup on batch-sharded ids) runs inside :func:`with_auto_axes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXIS_TYPES",
    "data_sharding",
    "local_rows",
    "make_mesh",
    "replicate",
    "replicated_sharding",
    "shard_batch",
    "with_auto_axes",
]

#: The mesh axis types :func:`make_mesh` accepts by name.
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def make_mesh(
    axis_name: str = "data",
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_type: str = "auto",
) -> Mesh:
    """A 1-D mesh over all devices (of all processes), for data parallelism.

    Args:
      axis_name: name of the single mesh axis the batch is split along.
      devices: the devices to use; default ``jax.devices()`` (every device of every
        process, ordered by process so each process's devices are contiguous).
      axis_type: ``"auto"`` (the compiler lays out intermediate values) or ``"explicit"``
        (shardings are part of the arrays' types, as with ``jax.make_mesh``'s default).

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(len(devices),)`` with axis ``axis_name``.

    Example::

      mesh = make_mesh()                          # Mesh('data': 8) on 8 fake CPU devices
      mesh = make_mesh(axis_type="explicit")      # the same devices, explicit axis
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"`axis_name` must be a non-empty string, got {axis_name!r}.")
    if axis_type not in AXIS_TYPES:
        raise ValueError(f"`axis_type` must be one of {sorted(AXIS_TYPES)}, got {axis_type!r}.")
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("`devices` must not be empty.")
    return Mesh(np.asarray(devices), (axis_name,), axis_types=(AXIS_TYPES[axis_type],))


def _check_mesh(mesh: Any) -> None:
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


def replicate(tree: chex.ArrayTree, mesh: Mesh) -> chex.ArrayTree:
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


def shard_batch(
    batch: chex.ArrayTree, mesh: Mesh, *, axis_name: str | None = None
) -> chex.ArrayTree:
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


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of an array sharded along axis 0, as numpy: undoes :func:`shard_batch`.

    ``shard_batch`` places process ``p``'s local batch on ``p``'s devices; this returns
    those rows of a result computed from it (e.g. embeddings ``(B, D)`` of a sharded
    batch), in the same order, without any cross-host copy.

    Args:
      x: a ``jax.Array`` whose leading axis is sharded over the mesh (other axes
        replicated).

    Returns:
      The rows held by this process's devices, in increasing row order.
    """
    if not isinstance(x, jax.Array) or x.ndim == 0:
        raise ValueError(f"`x` must be a jax.Array with a leading batch axis, got {x!r}.")
    parts: dict[int, jax.Shard] = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        parts.setdefault(start, shard)  # a block replicated on several devices counts once
    return np.concatenate([np.asarray(parts[start].data) for start in sorted(parts)])


def _batch_axes(tree: chex.ArrayTree) -> tuple[jax.sharding.AbstractMesh, Any] | None:
    """``(mesh, spec entry)`` of the first leaf sharded along its leading axis over explicit
    mesh axes, or ``None``."""
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "shape") or not leaf.shape:
            continue
        sharding = jax.typeof(leaf).sharding
        if sharding.spec and sharding.spec[0] is not None:
            return sharding.mesh, sharding.spec[0]
    return None


def with_auto_axes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a per-example function of batch-sharded arrays so it runs on explicit meshes.

    On a mesh with explicit axes, an op must know the sharding of its result, and some
    per-example code has no rule for it (``nnx.Embed``'s lookup of batch-sharded token
    ids is a type error). The wrapped function computes ``fn`` with those mesh axes as
    auto axes (``jax.sharding.auto_axes``: the compiler chooses, as on an auto mesh) and
    returns every output sharded along its leading axis like the batch. With no
    explicitly sharded input (auto meshes, one device) it is ``fn`` itself.

    Args:
      fn: a function of pytrees of arrays whose outputs all have the batch as leading
        axis (e.g. a model's forward pass on split parameters).

    Returns:
      The wrapped function, with ``fn``'s signature.

    Example::

      graphdef, params = nnx.split(model)
      forward = lambda params, x: nnx.merge(graphdef, params)(x)
      y = with_auto_axes(forward)(params, x)   # x sharded P("data") on an explicit mesh
    """

    def wrapped(*args: Any) -> Any:
        found = _batch_axes(args)
        if found is None:
            return fn(*args)
        mesh, axes = found
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.sharding.auto_axes(fn, out_sharding=PartitionSpec(axes))(*args)

    return wrapped
