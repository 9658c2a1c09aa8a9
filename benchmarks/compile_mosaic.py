"""Compile the Mosaic GPU kernels to Hopper machine code on this (CPU) host and report what the GPU
would see: registers, spills, shared memory, and whether wgmma and TMA instructions are there.

    python benchmarks/compile_mosaic.py            # every config (bf16 / fp16, K, V in {64, 128}, two variants)
    python benchmarks/compile_mosaic.py --quick    # the CI subset
    python benchmarks/compile_mosaic.py --raw-k 256  # the state passes at K = 256, past the front door's limit

Route: each op is lowered for CUDA through the front door (``ops.osdn`` / ``ops.delta_rule``,
``impl="pallas"``, family ``mosaic``, forward and backward; ``osdn_jax.kernels.lowering``). Every
``mosaic_gpu_v2`` custom call carries the kernel's serialized Mosaic module. That module goes to
``MosaicGpuCompile`` from JAX's CUDA PJRT plugin (``jax-cuda13-pjrt``), which runs Mosaic's whole
pipeline (MLIR passes → LLVM NVPTX → PTX → ``ptxas`` → cubin) in a child process. It needs a CUDA
driver only to ask the device's compute capability and to load the finished cubin; the plugin opens
``libcuda.so.1`` lazily, so a small stand-in driver (C source below, built once with ``cc``) answers
as an sm_90 device and records the cubin and the dynamic shared memory the Mosaic runtime asks for.
``MOSAIC_GPU_DUMP_PTXAS=1`` makes the plugin print ``ptxas -v`` (registers, spills, static shared
memory), ``MOSAIC_GPU_DUMP_PTX=1`` the PTX (searched for ``wgmma.mma_async`` and
``cp.async.bulk.tensor``, the TMA copies).

The toolchain (``jax-cuda13-pjrt``, ``jax-cuda13-plugin`` for the Mosaic runtime library,
``nvidia-cuda-nvcc`` for ptxas, ``nvidia-nvvm`` for libdevice; about 730 MB) is installed with
``pip install --target`` into ``$OSDN_CUDA_TOOLCHAIN`` (default ``~/.cache/osdn-jax/cuda-toolchain``,
shared with ``benchmarks/aot.py``; ``benchmarks/toolchains.py``) on first use, never into the
environment running JAX (the CUDA plugin would be picked up there).

Checks (exit status 1 if any fails): the module compiles; registers ≤ 255; no spill stores or
loads; shared memory ≤ 227 KiB; the PTX has wgmma and TMA instructions.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import toolchains  # noqa: E402

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SMEM_LIMIT = 227 * 1024
MAX_REGS = 255

# A stand-in libcuda.so.1: the compute capability (FAKECUDA_CC, default 90), a context, module
# loading that keeps the cubin, and a log of the function attributes the Mosaic runtime sets.
FAKE_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
static FILE* out(void){ static FILE* f=0; if(!f){ const char* p=getenv("FAKECUDA_LOG_FILE"); f=p?fopen(p,"a"):stderr; } return f; }
static int cc(void){ const char* e=getenv("FAKECUDA_CC"); return e?atoi(e):90; }
static char ctx[64];
static uintptr_t next_fn=0x3000;
int cuInit(unsigned f){ return 0; }
int cuDriverGetVersion(int* v){ *v=13000; return 0; }
int cuDeviceGetCount(int* c){ *c=1; return 0; }
int cuDeviceGet(int* d, int o){ *d=0; return 0; }
int cuCtxGetCurrent(void** c){ *c=ctx; return 0; }
int cuCtxSetCurrent(void* c){ return 0; }
int cuCtxPushCurrent_v2(void* c){ return 0; }
int cuCtxPopCurrent_v2(void** c){ if(c)*c=ctx; return 0; }
int cuCtxSynchronize(void){ return 0; }
int cuCtxGetDevice(int* d){ *d=0; return 0; }
int cuDeviceGetName(char* n, int len, int d){ snprintf(n,len,"stand-in sm_%d",cc()); return 0; }
int cuDeviceGetAttribute(int* v, int attr, int dev){
  switch(attr){
    case 75: *v=cc()/10; break; case 76: *v=cc()%10; break;   /* compute capability */
    case 1: *v=1024; break; case 8: *v=49152; break; case 97: *v=232448; break;
    case 81: *v=233472; break; case 16: *v=132; break; case 10: *v=32; break; case 12: *v=65536; break;
    default: *v=0;
  }
  return 0;
}
int cuGetErrorString(int e, const char** s){ static char b[64]; snprintf(b,sizeof b,"stand-in CUDA error %d",e); *s=b; return 0; }
int cuGetErrorName(int e, const char** s){ static char b[64]; snprintf(b,sizeof b,"STANDIN_ERROR_%d",e); *s=b; return 0; }
int cuModuleLoadData(void** m, const void* image){ *m=(void*)0x1000; return 0; }
int cuModuleLoadDataEx(void** m, const void* image, unsigned n, void* o, void** ov){ *m=(void*)0x1000; return 0; }
int cuModuleUnload(void* m){ return 0; }
int cuModuleGetFunction(void** f, void* m, const char* name){ *f=(void*)(next_fn++); fprintf(out(),"FUNC %p %s\n",*f,name); fflush(out()); return 0; }
int cuFuncSetAttribute(void* f, int a, int v){ fprintf(out(),"SETATTR %p %d %d\n",f,a,v); fflush(out()); return 0; }
int cuFuncGetAttribute(int* v, int a, void* f){ *v=0; return 0; }
"""

CHILD = r"""
import ctypes, sys
compile_module = ctypes.CDLL(sys.argv[1]).MosaicGpuCompile
compile_module.argtypes = [ctypes.c_char_p, ctypes.c_int]
compile_module.restype = ctypes.POINTER(ctypes.c_void_p)
data = open(sys.argv[2], "rb").read()
ok = bool(compile_module(data, len(data)))
sys.stdout.flush()
print("\nCOMPILED", int(ok), flush=True)
"""


def toolchain_dir() -> pathlib.Path:
    """The CUDA toolchain folder (installed on first use) with the stand-in driver built in it."""
    root = toolchains.cuda()
    driver = root / ("driver-" + hashlib.sha256(FAKE_DRIVER.encode()).hexdigest()[:12])
    if not (driver / "libcuda.so.1").exists():
        driver.mkdir(parents=True, exist_ok=True)
        (driver / "driver.c").write_text(FAKE_DRIVER)
        subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O1", "-w", "-o",
                        str(driver / "libcuda.so.1"), str(driver / "driver.c")], check=True)
    return root


@dataclasses.dataclass
class Report:
    kernel: str
    config: str
    regs: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int | None = None  # static + dynamic bytes
    wgmma: bool = False
    tma: bool = False
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        if self.error:
            return [f"compile: {self.error}"]
        found = []
        if self.regs is None or self.regs > MAX_REGS:
            found.append(f"registers {self.regs}")
        if self.spill_stores or self.spill_loads:
            found.append(f"spills {self.spill_stores}+{self.spill_loads} bytes")
        if self.smem is None or self.smem > SMEM_LIMIT:
            found.append(f"shared memory {self.smem} > {SMEM_LIMIT}")
        if not self.wgmma:
            found.append("no wgmma")
        if not self.tma:
            found.append("no TMA")
        return found


def compile_module(module: bytes, config: str, root: pathlib.Path, cc: int = 90) -> list[Report]:
    """One serialized Mosaic module → a report per kernel in it."""
    site = root / "site"
    plugin = site / "jax_plugins" / "xla_cuda13" / "xla_cuda_plugin.so"
    cuda = site / "nvidia" / "cu13"
    driver = next(root.glob("driver-*"))
    with tempfile.TemporaryDirectory(prefix="mosaic_compile_") as work:
        path = pathlib.Path(work) / "module.mlirbc"
        path.write_bytes(module)
        log = pathlib.Path(work) / "driver.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MOSAIC_GPU_", "FAKECUDA_", "CUDA_VISIBLE"))}
        env.update(LD_LIBRARY_PATH=f"{driver}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":"),
                   PATH=f"{cuda / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", MOSAIC_GPU_CUDA_ROOT=str(cuda),
                   MOSAIC_GPU_RUNTIME_LIB_PATH=str(site / "jax_cuda13_plugin" / "libmosaic_gpu_runtime.so"),
                   MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_PTX="1", FAKECUDA_CC=str(cc), FAKECUDA_LOG_FILE=str(log))
        proc = subprocess.run([sys.executable, "-c", CHILD, str(plugin), str(path)], env=env, cwd=work,
                              capture_output=True, text=True, timeout=900)
        text = proc.stdout + "\n" + proc.stderr
        driver_log = log.read_text() if log.exists() else ""
    reports, current = {}, None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for 'sm_\d+a?'", line)
        if entry:
            current = reports.setdefault(entry.group(1), Report(entry.group(1).removesuffix("_mosaic_gpu_kernel"),
                                                                config))
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills and current is not None:
            current.spill_stores, current.spill_loads = int(spills.group(1)), int(spills.group(2))
        regs = re.search(r"Used (\d+) registers", line)
        if regs and current is not None:
            current.regs = int(regs.group(1))
            static = re.search(r"(\d+) bytes smem", line)
            current.smem = int(static.group(1)) if static else 0
    functions = dict(re.findall(r"^FUNC (\S+) (\S+)$", driver_log, re.M))
    for handle, attr, value in re.findall(r"^SETATTR (\S+) (\d+) (-?\d+)$", driver_log, re.M):
        if attr == "8" and functions.get(handle) in reports:  # MAX_DYNAMIC_SHARED_SIZE_BYTES
            reports[functions[handle]].smem += int(value)
    compiled = re.search(r"COMPILED (\d)", proc.stdout)
    for r in reports.values():
        r.wgmma, r.tma = "wgmma.mma_async" in text, "cp.async.bulk.tensor" in text
        if not (compiled and compiled.group(1) == "1"):
            r.error = f"MosaicGpuCompile failed (exit {proc.returncode})"
    if not reports:
        return [Report("?", config, error=f"no ptxas report (exit {proc.returncode}): {text[-2000:]}")]
    return list(reports.values())


# ----------------------------------------------------------------------------------------------
# what to compile


@dataclasses.dataclass(frozen=True)
class Config:
    variant: str  # "full": OS-GDN with documents, APF, initial state; "plain": DeltaNet
    K: int
    V: int
    dtype: str

    def label(self) -> str:
        return f"{self.variant} K={self.K} V={self.V} {self.dtype}"


def matrix(quick: bool) -> list[Config]:
    if quick:
        return [Config("full", 128, 128, "bfloat16"), Config("plain", 64, 64, "float16")]
    return [Config(v, K, V, d) for v in ("full", "plain") for K in (64, 128) for V in (64, 128)
            for d in ("bfloat16", "float16")]


def modules_for(cfg: Config) -> list[bytes]:
    """The Mosaic modules of one config's forward and backward, lowered through the front door."""
    import jax
    import jax.numpy as jnp

    from osdn_jax import ops
    from osdn_jax.kernels.lowering import lower_for_gpu, mosaic_calls

    B, T, H = 2, 2048, 4  # 16 programs of 32 chunks: the front door splits each sequence in 4
    dt = jnp.dtype(cfg.dtype)
    x = lambda *shape, d=dt: jax.ShapeDtypeStruct(shape, d)  # noqa: E731
    xs = dict(q=x(B, T, H, cfg.K), k=x(B, T, H, cfg.K), v=x(B, T, H, cfg.V), beta=x(B, T, H))
    if cfg.variant == "full":
        xs.update(log_decay=x(B, T, H, d=jnp.float32), log_gamma=x(B, T, H, d=jnp.float32),
                  d0=x(H, cfg.K, d=jnp.float32), initial_state=x(B, H, cfg.K, cfg.V, d=jnp.float32))

    def loss(xs, segment_ids):
        xs = dict(xs)
        q, k, v, beta = (xs.pop(n) for n in ("q", "k", "v", "beta"))
        if cfg.variant == "full":
            o = ops.osdn(q, k, v, beta, xs.pop("d0"), eta=1.0, d_min=0.5, d_max=1.5, beta_aware=True,
                         segment_ids=segment_ids, impl="pallas", **xs)[0]
        else:
            o = ops.delta_rule(q, k, v, beta, impl="pallas")[0]
        return jnp.sum(o.astype(jnp.float32))

    lowered = lower_for_gpu(jax.grad(loss), xs, x(B, T, d=jnp.int32), family="mosaic")
    return [c.module for c in mosaic_calls(lowered)]


def _name(module: bytes) -> str:
    found = re.search(rb"osdn_mosaic_[a-z_]*[a-z]", module)
    return found.group().decode() if found else hashlib.sha256(module).hexdigest()


def raw_modules(K: int) -> list[bytes]:
    """The two state passes called directly at head dim K (no front-door limit), bf16."""
    import jax
    import jax.numpy as jnp

    from osdn_jax.kernels.lowering import abstract_gpu_mesh, mosaic_calls
    from osdn_jax.kernels.mosaic import state_pass

    B, H, N, V = 1, 1, 4, 64
    Tp = N * state_pass.C
    b = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    fwd = lambda *a: state_pass.states_forward(*a, out_dtype=jnp.bfloat16)  # noqa: E731
    found = []
    with jax.sharding.use_abstract_mesh(abstract_gpu_mesh()):
        for fn, args in ((fwd, (b(B, H, Tp, K), b(B, H, Tp, K), b(B, H, Tp, K), b(B, H, Tp, state_pass.C),
                                f(B, H, Tp, V), f(B, H, 4), f(B, H, K, V))),
                         (state_pass.states_backward, (b(B, H, Tp, K), b(B, H, Tp, K), b(B, H, Tp, K), b(B, H, Tp, V),
                                                       f(B, H, Tp, V), f(B, H, 4), f(B, H, K, V)))):
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
            found += [c.module for c in mosaic_calls(lowered)]
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset")
    ap.add_argument("--raw-k", type=int, help="compile the state passes directly at this head dim instead")
    args = ap.parse_args()
    root = toolchain_dir()
    seen, reports = set(), []
    if args.raw_k:
        try:
            jobs = [(f"raw K={args.raw_k} V=64 bfloat16", m) for m in raw_modules(args.raw_k)]
        except ValueError as e:  # Mosaic's own lowering refuses, e.g. shared memory past the limit
            jobs, reports = [], [Report("osdn_mosaic_states_*", f"raw K={args.raw_k}", error=f"lowering: {e}")]
    else:
        jobs = [(cfg.label(), m) for cfg in matrix(args.quick) for m in modules_for(cfg)]
    for label, module in jobs:  # one row per kernel and config (the split's two reverse passes are one kernel)
        if (label, _name(module)) in seen:
            continue
        seen.add((label, _name(module)))
        reports += compile_module(module, label, root)
    print("| kernel | config | registers | spills (st+ld bytes) | shared memory (KiB) | wgmma | TMA | check |")
    print("|---|---|---|---|---|---|---|---|")
    for r in reports:
        smem = "?" if r.smem is None else f"{r.smem / 1024:.1f}"
        check = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
        print(f"| {r.kernel} | {r.config} | {r.regs} | {r.spill_stores}+{r.spill_loads} | {smem} | "
              f"{'yes' if r.wgmma else 'no'} | {'yes' if r.tma else 'no'} | {check} |")
    return 1 if any(r.problems for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
