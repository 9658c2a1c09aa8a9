"""Lower the Pallas kernels for a GPU on a host without one, and find them in the result.

    with ops.kernel_target("gpu", arch="sm_90"), use_abstract_mesh(abstract_gpu_mesh()):
        lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))

``lower_for_gpu(f, *args)`` does exactly that; ``triton_calls(lowered)`` lists the Triton kernels
in the StableHLO (name, Triton IR bytecode, ``num_warps``, ``num_stages``, and whether the call sits
inside a ``shard_map`` manual region), ``mosaic_calls(lowered)`` the Mosaic GPU ones (name, the
serialized Mosaic module, manual region). ``benchmarks/compile_kernels.py`` compiles the Triton IR
to machine code.
"""

from __future__ import annotations

import dataclasses
import re

import jax

from osdn_jax.kernels.config import kernel_target

DEVICE_KIND = {"sm_90": "NVIDIA H100 80GB HBM3", "sm_80": "NVIDIA A100-SXM4-80GB"}


def abstract_gpu_mesh(shape=(1,), names=("x",), axis_type=jax.sharding.AxisType.Auto, arch: str = "sm_90"):
    """An ``AbstractMesh`` of GPUs of generation ``arch`` (no device needed)."""
    dev = jax.sharding.AbstractDevice(device_kind=DEVICE_KIND[arch], num_cores=132, platform="cuda")
    return jax.sharding.AbstractMesh(tuple(shape), tuple(names), axis_types=(axis_type,) * len(names),
                                     abstract_device=dev)


def lower_for_gpu(fn, *args, arch: str = "sm_90", mesh=None, family: str | None = None):
    """``jax.jit(fn)`` lowered for CUDA with the real GPU kernels (``.as_text()``: StableHLO);
    ``family`` forces the kernel family (``kernel_target``)."""
    mesh = abstract_gpu_mesh(arch=arch) if mesh is None else mesh
    with jax.sharding.use_abstract_mesh(mesh), kernel_target("gpu", arch=arch, family=family):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@dataclasses.dataclass(frozen=True)
class TritonCall:
    """One kernel in a lowered module."""

    name: str
    ir: bytes  # Triton IR, MLIR bytecode written by jaxlib's Triton
    num_warps: int
    num_stages: int
    manual: bool  # inside a shard_map manual region
    grid: tuple[int, int, int] = (1, 1, 1)  # programs along x, y, z


@dataclasses.dataclass(frozen=True)
class MosaicCall:
    """One Mosaic GPU kernel in a lowered module."""

    name: str  # the kernel_name given to plgpu.kernel ("?" if not found in the module)
    module: bytes  # the serialized Mosaic GPU module (MLIR bytecode, stable_mosaic_gpu dialect)
    manual: bool  # inside a shard_map manual region


def _custom_calls(lowered, target_substring: str):
    """``(op, manual)`` for every custom call whose target name contains ``target_substring``."""
    found = []

    def walk(op, manual):
        for region in op.regions:
            for block in region:
                for inner in block.operations:
                    o = inner.operation
                    if o.name == "stablehlo.custom_call" and target_substring in str(o.attributes["call_target_name"]):
                        found.append((o, manual))
                    walk(o, manual or o.name == "sdy.manual_computation")

    walk(lowered.compiler_ir("stablehlo").operation, False)
    return found


def triton_calls(lowered) -> list[TritonCall]:
    """Every ``__gpu$xla.gpu.triton`` custom call of a lowered function, in program order."""
    calls = []
    for o, manual in _custom_calls(lowered, "triton"):
        config = o.attributes["mhlo.backend_config"]
        number = lambda key: int(str(config[key]).split(":")[0])  # noqa: E731  "4 : i32"
        grid = tuple(number(f"grid_{axis}") for axis in "xyz")
        calls.append(TritonCall(str(config["name"]).strip('"'), config["ir"].value_bytes, number("num_warps"),
                                number("num_stages"), manual, grid))
    return calls


def mosaic_calls(lowered) -> list[MosaicCall]:
    """Every ``mosaic_gpu`` custom call of a lowered function, in program order."""
    calls = []
    for o, manual in _custom_calls(lowered, "mosaic_gpu"):
        module = o.attributes["mhlo.backend_config"]["module"].value_bytes
        name = re.search(rb"osdn_mosaic_[a-z_]*[a-z]", module)  # the name, less the "_0" MLIR adds
        calls.append(MosaicCall(name.group().decode() if name else "?", module, manual))
    return calls
