"""Activations sharded like the batch. Under a mesh (``jax.set_mesh``) the model pins its hidden
states ``[B, T, ...]`` to rows over the batch axes and time over ``context``, the split the batch
itself and the delta-rule ops use (``osdn_jax.ops.context``). Left to itself, XLA's partitioner
may instead follow the parameters' ``embed`` sharding (fsdp) into the activations and all-reduce
whole-batch activations on every device: compiled for 8 H100s (deltanet-340m, 8 rows of 4096 tokens
per device), the training step then sent 412 GB per device through collectives, planned 12.1 GiB
instead of 6.2 and was predicted at 916 ms instead of 371 (``docs/performance.md``).

A no-op without a mesh, and under meshes with Explicit or Manual axes (inside ``jax.shard_map``),
whose users place their own arrays.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, PartitionSpec

from osdn_jax.ops.context import CONTEXT_AXIS


def constrain_rows(x: jax.Array) -> jax.Array:
    """``x [B, T, ...]`` with rows over every mesh axis but ``context`` whose size divides B (in mesh
    order, as the ops split rows) and time over ``context`` where it divides T."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t != AxisType.Auto for t in mesh.axis_types):
        return x
    batch, size = [], 1
    for name in mesh.axis_names:
        n = mesh.shape[name]
        if name != CONTEXT_AXIS and n > 1 and x.shape[0] % (size * n) == 0:
            batch.append(name)
            size *= n
    cp = mesh.shape.get(CONTEXT_AXIS, 1)
    time = CONTEXT_AXIS if cp > 1 and x.ndim > 1 and x.shape[1] % cp == 0 else None
    if not batch and time is None:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(tuple(batch) or None, time, *[None] * (x.ndim - 2)))


__all__ = ["constrain_rows"]
