"""FLOPs of a Pallas kernel call, counted from the kernel's own IR (which XLA's cost analysis cannot
see into).

- **Triton** (``__gpu$xla.gpu.triton`` custom calls): the Triton IR in the call's backend config
  holds every ``tt.dot`` with its operand tiles; a dot ``[m, k] @ [k, n]`` is ``2mkn`` FLOPs, times
  the trip counts of the ``scf.for`` loops around it, times the grid. fp32 operands are classed by
  the dot's ``inputPrecision``: TF32, 3xTF32 (three TF32 products) or IEEE (``fp32``).
- **Mosaic GPU** (``mosaic_gpu_v2`` custom calls): the serialized module issues tensor-core work as
  ``wgmma.mma_async`` instructions (inline PTX, ``m64nNkK``); each is ``2·64·N·K`` FLOPs, times the
  loop trip counts around it, times the grid. A warpgroup-specialized kernel branches on its
  warpgroup (``scf.index_switch`` / ``scf.if``): an instruction inside a branch is issued by one
  warpgroup (the heaviest branch counts), one outside every branch by each warpgroup of the block.

Loop bounds are evaluated from the constants they are computed from; a bound that depends on the
program's position in the grid (or on data) cannot be, and the call is then marked approximate
(the loop counted once).
"""

from __future__ import annotations

import functools
import re

from osdn_jax.perf.hlo import Instruction

_PREFIX = "stable_mosaic_gpu."
_ARITH = {
    "arith.addi": lambda a, b: a + b, "arith.subi": lambda a, b: a - b, "arith.muli": lambda a, b: a * b,
    "arith.divsi": lambda a, b: int(a / b), "arith.divui": lambda a, b: a // b, "arith.floordivsi": lambda a, b: a // b,
    "arith.ceildivsi": lambda a, b: -(-a // b), "arith.ceildivui": lambda a, b: -(-a // b),
    "arith.remsi": lambda a, b: a % b, "arith.remui": lambda a, b: a % b, "arith.maxsi": max, "arith.minsi": min,
    "arith.maxui": max, "arith.minui": min,
}
_CASTS = {"arith.index_cast", "arith.index_castui", "arith.extsi", "arith.extui", "arith.trunci"}
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)\.\w+\.(\w+)\.")


def decode_attribute(attrs: str, key: str) -> bytes | None:
    """The bytes of the string attribute ``key = "..."`` in a custom call's printed backend config
    (MLIR prints a backslash as two, and quotes and bytes outside printable ASCII as ``\\XX`` hex)."""
    m = re.search(r"\b" + re.escape(key) + r' = "', attrs)
    if not m:
        return None
    end = attrs.index('"', m.end())
    raw = attrs[m.end():end]
    unescape = lambda e: "\\" if e.group(1) == "\\" else chr(int(e.group(1), 16))  # noqa: E731
    return re.sub(r"\\(\\|[0-9A-Fa-f]{2})", unescape, raw).encode("latin-1")


def _name(op) -> str:
    return op.name.removeprefix(_PREFIX)


def _int_value(value) -> int | None:
    """The integer an SSA value always holds, where it folds from constants; else None."""
    owner = value.owner
    if not hasattr(owner, "name"):  # a block argument (a loop index, a kernel argument)
        return None
    name = _name(owner)
    if name in ("arith.constant", "llvm.mlir.constant"):
        m = re.match(r"\s*(-?\d+)", str(owner.attributes["value"]))
        return int(m.group(1)) if m else None
    if name in _CASTS:
        return _int_value(owner.operands[0])
    if name in _ARITH:
        a, b = (_int_value(o) for o in owner.operands[:2])
        return None if a is None or b is None or (b == 0 and "div" in name) else _ARITH[name](a, b)
    return None


class _Counter:
    def __init__(self, dot_flops):
        self.dot_flops = dot_flops  # op -> (class, flops) or None
        self.approximate = False

    def trips(self, op) -> int:
        lb, ub, step = (_int_value(v) for v in list(op.operands)[:3])
        if None in (lb, ub, step) or step <= 0:
            self.approximate = True
            return 1
        return max(0, -(-(ub - lb) // step))

    def region_flops(self, region) -> dict[str, float]:
        total: dict[str, float] = {}
        for block in region:
            for inner in block.operations:
                _add(total, self.op_flops(inner.operation))
        return total

    def op_flops(self, op) -> dict[str, float]:
        name = _name(op)
        found = self.dot_flops(op)
        if found is not None:
            return {found[0]: found[1]}
        regions = [self.region_flops(r) for r in op.regions]
        if not regions:
            return {}
        if name in ("scf.if", "scf.index_switch"):  # alternatives, or one warpgroup's role
            return max(regions, key=lambda f: sum(f.values()))
        total: dict[str, float] = {}
        for r in regions:
            _add(total, r)
        if name == "scf.for":
            return {k: v * self.trips(op) for k, v in total.items()}
        return total


def _add(into: dict[str, float], more: dict[str, float], scale: float = 1.0) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + v * scale


def _triton_dot(op):
    if op.name != "tt.dot":
        return None
    a, out = op.operands[0].type, op.results[0].type
    m_k = re.search(r"tensor<(\d+)x(\d+)x(\w+)>", str(a))
    m_n = re.search(r"tensor<(\d+)x(\d+)x", str(out))
    if not (m_k and m_n):
        return None
    M, K, dtype = int(m_k.group(1)), int(m_k.group(2)), m_k.group(3)
    flops = 2.0 * M * K * int(m_n.group(2))
    if dtype in ("bf16", "f16") or dtype.startswith("f8"):
        return "bf16", flops
    attr = str(op.attributes["inputPrecision"]) if "inputPrecision" in op.attributes else "0"
    mode = int(re.match(r"\s*(\d+)", attr).group(1))  # Triton's InputPrecision: 0 TF32, 1 TF32x3, 2 IEEE
    return ("fp32", flops) if mode == 2 else ("tf32", flops * (3 if mode == 1 else 1))


def _wgmma(op):
    if _name(op) != "llvm.inline_asm":
        return None
    m = _WGMMA.search(str(op.attributes["asm_string"]))
    if not m:
        return None
    dtype = m.group(4)
    cls = "tf32" if dtype == "tf32" else "bf16"
    return cls, 2.0 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))


@functools.cache
def _context(kind: str):
    from jax._src.interpreters import mlir as jax_mlir

    ctx = jax_mlir.make_ir_context()
    if kind == "triton":
        from jax._src.lib.triton import dialect

        dialect.register_dialect(ctx)
    else:
        from jax._src.lib import mosaic_gpu_dialect

        mosaic_gpu_dialect.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True
    return ctx


@functools.lru_cache(maxsize=64)
def triton_flops(ir: bytes, grid: int) -> tuple[dict[str, float], bool]:
    """``(FLOPs by class, approximate)`` of one launch of a Triton kernel over ``grid`` programs."""
    from jax._src.lib import mlir

    counter = _Counter(_triton_dot)
    with _context("triton"):
        module = mlir.ir.Module.parse(ir)
        per_program = counter.op_flops(module.operation)
    return {k: v * grid for k, v in per_program.items()}, counter.approximate


@functools.lru_cache(maxsize=64)
def mosaic_flops(module_bytes: bytes) -> tuple[dict[str, float], bool]:
    """``(FLOPs by class, approximate)`` of one launch of a serialized Mosaic GPU module."""
    from jax._src.lib import mlir

    counter = _Counter(_wgmma)
    total: dict[str, float] = {}
    with _context("mosaic"):
        module = mlir.ir.Module.parse(module_bytes)
        for launch in _launches(module.operation):
            dims = [_int_value(v) for v in _launch_dims(launch)]  # grid x y z, block x y z
            if None in dims:
                counter.approximate = True
                dims = [d or 1 for d in dims]
            grid, warpgroups = dims[0] * dims[1] * dims[2], max(1, dims[3] * dims[4] * dims[5] // 128)
            for region in launch.regions:
                for block in region:
                    for inner in block.operations:
                        op = inner.operation  # a branch runs on one warpgroup, the rest on each
                        scale = 1 if _name(op) in ("scf.if", "scf.index_switch") else warpgroups
                        _add(total, counter.op_flops(op), grid * scale)
    return total, counter.approximate


def _launch_dims(launch) -> list:
    """The grid and block sizes among a ``gpu.launch``'s operands (after its async dependencies)."""
    segments = re.findall(r"-?\d+", str(launch.attributes["operandSegmentSizes"]).split(":", 1)[-1])
    first = int(segments[0]) if segments else 1
    return list(launch.operands)[first:first + 6]


def _launches(op):
    if _name(op) == "gpu.launch":
        yield op
        return
    for region in op.regions:
        for block in region:
            for inner in block.operations:
                yield from _launches(inner.operation)


def kernel_flops(inst: Instruction) -> tuple[dict[str, float], str]:
    """``(FLOPs by class, note)`` of a Pallas custom call in optimized HLO; the note says where the
    count is incomplete."""
    target = inst.attr("custom_call_target") or ""
    label = inst.op_name.split("/")[-2] if "/" in inst.op_name else inst.name
    try:
        if "triton" in target:
            ir = decode_attribute(inst.attrs, "ir")
            grid = 1
            for axis in "xyz":
                m = re.search(rf"grid_{axis} = (\d+)", inst.attrs)
                grid *= int(m.group(1)) if m else 1
            flops, approximate = triton_flops(ir, grid)
        else:
            flops, approximate = mosaic_flops(decode_attribute(inst.attrs, "module"))
        flops = dict(flops)  # the cached result stays as it was
    except Exception as e:  # an IR this jaxlib cannot read: bytes are still counted
        return {}, f"{label}: FLOPs not counted ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return flops, (f"{label}: a loop bound is not a constant, its body counted once" if approximate else "")


__all__ = ["decode_attribute", "kernel_flops", "mosaic_flops", "triton_flops"]
