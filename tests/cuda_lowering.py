"""Lower a function for CUDA on a CPU-only host, so GPU-only lowering breaks fail CI.

The Pallas kernels are traced as real GPU kernels through the front door
(``ops.kernel_target("gpu")``), under an abstract GPU mesh (one device unless given).
"""

import jax

from osdn_jax import ops

DEVICE_KIND = {"sm_90": "NVIDIA H100 80GB HBM3", "sm_80": "NVIDIA A100-SXM4-80GB"}


def abstract_mesh(shape=(1,), names=("x",), axis_type=jax.sharding.AxisType.Auto, arch="sm_90"):
    dev = jax.sharding.AbstractDevice(device_kind=DEVICE_KIND[arch], num_cores=132, platform="cuda")
    return jax.sharding.AbstractMesh(shape, names, axis_types=(axis_type,) * len(names), abstract_device=dev)


def lower_for_cuda(fn, *args, mesh=None, arch="sm_90"):
    """The lowered ``jax.jit(fn)`` for CUDA (``.as_text()`` for StableHLO text)."""
    mesh = abstract_mesh(arch=arch) if mesh is None else mesh
    with jax.sharding.use_abstract_mesh(mesh), ops.kernel_target("gpu", arch=arch):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def triton_calls(lowered) -> list[tuple[str, bool]]:
    """``(kernel name, inside a shard_map manual region)`` for every Triton custom call."""
    found = []

    def walk(op, manual):
        for region in op.regions:
            for block in region:
                for inner in block.operations:
                    o = inner.operation
                    if o.name == "stablehlo.custom_call" and "triton" in str(o.attributes["call_target_name"]):
                        found.append((str(o.attributes["mhlo.backend_config"]["name"]).strip('"'), manual))
                    walk(o, manual or o.name == "sdy.manual_computation")

    walk(lowered.compiler_ir("stablehlo").operation, False)
    return found
