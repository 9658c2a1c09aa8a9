"""A roofline time for a compiled program on a chip: a lower bound, not a measurement.

For every kernel the program launches (``osdn_jax.perf.hlo``), the time is

    max( Σ over precision classes  FLOPs_class / peak_class ,   HBM bytes / HBM bandwidth )

(elementwise work at the chip's vector rate, where it has one), times the launches; collectives move
their bytes over the chip's link. The program's time is the sum over kernels, with communication
assumed hidden behind computation (``max`` of the two sums). What it leaves out, so that real time is
higher: launch latency and serial dependence (a token-by-token loop of small kernels is latency
bound; the launch count is reported beside the time), tiles that do not reach peak (no GEMM
autotuning without a device), cache misses that re-read operands, and imperfect overlap.

``seconds_with_launches`` adds the first of those: every launch takes at least the chip's
``launch_s`` (``osdn_jax.hardware.LAUNCH_SOURCE``), i.e. the sum over kernels of
``launches × max(roofline time of one launch, launch_s)``.
"""

from __future__ import annotations

import dataclasses

from osdn_jax.hardware import Chip
from osdn_jax.perf.hlo import Kernel, Program


@dataclasses.dataclass(frozen=True)
class KernelTime:
    kernel: Kernel
    compute_s: float  # per launch
    memory_s: float  # per launch
    fp32_s: float  # per launch: the part of compute_s spent in fp32 / HIGHEST products

    @property
    def seconds(self) -> float:
        """All launches of this kernel."""
        return max(self.compute_s, self.memory_s) * self.kernel.count

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclasses.dataclass
class Roofline:
    """The prediction for one program on one chip."""

    chip: Chip
    kernels: list[KernelTime]
    notes: list[str]

    @property
    def seconds(self) -> float:
        return max(sum(k.seconds for k in self.kernels if not k.kernel.comm_bytes), self.comm_seconds)

    @property
    def seconds_with_launches(self) -> float:
        """``seconds`` with every launch taking at least the chip's launch latency."""
        lat = self.chip.launch_s
        compute = sum(max(k.compute_s, k.memory_s, lat) * k.kernel.count for k in self.kernels
                      if not k.kernel.comm_bytes)
        return max(compute, self.comm_seconds)

    @property
    def comm_seconds(self) -> float:
        return sum(k.kernel.comm_bytes * k.kernel.count for k in self.kernels) / self.chip.link_bandwidth

    @property
    def flops(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for k in self.kernels:
            for cls, v in k.kernel.flops.items():
                total[cls] = total.get(cls, 0.0) + v * k.kernel.count
        return total

    @property
    def matmul_flops(self) -> float:
        return sum(v for cls, v in self.flops.items() if cls != "vector")

    @property
    def hbm_bytes(self) -> float:
        return sum(k.kernel.bytes * k.kernel.count for k in self.kernels)

    @property
    def launches(self) -> int:
        return sum(k.kernel.count for k in self.kernels)

    @property
    def dynamic_launches(self) -> int:
        """The part of ``launches`` inside loops whose trip count depends on the data (counted as
        one trip each; zero when such a loop does not run, more when it runs longer)."""
        return sum(k.kernel.count for k in self.kernels if k.kernel.dynamic)

    @property
    def fp32_share(self) -> float:
        """Share of the predicted time spent in fp32 / HIGHEST products (``fp32`` on GPUs, the
        6-pass ``bf16_6x`` on TPUs) by compute-bound kernels."""
        total = sum(k.seconds for k in self.kernels) or 1.0
        spent = sum(k.fp32_s * k.kernel.count for k in self.kernels if k.bound == "compute")
        return spent / total

    @property
    def fp32_product_seconds(self) -> float:
        """Time the fp32 / HIGHEST products alone would take at their peak, hidden behind memory
        traffic or not (what moving them to the inputs' tensor-core rate could save at most)."""
        return sum(k.fp32_s * k.kernel.count for k in self.kernels)

    def top(self, n: int = 10) -> list[KernelTime]:
        return sorted(self.kernels, key=lambda k: -k.seconds)[:n]

    def uncounted(self) -> list[str]:
        """Notes of kernels whose FLOPs are missing or approximate, once each."""
        return sorted({k.kernel.note for k in self.kernels if k.kernel.note})


FP32_CLASSES = ("fp32", "bf16_6x")


def kernel_time(kernel: Kernel, chip: Chip) -> KernelTime:
    compute = fp32 = 0.0
    for cls, flops in kernel.flops.items():
        if cls == "vector":
            seconds = flops / chip.vector if chip.vector else 0.0
        else:
            seconds = flops / chip.peak(cls)
        compute += seconds
        if cls in FP32_CLASSES:
            fp32 += seconds
    memory = 0.0 if kernel.comm_bytes else kernel.bytes / chip.hbm_bandwidth
    return KernelTime(kernel, compute, memory, fp32)


def roofline(program: Program, chip: Chip) -> Roofline:
    """The roofline of ``program`` (parsed for ``chip.platform``) on ``chip``."""
    if program.platform != chip.platform:
        raise ValueError(f"chip: the program was read for {program.platform!r}, got a {chip.platform} chip {chip.name}")
    return Roofline(chip, [kernel_time(k, chip) for k in program.kernels], list(program.notes))


def analyze(hlo_text: str, chip: Chip) -> Roofline:
    """Parse the optimized HLO of a compiled program (``compiled.as_text()``) and predict it on ``chip``."""
    from osdn_jax.perf.pallas import kernel_flops

    return roofline(Program(hlo_text, chip.platform, kernel_flops), chip)


def label(kernel: Kernel, width: int = 60) -> str:
    """A short name for a kernel: its kind and the tail of JAX's op name."""
    parts = [p for p in kernel.op_name.split("/") if p and not p.startswith("jit(")]
    tail = "/".join(parts[-2:]) if parts else kernel.name
    text = f"{kernel.kind}: {tail}"
    return text if len(text) <= width else text[: width - 1] + "…"


__all__ = ["FP32_CLASSES", "KernelTime", "Roofline", "analyze", "kernel_time", "label", "roofline"]
