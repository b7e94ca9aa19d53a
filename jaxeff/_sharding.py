"""Arrays sharded over explicit mesh axes, gathered where a computation needs all rows.

``jax.make_mesh`` makes meshes with explicit axis types by default: an array's sharding
is then part of its type, and an op whose result would map one mesh axis to two
dimensions (the ``B × B`` similarity matrix of two batch-sharded inputs) is a type error.
Functions that compare every example with every other gather one side first; on meshes
with auto axes, or without a mesh, the compiler chooses and nothing changes.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def gather_explicit(x: jax.Array) -> jax.Array:
    """``x`` replicated on every device if its type is sharded over an explicit axis."""
    sharding = jax.typeof(x).sharding
    if any(axis is not None for axis in sharding.spec):
        return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))
    return x
