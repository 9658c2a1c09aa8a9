"""How the Pallas kernels compute and where they run: precision policy, target, tile configs.

- **Precision policy** (``Policy``): the dtype operands enter ``dot`` in and how fp32 operands are
  multiplied. bf16 / fp16 inputs multiply in their own dtype on tensor cores with fp32
  accumulation. fp32 inputs take ``precision="tf32"`` (tensor cores, the default, like JAX's own
  default for fp32 matmuls on a GPU) or ``precision="ieee"`` (exact fp32 products on the ordinary
  cores, for tests at fp32 tolerances). The triangular inverse, the carried state and the gate
  exponents stay fp32 under every policy; the inverse's block merge uses 3xTF32 (fp32-accurate on
  tensor cores) unless the policy is IEEE.
- **Target** (``Target``, ``kernel_target``): compile the kernels for a GPU or run them in
  interpret mode, and for which GPU generation. By default a GPU backend compiles and any other
  backend interprets; ``with kernel_target("gpu", arch="sm_90"):`` traces the real GPU kernels on a
  CPU host (for lowering with ``lowering_platforms=("cuda",)``), ``kernel_target("interpret")``
  forces interpret mode on a GPU.
- **Tile configs** (``tiles_for``): block sizes, ``num_warps`` and ``num_stages`` of every kernel,
  one frozen table per (K, V, operand dtype, GPU generation). ``benchmarks/compile_kernels.py``
  compiles every entry for sm_90 and sm_80 and checks registers, spills and shared memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp

PRECISIONS = ("tf32", "ieee")
ARCHS = ("sm_80", "sm_90")
TARGETS = ("gpu", "interpret")
FAMILIES = ("mosaic", "triton")


@dataclasses.dataclass(frozen=True)
class Policy:
    """``operand``: dtype name operands enter dots in ('bfloat16', 'float16' or 'float32');
    ``fp32``: how fp32 operands multiply ('tf32' or 'ieee')."""

    operand: str
    fp32: str

    @property
    def operand_dtype(self):
        return jnp.dtype(self.operand)


def policy_for(dtype, precision: str | None) -> Policy:
    """The policy for inputs of ``dtype``: bf16 / fp16 inputs multiply in their dtype unless
    ``precision`` asks for fp32 operands; fp32 inputs default to TF32."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision: expected None or one of {PRECISIONS}, got {precision!r}")
    dtype = jnp.dtype(dtype)
    if precision is None and dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return Policy(dtype.name, "tf32")
    return Policy("float32", precision or "tf32")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the kernels run: ``interpret`` (an interpreter on any backend) or compiled for the
    GPU generation ``arch``; ``family``: 'mosaic' or 'triton' to force a kernel family, None for
    the default (``osdn_jax.kernels.dispatch``: Mosaic GPU on a compiled sm_90 target where it
    covers the call, else Triton)."""

    interpret: bool
    arch: str = "sm_90"
    family: str | None = None


_TARGET: contextvars.ContextVar[Target | None] = contextvars.ContextVar("osdn_kernel_target", default=None)


def _arch_of_device() -> str:
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if cc is None:
        return "sm_90"
    major = int(str(cc).split(".")[0])
    return "sm_90" if major >= 9 else "sm_80"


@contextlib.contextmanager
def kernel_target(target: str, *, arch: str | None = None, family: str | None = None):
    """Run or trace the kernels for ``target`` inside this context.

    ``"gpu"`` builds the compiled GPU kernels even on a CPU host (to lower them with
    ``.lower(lowering_platforms=("cuda",))``), for ``arch`` ('sm_90' Hopper, 'sm_80' Ampere;
    default: the local GPU's, else 'sm_90'); ``"interpret"`` runs them in an interpreter on any
    backend (the Pallas interpreter for Triton, Mosaic GPU's interpreter with its race detector
    for Mosaic). ``family`` forces a kernel family ('mosaic': Hopper only, bf16 / fp16, chunk 64;
    'triton'); None picks Mosaic on a compiled sm_90 target where it covers the call, else Triton
    (interpret targets default to Triton). ``impl="auto"`` also decides as it would on that target.
    """
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
    if arch is not None and arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family: expected None or one of {FAMILIES}, got {family!r}")
    if target == "gpu":
        resolved = Target(False, arch or (_arch_of_device() if jax.default_backend() == "gpu" else "sm_90"), family)
    else:
        resolved = Target(True, arch or "sm_90", family)
    token = _TARGET.set(resolved)
    try:
        yield resolved
    finally:
        _TARGET.reset(token)


def current_target() -> Target:
    """The target in force: the innermost ``kernel_target``, else compiled on a GPU backend and
    interpreted elsewhere."""
    chosen = _TARGET.get()
    if chosen is not None:
        return chosen
    if jax.default_backend() == "gpu":
        return Target(False, _arch_of_device())
    return Target(True, "sm_90")


# ----------------------------------------------------------------------------------------------
# tile configs


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """One kernel's launch settings: warps, software-pipelining stages, its tile widths (``bk``
    over K, ``bv`` over V, ``bc`` rows of a ``[C, C]`` product; 0 where the kernel does not tile
    that dim, or takes it whole), and ``rank1``: a serial kernel multiplies by rank-1 updates
    instead of ``dot`` (IEEE fp32, where Triton's FMA dot spills)."""

    num_warps: int
    num_stages: int = 1
    bk: int = 0
    bv: int = 0
    bc: int = 0
    rank1: bool = False


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Settings of every phase-2 kernel and the phase-1 kernels for one (K, V, operand, arch)."""

    intra: KernelTiles
    states: KernelTiles
    output: KernelTiles
    bwd_local: KernelTiles
    states_bwd: KernelTiles
    grads_wy: KernelTiles
    grads_a: KernelTiles
    grads_q: KernelTiles
    grads_k: KernelTiles
    precond: KernelTiles


def tiles_for(K: int, V: int, C: int, policy: Policy, arch: str) -> Tiles:
    """The frozen table: K and V are the padded head dims (powers of two, 16..128), C the chunk.

    Every entry was compiled for sm_90 and sm_80 by ``benchmarks/compile_kernels.py`` with no
    register spills (the table in ``docs/kernels.md``). The rules behind the numbers: per-chunk
    kernels hold a few ``[C, C]`` fp32 tiles plus ``[C, bk]`` / ``[C, bv]`` operand tiles; serial
    kernels hold the fp32 state tile ``[K, bv]``. fp32 operands take twice the registers of bf16
    ones, and IEEE products (no tensor cores: Triton's FMA path keeps whole operand rows in
    registers) far more, so their tiles are smaller. Ampere's ``mma.sync`` keeps both operands in
    registers where Hopper's ``wgmma`` reads them from shared memory, so sm_80 gets narrower tiles
    in the gradient kernels. IEEE serial kernels use rank-1 updates instead of ``dot``.
    """
    hopper = arch == "sm_90"
    k_ = lambda n: min(K, n)  # noqa: E731
    v_ = lambda n: min(V, n)  # noqa: E731
    w = 8  # the [C, C] fp32 tiles (not K or V) set the register pressure; 8 warps spread them
    if policy.operand != "float32":  # bf16 / fp16 operands on tensor cores
        return Tiles(
            intra=KernelTiles(w, bk=k_(64), bv=v_(64)),
            states=KernelTiles(w, bv=v_(64)),
            output=KernelTiles(w, bk=k_(64), bv=v_(64)),
            bwd_local=KernelTiles(w, bk=k_(64), bv=v_(64)),
            states_bwd=KernelTiles(w, bv=v_(64)),
            grads_wy=KernelTiles(w, bk=k_(32), bv=v_(64 if hopper else 32)),
            grads_a=KernelTiles(w, bk=k_(32)),
            grads_k=KernelTiles(w, bk=k_(32 if hopper else 16), bv=v_(64 if hopper else 32)),
            grads_q=KernelTiles(w, bk=k_(32), bv=v_(64 if hopper else 32)),
            precond=KernelTiles(4),
        )
    if policy.fp32 == "tf32":
        return Tiles(
            intra=KernelTiles(w, bk=k_(32), bv=v_(32)),
            states=KernelTiles(w, bv=v_(32)),
            output=KernelTiles(w, bk=k_(32), bv=v_(32)),
            bwd_local=KernelTiles(w, bk=k_(32), bv=v_(32)),
            states_bwd=KernelTiles(w, bv=v_(32)),
            grads_wy=KernelTiles(w if hopper else 4, bk=k_(32 if hopper else 16), bv=v_(32 if hopper else 16)),
            grads_a=KernelTiles(w, bk=k_(32), bc=32),
            grads_k=KernelTiles(w, bk=k_(16), bv=v_(32)),
            grads_q=KernelTiles(w, bk=k_(32), bv=v_(32)),
            precond=KernelTiles(4),
        )
    # IEEE fp32: exact products on the FMA units, the smallest tiles; the serial kernels by rank-1
    # updates (Triton's FMA dot keeps whole operand rows in registers and spilled there on sm_90).
    return Tiles(
        intra=KernelTiles(w, bk=k_(16), bv=v_(16)),
        states=KernelTiles(w, bv=v_(16), rank1=True),
        output=KernelTiles(w, bk=k_(16), bv=v_(16)),
        bwd_local=KernelTiles(w, bk=k_(16), bv=v_(16)),
        states_bwd=KernelTiles(w, bv=v_(16), rank1=True),
        grads_wy=KernelTiles(w, bk=k_(16), bv=v_(16)),
        grads_a=KernelTiles(w, bk=k_(16), bc=16),
        grads_k=KernelTiles(w, bk=k_(16), bv=v_(16)),
        grads_q=KernelTiles(w, bk=k_(16), bv=v_(16)),
        precond=KernelTiles(4),
    )
