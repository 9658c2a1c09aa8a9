"""Device mesh ``(data, fsdp)`` and the shardings of parameters, optimizer state and batches.

Parameters carry logical axis names (``osdn_jax.layers``); ``LOGICAL_RULES`` maps ``embed`` to the
``fsdp`` mesh axis (fully sharded parameters and optimizer state) and replicates the rest. A
dimension that the axis does not divide stays replicated. Batch rows are split over both axes.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from osdn_jax.train.config import MeshConfig

LOGICAL_RULES = (("embed", "fsdp"), ("heads", None), ("mlp", None), ("vocab", None))
BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    """The ``(data, fsdp)`` mesh over every device of every process (explicit ``AxisType.Auto``)."""
    n = jax.device_count()
    if n % cfg.fsdp:
        raise ValueError(f"mesh.fsdp: expected a divisor of the device count {n}, got {cfg.fsdp}")
    data = n // cfg.fsdp if cfg.data == -1 else cfg.data
    if data * cfg.fsdp != n:
        raise ValueError(f"mesh.data, mesh.fsdp: expected data · fsdp = {n} devices, got {data} · {cfg.fsdp}")
    return jax.make_mesh((data, cfg.fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh) -> PartitionSpec:
    """``spec`` with every axis that does not divide its dimension dropped (replicated)."""
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axis if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*out)


def param_shardings(abstract_params: nnx.State, mesh) -> dict:
    """A pure dict of ``NamedSharding`` like the parameters, from their logical axis names."""
    with nnx.logical_axis_rules(LOGICAL_RULES):
        specs = nnx.get_partition_spec(abstract_params)
    shapes = nnx.to_pure_dict(jax.tree.map(lambda x: x.shape, abstract_params,
                                           is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
    specs = nnx.to_pure_dict(specs)
    return jax.tree.map(lambda spec, shape: NamedSharding(mesh, _fit(spec, shape, mesh)), specs, shapes,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh) -> NamedSharding:
    """Rows ``[B, T]`` split over every device (``data`` × ``fsdp``)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's rows → global ``jax.Array`` s sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
