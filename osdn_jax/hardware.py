"""What one accelerator chip can do: peak FLOP/s per product precision, HBM size and bandwidth, and
the link bandwidth collectives use. One table (``CHIPS``), read by MFU (``osdn_jax.flops``), by the
roofline of compiled programs (``osdn_jax.perf``) and by ``benchmarks/aot.py``.

Peaks are the vendors' nominal dense figures (no sparsity), per chip:

- NVIDIA (datasheets of the H100 / H200 Tensor Core GPU and the A100 Tensor Core GPU; dense = half
  the "with sparsity" figure): ``bf16`` = BF16/FP16 tensor cores, ``tf32`` = TF32 tensor cores (XLA's
  default for fp32 products on these GPUs), ``fp32`` = plain FP32 on the CUDA cores (what
  ``Precision.HIGHEST`` runs at). ``link`` = NVLink bandwidth per direction (H100 / H200 SXM: 900 GB/s
  total, A100: 600 GB/s).
- Google TPU (Cloud TPU documentation, "TPU v5e" and "TPU v6e" pages): ``bf16`` = the MXU peak.
  fp32 products are emulated with bf16 passes: ``bf16_3x`` (``Precision.HIGH``) runs at a third of
  the bf16 rate, ``bf16_6x`` (``Precision.HIGHEST``) at a sixth; ``DEFAULT`` fp32 products take one
  bf16 pass. ``link`` = inter-chip interconnect bandwidth per chip (v5e: 1,600 Gbit/s; v6e: 3,584
  Gbit/s).

``hbm_bytes`` is what the device reports as its memory (GPUs: the CUDA driver's total, as XLA's GPU
target descriptions record it; TPUs: the nominal 16 / 32 GiB). ``gpu`` holds the facts XLA needs to
compile for a GPU that is not there (``benchmarks/aot.py`` writes them as a ``GpuTargetConfigProto``).
"""

from __future__ import annotations

import dataclasses

# Product precision classes: the key into Chip.peaks that a dot of that kind runs at.
GPU_CLASSES = ("bf16", "tf32", "fp32")
TPU_CLASSES = ("bf16", "bf16_3x", "bf16_6x")


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    """What XLA's GPU compiler reads about the device (the fields of its target description)."""

    compute_capability: tuple[int, int]
    core_count: int  # streaming multiprocessors
    fpus_per_core: int
    clock_rate_ghz: float
    l2_cache_size: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip. ``peaks``: FLOP/s per product precision class (``GPU_CLASSES`` or
    ``TPU_CLASSES``); ``vector``: FLOP/s of elementwise fp32 work (GPU CUDA cores; None where the
    vendor publishes none, then elementwise work is charged by its bytes only)."""

    name: str  # the --target name
    title: str
    device_kind: str  # what jax.Device.device_kind says on this chip
    platform: str  # "gpu" or "tpu"
    kinds: tuple[str, ...]  # substrings of jax.Device.device_kind that mean this chip (lower case)
    peaks: dict[str, float]
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s per chip, one direction
    vector: float | None
    source: str
    gpu: GpuFacts | None = None
    topology: str | None = None  # TPU: the smallest slice get_topology_desc accepts ("v5e:2x2")
    launch_s: float = 0.0  # least time one kernel launch takes (LAUNCH_SOURCE); 0: not modelled


    def peak(self, precision_class: str) -> float:
        return self.peaks[precision_class]

    @property
    def dense_bf16(self) -> float:
        return self.peaks["bf16"]


def _gpu(bf16, tf32, fp32):
    return {"bf16": bf16 * 1e12, "tf32": tf32 * 1e12, "fp32": fp32 * 1e12}


# A GPU kernel launched from the host (XLA without CUDA graphs) costs a few microseconds however
# little it does: our calibration row (jax-linear-attention's Mosaic GDN forward+backward, 31 kernels,
# published 0.121 ms against a 0.056 ms roofline: 2.1 µs a launch) and CUDA.jl's documentation (80
# small kernels: 260 µs launched one by one, ~3.3 µs each; 70 µs as one CUDA graph). A TPU runs the
# whole program on the chip with no host launch per fusion; no public per-fusion figure, so none.
GPU_LAUNCH_S = 2e-6
LAUNCH_SOURCE = ("GPU: 2 µs a kernel launch (this tool's calibration against jax-linear-attention's published "
                 "H100 time, 2.1 µs; CUDA.jl docs, ~3.3 µs without CUDA graphs); TPU: not modelled")


def _tpu(bf16):
    return {"bf16": bf16 * 1e12, "bf16_3x": bf16 * 1e12 / 3, "bf16_6x": bf16 * 1e12 / 6}


_NVIDIA_H = "NVIDIA H100 / H200 Tensor Core GPU datasheets (dense)"
_NVIDIA_A = "NVIDIA A100 Tensor Core GPU datasheet (dense)"
_HOPPER = GpuFacts((9, 0), core_count=132, fpus_per_core=128, clock_rate_ghz=1.98, l2_cache_size=50 * 2**20,
                   shared_memory_per_core=228 * 1024, shared_memory_per_block_optin=227 * 1024)
_AMPERE = GpuFacts((8, 0), core_count=108, fpus_per_core=64, clock_rate_ghz=1.41, l2_cache_size=40 * 2**20,
                   shared_memory_per_core=164 * 1024, shared_memory_per_block_optin=163 * 1024)

CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("h100", "H100 SXM 80 GB", device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
         kinds=("h100 80gb hbm3", "h100 sxm"), peaks=_gpu(989, 494, 67), hbm_bytes=84_942_979_072,
         hbm_bandwidth=3.35e12, link_bandwidth=450e9, vector=67e12, source=_NVIDIA_H, gpu=_HOPPER,
         launch_s=GPU_LAUNCH_S),
    Chip("h200", "H200 SXM 141 GB", device_kind="NVIDIA H200", platform="gpu", kinds=("h200",),
         peaks=_gpu(989, 494, 67), hbm_bytes=151_397_597_184, hbm_bandwidth=4.8e12, link_bandwidth=450e9,
         vector=67e12, source=_NVIDIA_H, gpu=_HOPPER, launch_s=GPU_LAUNCH_S),
    Chip("a100", "A100 SXM 80 GB", device_kind="NVIDIA A100-SXM4-80GB", platform="gpu",
         kinds=("a100-sxm4-80gb", "a100 sxm4 80gb", "a100-sxm"), peaks=_gpu(312, 156, 19.5),
         hbm_bytes=85_100_068_864, hbm_bandwidth=2.039e12, link_bandwidth=300e9, vector=19.5e12, source=_NVIDIA_A,
         gpu=_AMPERE, launch_s=GPU_LAUNCH_S),
    Chip("v5e", "TPU v5e", device_kind="TPU v5 lite", platform="tpu", kinds=("v5 lite", "v5e", "v5litepod"),
         peaks=_tpu(197), hbm_bytes=16 * 2**30, hbm_bandwidth=819e9, link_bandwidth=200e9, vector=None,
         source="Cloud TPU documentation, TPU v5e", topology="v5e:2x2"),
    Chip("v6e", "TPU v6e (Trillium)", device_kind="TPU v6 lite", platform="tpu", kinds=("v6 lite", "v6e"),
         peaks=_tpu(918), hbm_bytes=32 * 2**30, hbm_bandwidth=1640e9, link_bandwidth=448e9, vector=None,
         source="Cloud TPU documentation, TPU v6e", topology="v6e:2x2"),
    # Not compile targets here (no target description), but known to MFU: the PCIe / NVL boards.
    Chip("h100-pcie", "H100 PCIe 80 GB", device_kind="NVIDIA H100 PCIe", platform="gpu", kinds=("h100 pcie",),
         peaks=_gpu(756, 378, 51), hbm_bytes=80 * 10**9, hbm_bandwidth=2.0e12, link_bandwidth=300e9, vector=51e12,
         source=_NVIDIA_H, launch_s=GPU_LAUNCH_S),
    Chip("h100-nvl", "H100 NVL 94 GB", device_kind="NVIDIA H100 NVL", platform="gpu", kinds=("h100 nvl",),
         peaks=_gpu(835, 418, 60), hbm_bytes=94 * 10**9, hbm_bandwidth=3.9e12, link_bandwidth=300e9, vector=60e12,
         source=_NVIDIA_H, launch_s=GPU_LAUNCH_S),
    Chip("h200-nvl", "H200 NVL 141 GB", device_kind="NVIDIA H200 NVL", platform="gpu", kinds=("h200 nvl",),
         peaks=_gpu(835, 418, 60), hbm_bytes=141 * 10**9, hbm_bandwidth=4.8e12, link_bandwidth=450e9, vector=60e12,
         source=_NVIDIA_H, launch_s=GPU_LAUNCH_S),
    Chip("a100-pcie", "A100 PCIe 80 GB", device_kind="NVIDIA A100 80GB PCIe", platform="gpu",
         kinds=("a100 80gb pcie", "a100-pcie"), peaks=_gpu(312, 156, 19.5), hbm_bytes=80 * 10**9,
         hbm_bandwidth=1.935e12, link_bandwidth=300e9, vector=19.5e12, source=_NVIDIA_A,
         launch_s=GPU_LAUNCH_S),
)}
TARGETS = ("h100", "h200", "a100", "v5e", "v6e")  # what benchmarks/aot.py compiles for

# device_kind is matched most specific first: the NVL / PCIe boards before their SXM namesakes.
_MATCH_ORDER = ("h100-pcie", "h100-nvl", "h200-nvl", "a100-pcie", "h100", "h200", "a100", "v5e", "v6e")
_GENERIC = {"h100": "h100", "h200": "h200", "a100": "a100"}  # a bare "H100" etc. means the SXM part


def chip(name: str) -> Chip:
    """The chip called ``name`` (``h100``, ``h200``, ``a100``, ``v5e``, ``v6e``, ...)."""
    if name not in CHIPS:
        raise ValueError(f"target: unknown chip {name!r}; expected one of {sorted(CHIPS)}")
    return CHIPS[name]


def chip_for_kind(device_kind: str) -> Chip | None:
    """The chip a ``jax.Device.device_kind`` names, or None (CPUs, unknown accelerators)."""
    kind = device_kind.lower()
    for name in _MATCH_ORDER:
        if any(k in kind for k in CHIPS[name].kinds):
            return CHIPS[name]
    for word, name in _GENERIC.items():
        if word in kind:
            return CHIPS[name]
    return None


__all__ = ["CHIPS", "GPU_CLASSES", "GPU_LAUNCH_S", "LAUNCH_SOURCE", "TARGETS", "TPU_CLASSES", "Chip", "GpuFacts", "chip",
           "chip_for_kind"]
