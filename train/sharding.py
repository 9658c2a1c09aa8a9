"""Device mesh ``(data, fsdp, context)`` and the shardings of parameters, optimizer state and batches.

Parameters carry logical axis names (``osdn_jax.layers``); ``LOGICAL_RULES`` maps ``embed`` to the
``fsdp`` mesh axis (fully sharded parameters and optimizer state) and replicates the rest, over
``data`` and ``context`` too. A dimension that the axis does not divide stays replicated.

Batches ``[B, T]``: rows are split over ``data`` × ``fsdp``, the time axis of every row over
``context`` (context parallelism; ``context=1``: whole rows per device). ``context`` is the last
mesh axis, so a context group (the devices sharing rows) sits on consecutive devices, within one
process; the delta-rule ops find the ``context`` axis in the mesh set by ``jax.set_mesh``.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from osdn_jax.train.config import MeshConfig

LOGICAL_RULES = (("embed", "fsdp"), ("heads", None), ("mlp", None), ("vocab", None))
MESH_AXES = ("data", "fsdp", "context")
BATCH_AXES = ("data", "fsdp")  # rows
TIME_AXIS = "context"


def make_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    """The ``(data, fsdp, context)`` mesh over every device of every process (``AxisType.Auto``);
    ``data=-1`` takes the devices left: ``device_count // (fsdp · context)``."""
    n = jax.device_count()
    if n % (cfg.fsdp * cfg.context):
        raise ValueError(f"mesh.fsdp, mesh.context: expected fsdp · context to divide the device count {n}, "
                         f"got {cfg.fsdp} · {cfg.context}")
    data = n // (cfg.fsdp * cfg.context) if cfg.data == -1 else cfg.data
    if data * cfg.fsdp * cfg.context != n:
        raise ValueError(f"mesh.data, mesh.fsdp, mesh.context: expected data · fsdp · context = {n} devices, "
                         f"got {data} · {cfg.fsdp} · {cfg.context}")
    mesh = jax.make_mesh((data, cfg.fsdp, cfg.context), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    _check_context_groups(mesh)
    return mesh


def _check_context_groups(mesh) -> None:
    """Every context group (a line of the mesh along ``context``) on one process's devices: each
    process then holds whole rows (``global_batch``) and the halo exchange stays on the host."""
    processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
    if (processes != processes[..., :1]).any():
        raise ValueError(f"mesh.context: expected a context group within one process's "
                         f"{jax.local_device_count()} devices, got context={mesh.shape[TIME_AXIS]}")


def check_batch(batch_size: int, mesh) -> None:
    """``batch_size`` rows split evenly over ``data`` × ``fsdp`` (a ``ValueError`` naming the fields)."""
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % rows:
        raise ValueError(f"data.batch_size: expected a multiple of mesh.data · mesh.fsdp = {mesh.shape['data']} · "
                         f"{mesh.shape['fsdp']} = {rows} (rows are split over data × fsdp), got {batch_size}")


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
    """``[B, T]``: rows over ``data`` × ``fsdp``, the time axis over ``context``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, TIME_AXIS))


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's whole rows ``[B / process_count, T]`` → global ``jax.Array`` s ``[B, T]`` sharded
    like ``batch_sharding`` (a process holds whole rows: its context groups are local)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
