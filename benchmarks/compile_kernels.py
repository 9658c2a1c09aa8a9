"""Compile every Pallas kernel to GPU machine code on this (CPU) host and report what the GPU
would see: registers, spills, shared memory, tensor-core instructions.

    python benchmarks/compile_kernels.py            # the full table (every tile config; ~30 min on 2 cores)
    python benchmarks/compile_kernels.py --quick    # the CI subset (a few minutes)
    python benchmarks/compile_kernels.py --arch sm_90 --operand bfloat16 --dims 128x128
    python benchmarks/compile_kernels.py --family mosaic [--quick]   # the Mosaic GPU kernels (compile_mosaic.py)

Route: each op is lowered for CUDA through the front door (family ``triton``; ``ops.osdn`` / ``ops.delta_rule`` with
``impl="pallas"``, forward and backward; ``osdn_jax.kernels.lowering.lower_for_gpu``). Every
``__gpu$xla.gpu.triton`` custom call in the StableHLO carries the kernel's Triton IR (MLIR
bytecode from jaxlib's embedded Triton) with its name, ``num_warps`` and ``num_stages``. The
bytecode is re-printed as generic MLIR text with jaxlib's own Triton dialect (bytecode does not
travel between Triton versions), compiled by the pip ``triton`` wheel for ``sm_90a`` / ``sm_80``
(no GPU or driver needed), and the PTX is assembled by the wheel's ``ptxas`` with ``.maxnreg 255``
(the hardware limit; Triton's own launch bound lets ptxas settle lower and spill). Shared memory
comes from Triton's kernel metadata.

Checks (exit status 1 if any fails): the kernel compiles; registers ≤ 255; no spill stores or
loads; shared memory ≤ 227 KiB (sm_90) / 163 KiB (sm_80); every phase-2 kernel with bf16 / fp16 /
TF32 operands uses tensor-core instructions (``mma`` on sm_80, ``mma`` or ``wgmma`` on sm_90).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless this is set

SMEM_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
MAX_REGS = 255
CC = {"sm_90": 90, "sm_80": 80}


@dataclasses.dataclass(frozen=True)
class Config:
    """One compile: the op variant, head dims, operand policy, chunk and GPU generation."""

    variant: str  # "full": OS-GDN (gate, documents, d ⊙ k, APF, initial state); "plain": DeltaNet
    K: int
    V: int
    operand: str  # "bfloat16", "float16", "tf32", "ieee"
    C: int
    arch: str

    def label(self) -> str:
        return f"{self.variant} K={self.K} V={self.V} {self.operand} C={self.C} {self.arch}"


@dataclasses.dataclass
class Kernel:
    name: str
    ir: bytes
    num_warps: int
    num_stages: int
    config: Config


@dataclasses.dataclass
class Report:
    kernel: str
    config: str
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None
    mma: str | None = None  # "wgmma", "mma" or "" (none)
    num_warps: int = 0
    error: str | None = None
    problems: tuple[str, ...] = ()


def full_matrix(archs=("sm_90", "sm_80")) -> list[Config]:
    """Every tile config the table in ``osdn_jax.kernels.config`` hands out at the default chunk,
    for the superset variant (all options on) and the plain one, plus the smaller chunks."""
    out = []
    for arch in archs:
        for operand in ("bfloat16", "float16", "tf32", "ieee"):
            for K, V in ((64, 64), (128, 128), (128, 64), (64, 128), (32, 32)):
                for variant in ("full", "plain"):
                    out.append(Config(variant, K, V, operand, 64, arch))
        for C in (16, 32):
            for operand in ("bfloat16", "tf32"):
                out.append(Config("full", 128, 128, operand, C, arch))
    return out


def quick_matrix() -> list[Config]:
    """The CI subset: the largest tiles in bf16 on both generations, fp32 (TF32 and IEEE) on Hopper."""
    return [Config("full", 128, 128, "bfloat16", 64, "sm_90"), Config("full", 128, 128, "bfloat16", 64, "sm_80"),
            Config("full", 128, 128, "tf32", 64, "sm_90"), Config("full", 128, 128, "ieee", 64, "sm_90")]


# ----------------------------------------------------------------------------------------------
# lowering: the Triton IR of every kernel of one config


def lower_kernels(cfg: Config) -> list[Kernel]:
    """Lower the op (forward and backward) for CUDA through the front door; its Triton kernels
    (the first call of each name)."""
    import jax
    import jax.numpy as jnp

    from osdn_jax import ops
    from osdn_jax.kernels.lowering import lower_for_gpu, triton_calls

    dtype = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(cfg.operand, jnp.float32)
    precision = cfg.operand if cfg.operand in ("tf32", "ieee") else None
    B, T, H = 1, 256, 1
    sds = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
    xs = dict(q=sds(B, T, H, cfg.K), k=sds(B, T, H, cfg.K), v=sds(B, T, H, cfg.V), beta=sds(B, T, H))
    if cfg.variant == "full":
        xs.update(d0=sds(H, cfg.K, dt=jnp.float32), log_gamma=sds(B, T, H), log_decay=sds(B, T, H),
                  initial_state=sds(B, H, cfg.K, cfg.V, dt=jnp.float32), initial_d=sds(B, H, cfg.K, dt=jnp.float32))
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def loss(xs, segment_ids):
        a = dict(xs)
        q, k, v, beta = (a.pop(n) for n in ("q", "k", "v", "beta"))
        if cfg.variant == "full":
            o, S, d = ops.osdn(q, k, v, beta, a.pop("d0"), eta=1.0, d_min=0.5, d_max=1.5, beta_aware=True,
                               segment_ids=segment_ids, output_final_state=True, chunk_size=cfg.C, impl="pallas",
                               precision=precision, **a)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S) + jnp.sum(d)
        o, _ = ops.delta_rule(q, k, v, beta, chunk_size=cfg.C, impl="pallas", precision=precision)
        return jnp.sum(o.astype(jnp.float32))

    lowered = lower_for_gpu(jax.value_and_grad(loss), xs, seg if cfg.variant == "full" else None, arch=cfg.arch,
                            family="triton")
    first = {}
    for c in triton_calls(lowered):
        first.setdefault(c.name, Kernel(c.name, c.ir, c.num_warps, c.num_stages, cfg))
    return list(first.values())


def generic_text(ir: bytes) -> str:
    """jaxlib's Triton bytecode re-printed as generic MLIR text (readable by other Triton versions)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib import mlir
    from jax._src.lib.triton import dialect

    ctx = jax_mlir.make_ir_context()
    dialect.register_dialect(ctx)
    with ctx:
        return mlir.ir.Module.parse(ir).operation.get_asm(print_generic_op_form=True)


# ----------------------------------------------------------------------------------------------
# compiling: Triton → PTX → ptxas


def _ptxas(arch: str) -> str:
    """The ptxas the Triton wheel itself uses for this generation (it ships two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(CC[arch]).path


def compile_kernel(name: str, text: str, num_warps: int, num_stages: int, arch: str, label: str,
                   uses_tensor_cores: bool) -> Report:
    """Compile one kernel (generic MLIR text) for ``arch``; registers, spills, shared memory, mma."""
    rep = Report(name, label, num_warps=num_warps)
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        with tempfile.TemporaryDirectory() as tmp:
            src = pathlib.Path(tmp) / f"{name}.ttir"
            src.write_text(text)
            compiled = triton.compile(str(src), target=GPUTarget("cuda", CC[arch], 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages, num_ctas=1))
            ptx = compiled.asm["ptx"]
            rep.smem = int(compiled.metadata.shared)
            capped = re.sub(r"(\.reqntid[^\n]*\n)", r"\1.maxnreg 255\n", ptx, count=1)
            ptx_path = pathlib.Path(tmp) / f"{name}.ptx"
            ptx_path.write_text(capped)
            gpu = "sm_90a" if arch == "sm_90" else arch
            out = subprocess.run([_ptxas(arch), f"--gpu-name={gpu}", "-v", str(ptx_path), "-o", str(ptx_path) + ".o"],
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode:
                raise RuntimeError(out.stderr.strip()[-2000:])
            log = out.stderr
            rep.regs = int(re.search(r"Used (\d+) registers", log).group(1))
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            rep.spill_stores, rep.spill_loads = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
            rep.mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "")
    except Exception as e:  # a compile error is a finding, reported in the table
        rep.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
    problems = []
    if rep.error:
        problems.append("compile error")
    else:
        if rep.regs > MAX_REGS:
            problems.append(f"{rep.regs} registers")
        if rep.spill_stores or rep.spill_loads:
            problems.append("spills")
        if rep.smem > SMEM_LIMIT[arch]:
            problems.append(f"shared memory {rep.smem} B > {SMEM_LIMIT[arch]} B")
        if uses_tensor_cores and not rep.mma:
            problems.append("no tensor-core instructions")
    rep.problems = tuple(problems)
    return rep


def _job(args):
    return compile_kernel(*args)


def run(configs: list[Config], workers: int, kernels: set[str] | None = None) -> list[Report]:
    jobs, seen = [], {}
    for cfg in configs:
        for kern in lower_kernels(cfg):
            if kernels and kern.name not in kernels:
                continue
            key = (hashlib.sha1(kern.ir).hexdigest(), kern.num_warps, kern.num_stages, cfg.arch)
            if key in seen:
                continue
            seen[key] = True
            tensor_cores = kern.name.startswith("delta_rule") and cfg.operand != "ieee"
            jobs.append((kern.name, generic_text(kern.ir), kern.num_warps, kern.num_stages, cfg.arch, cfg.label(),
                         tensor_cores))
    print(f"{len(jobs)} distinct kernels from {len(configs)} configs; compiling with {workers} worker(s)", flush=True)
    print("| kernel | config | warps | registers | spill st/ld (B) | shared (KiB) | tensor cores | verdict |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    reports = []
    spawn = multiprocessing.get_context("spawn")  # workers need only triton: no forked JAX threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
        for rep in pool.map(_job, jobs):
            reports.append(rep)
            if rep.error:
                row = f"| {rep.kernel} | {rep.config} | {rep.num_warps} | - | - | - | - | FAIL: {rep.error} |"
            else:
                verdict = "ok" if not rep.problems else "FAIL: " + ", ".join(rep.problems)
                row = (f"| {rep.kernel} | {rep.config} | {rep.num_warps} | {rep.regs} | {rep.spill_stores}/"
                       f"{rep.spill_loads} | {rep.smem / 1024:.1f} | {rep.mma or 'no'} | {verdict} |")
            print(row, flush=True)
    return reports


def override_tiles(specs: list[str]) -> None:
    """Replace entries of the tile table for this run (tuning experiments)."""
    from osdn_jax.kernels import config, delta_rule, preconditioner

    changes = {}
    for spec in specs:
        kernel, _, fields = spec.partition("=")
        changes[kernel] = {k: int(v) for k, v in (f.split(":") for f in fields.split(","))}
    base = config.tiles_for

    def patched(K, V, C, policy, arch):
        tiles = base(K, V, C, policy, arch)
        return dataclasses.replace(tiles, **{k: dataclasses.replace(getattr(tiles, k), **v)
                                             for k, v in changes.items()})

    delta_rule.tiles_for = preconditioner.tiles_for = patched


def main() -> int:
    if "--family" in sys.argv:  # the Mosaic GPU family has its own toolchain: compile_mosaic.py
        at = sys.argv.index("--family")
        family = sys.argv[at + 1] if at + 1 < len(sys.argv) else ""
        if family not in ("triton", "mosaic"):
            print(f"--family: expected 'triton' or 'mosaic', got {family!r}", file=sys.stderr)
            return 2
        del sys.argv[at:at + 2]
        if family == "mosaic":
            sys.path.insert(0, str(pathlib.Path(__file__).parent))
            import compile_mosaic

            return compile_mosaic.main()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset")
    ap.add_argument("--arch", choices=("sm_90", "sm_80"), action="append")
    ap.add_argument("--operand", choices=("bfloat16", "float16", "tf32", "ieee"), action="append")
    ap.add_argument("--dims", action="append", help="KxV, e.g. 128x128")
    ap.add_argument("--chunk", type=int, action="append")
    ap.add_argument("--variant", choices=("full", "plain"), action="append")
    ap.add_argument("--tiles", action="append", default=[],
                    help="tuning override, e.g. grads=num_warps:8,bk:32,bv:32 (replaces the table's entry)")
    ap.add_argument("--kernel", action="append", help="compile only these kernels (by name)")
    ap.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = ap.parse_args()
    configs = quick_matrix() if args.quick else full_matrix()
    dims = {tuple(int(x) for x in d.split("x")) for d in args.dims or ()}
    configs = [c for c in configs if (not args.arch or c.arch in args.arch)
               and (not args.operand or c.operand in args.operand) and (not dims or (c.K, c.V) in dims)
               and (not args.chunk or c.C in args.chunk) and (not args.variant or c.variant in args.variant)]
    if not configs:
        print("no configuration matches the filters", file=sys.stderr)
        return 2
    if args.tiles:
        override_tiles(args.tiles)
    reports = run(configs, args.workers, set(args.kernel or ()))
    bad = [r for r in reports if r.problems]
    print(f"\n{len(reports)} kernels compiled, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
