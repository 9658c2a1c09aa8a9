"""Compile the ops and the training step for an H100 / H200 / A100 GPU or a TPU v5e / v6e chip on
this CPU host, with none attached, and report memory, FLOPs, HBM bytes, kernel launches and a
roofline time — beside jax-linear-attention at equal shapes. Every figure is a prediction from
compiling, not a measurement.

    python benchmarks/aot.py --target h100                   # ops and train steps, 1 and 8 devices
    python benchmarks/aot.py --target v5e --what train --devices 1
    python benchmarks/aot.py --target h100 h200 a100 v5e v6e --json runs/aot.json
    python benchmarks/aot.py --target h100 --quick           # one small op, one tiny step (the CI check)
    python benchmarks/aot.py --target h100 --calibrate       # the prediction beside published timings

How: XLA compiles whole programs for a described device (``jax.experimental.topologies``): for a
GPU, JAX's CUDA plugin with a target description written from ``osdn_jax.hardware`` (the real GPU
pipeline down to an sm_90a / sm_80 cubin: fusions, buffer assignment, Triton GEMMs); for a TPU,
libtpu's compiler. The toolchains install on first use into cache folders of their own
(``benchmarks/toolchains.py``), and each target compiles in a child process that sees its toolchain.
Without a device there is no autotuning: GEMMs get default tiles, which ops fuse is XLA's real choice.

Per program: XLA's memory analysis (peak = arguments + temporaries + outputs not aliased to
arguments, per device), and ``osdn_jax.perf``'s reading of the optimized HLO: FLOPs by product
precision, HBM bytes, kernel launches (loops times their trip counts) and the roofline time, a
lower bound (``osdn_jax/perf/roofline.py`` says what it leaves out).

- **ops**: ``ops.delta_rule`` / ``ops.osdn`` for DeltaNet, GDN, OSDN ('may' preset) and OS-GDN,
  forward and forward+backward, bf16, at the GPU-suite shapes, for every path the target runs:
  ``chunked`` (what ``auto`` runs everywhere today), the ``triton`` kernels (GPUs), the ``mosaic``
  kernels (sm_90); jax-linear-attention 0.1.0's DeltaNet and GDN beside them (``jla-mosaic`` on
  sm_90, ``jla-chunked`` everywhere) where it imports (``pip install -e ".[bench]"``).
  "× min" is HBM bytes over the program's own inputs and outputs (read q, k, v, β, gates once,
  write o, or the gradients), the least any implementation moves.
- **train**: the trainer's step (forward, backward, AdamW; remat, scanned layers, chunked loss,
  vocab 32,000, T = 4096, bf16 compute, fp32 parameters) of the deltanet / gdn / osdn 340M and 1.3B
  presets, on one device and on an 8-device fsdp mesh: the most 4096-token rows per device whose
  peak fits ``--memory-fraction`` of the chip's memory (bisection on the memory analysis, starting
  from a line through two compiles), then that step's predicted time, tokens/s and MFU
  (``osdn_jax.flops`` FLOPs per token over the chip's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
OP_SHAPES = ((8, 2048, 16, 128), (2, 8192, 16, 128), (8, 4096, 8, 64))  # B, T, H, K = V
QUICK_OP_SHAPE = (1, 256, 2, 64)
QUICK_SEQ_LEN = 128
OPS = ("deltanet", "gdn", "osdn", "os-gdn")
PATHS = ("chunked", "triton", "mosaic", "jla-mosaic", "jla-chunked")
TRAIN_PRESETS = ("deltanet-340m", "gdn-340m", "osdn-340m", "deltanet-1.3b", "gdn-1.3b", "osdn-1.3b")
SEQ_LEN = 4096
GiB = 2**30

# Published H100 measurements at shapes the tool can compile (docs/performance.md names the sources).
# jax-linear-attention 0.1.0's README: gdn-hd128-1p3b (24 layers, hidden 2048, 16 heads of 128, MLP 5632,
# vocab 128,256, output gate), 65,536 tokens per step (16 x 4096), bf16, one H100: 42,995 tokens/s (42.3% MFU).
# Its scalar_gate.py: Gated DeltaNet forward+backward at (B, T, H) = (1, 2048, 8), K = V = 128, 16 documents of
# 128 tokens: 0.121 ms (0.129 ms with its kernel piece scan).
CALIBRATION = {
    "jla Mosaic GDN f+b, (1, 2048, 8), 16 documents of 128": dict(
        kind="op", op="gdn", path="jla-mosaic", shape=(1, 2048, 8, 128), documents=16, measured_ms=0.121),
    "jla gdn-hd128-1p3b step (16 x 4096): our gdn-1.3b, chunked path": dict(
        kind="train", preset="gdn-1.3b", impl="auto", vocab=128256, rows=16, measured_tokens_per_s=42995.0),
    "jla gdn-hd128-1p3b step (16 x 4096): our gdn-1.3b, Mosaic kernels": dict(
        kind="train", preset="gdn-1.3b", impl="pallas", vocab=128256, rows=16, measured_tokens_per_s=42995.0),
}


# ----------------------------------------------------------------------------------------------
# the parent: toolchains, then one child process per target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", nargs="+", default=["h100"],
                    help="h100, h200, a100, v5e, v6e (several: one after another)")
    ap.add_argument("--what", nargs="+", choices=("ops", "train"), default=["ops", "train"])
    ap.add_argument("--devices", nargs="+", type=int, choices=(1, 8), default=[1, 8], help="train-step meshes")
    ap.add_argument("--presets", nargs="+", default=list(TRAIN_PRESETS))
    ap.add_argument("--rows", type=int, help="train steps: compile this many rows per device instead of searching "
                    "for the most that fit")
    ap.add_argument("--impl", choices=("auto", "pallas"), default="auto",
                    help="the delta-rule path of the train step (pallas: the kernels, GPU targets)")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--paths", nargs="+", choices=PATHS, help="op paths (default: every one the target runs)")
    ap.add_argument("--shapes", nargs="+", type=_shape, help="op shapes as B,T,H,K (default: the GPU suite's)")
    ap.add_argument("--memory-fraction", type=float, default=0.9,
                    help="share of the chip memory a step may plan to use (0.9; JAX preallocates 0.75 on a GPU "
                         "unless XLA_PYTHON_CLIENT_MEM_FRACTION says more)")
    ap.add_argument("--quick", action="store_true", help="one small op program and one tiny train step (CI)")
    ap.add_argument("--calibrate", action="store_true", help="only the programs with published H100 timings")
    ap.add_argument("--top", type=int, default=5, help="kernels listed per program in the top-kernels table")
    ap.add_argument("--json", type=pathlib.Path, help="write every row here (one file per run, all targets)")
    ap.add_argument("--report", type=pathlib.Path, nargs="+", help="print the tables of saved --json files instead")
    ap.add_argument("--summary", action="store_true", help="with --report: the condensed tables across targets")
    args = ap.parse_args(argv)
    if os.environ.get("OSDN_AOT_CHILD"):
        return child(args)
    if args.report:
        saved = [r for path in args.report for r in json.loads(path.read_text())]
        (print_summary if args.summary else report)(saved, args.memory_fraction)
        return 0
    from osdn_jax.hardware import TARGETS  # noqa: PLC0415 (the parent needs no JAX backend)

    bad = [t for t in args.target if t not in TARGETS]
    if bad:
        ap.error(f"--target: unknown {bad}; expected some of {list(TARGETS)}")
    rows, status = [], 0
    for target in args.target:
        out = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"osdn-aot-{os.getpid()}-{target}.json"
        code = run_child(target, argv if argv is not None else sys.argv[1:], out)
        if out.exists():
            rows += json.loads(out.read_text())
            out.unlink()
        status = status or code
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return status


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected B,T,H,K (four positive integers), got {text!r}")
    return shape


def run_child(target: str, argv: list[str], out: pathlib.Path) -> int:
    """Compile for ``target`` in a child process that sees only that target's toolchain."""
    sys.path.insert(0, str(HERE))
    import toolchains

    from osdn_jax.hardware import chip

    platform = chip(target).platform
    try:
        root = toolchains.cuda() if platform == "gpu" else toolchains.tpu()
    except toolchains.ToolchainError as e:
        print(f"aot: cannot compile for {target}: {e}", file=sys.stderr)
        return 3
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "CUDA_VISIBLE", "XLA_FLAGS"))}
    env.update(JAX_PLATFORMS="cpu", OSDN_AOT_CHILD=target, OSDN_AOT_OUT=str(out),
               PYTHONPATH=os.pathsep.join(filter(None, [str(root / "site"), env.get("PYTHONPATH")])))
    if platform == "tpu":  # libtpu looks for a TPU VM's metadata unless told it is not on one, and
        # takes a machine-wide lock unless told that several processes may load it (no chip is used)
        env.update(TPU_SKIP_MDS_QUERY="1", TPU_ACCELERATOR_TYPE="v5litepod-4", TPU_WORKER_HOSTNAMES="localhost",
                   TPU_WORKER_ID="0", TF_CPP_MIN_LOG_LEVEL="3", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), *_drop_targets(argv)]
    return subprocess.run(command, env=env).returncode


def _drop_targets(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if a == "--target":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        if not a.startswith("--target="):
            out.append(a)
    return out


# ----------------------------------------------------------------------------------------------
# the child: devices of the target, programs, analysis


def gpu_target_config(c) -> str:
    """XLA's ``GpuTargetConfigProto`` (text) for the chip ``c``: what its GPU compiler reads."""
    g = c.gpu
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {g.core_count}
  fpus_per_core: {g.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(c.hbm_bandwidth)}
  l2_cache_size: {g.l2_cache_size}
  clock_rate_ghz: {g.clock_rate_ghz}
  device_memory_size: {c.hbm_bytes}
  shared_memory_per_block_optin: {g.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {g.compute_capability[0]} minor: {g.compute_capability[1]} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{c.device_kind}"
"""


def devices(c, n: int):
    """``n`` compile-only devices of chip ``c``."""
    from jax.experimental import topologies

    if c.platform == "gpu":
        topo = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{n}", target_config=gpu_target_config(c))
    else:
        topo = topologies.get_topology_desc(c.topology if n <= 4 else c.topology.replace("2x2", "2x4"), platform="tpu")
    if len(topo.devices) < n:
        raise RuntimeError(f"topology of {c.name} has {len(topo.devices)} devices, {n} asked")
    return topo.devices[:n]


@dataclasses.dataclass
class Compiled:
    """What one compile gives: memory (bytes per device) and the roofline."""

    memory: dict
    roof: object  # osdn_jax.perf.Roofline
    seconds: float

    @property
    def peak(self) -> int:
        return self.memory["peak"]


def compile_program(fn, args, c, dev, *, arch=None, family=None, mesh=None, donate=None, in_shardings=None,
                    out_shardings=None) -> Compiled:
    """``jax.jit(fn)`` compiled for chip ``c`` on abstract ``args`` (kernels traced for the GPU)."""
    import contextlib

    import jax

    from osdn_jax.kernels.config import kernel_target
    from osdn_jax.perf import analyze

    t = time.perf_counter()
    jit_kw = {} if in_shardings is None else dict(in_shardings=in_shardings, out_shardings=out_shardings)
    jitted = jax.jit(fn, donate_argnums=donate or (), **jit_kw)
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.default_device(dev))
        if c.platform == "gpu":
            stack.enter_context(kernel_target("gpu", arch=arch, family=family))
        if mesh is not None:
            stack.enter_context(jax.set_mesh(mesh))
        compiled = jitted.trace(*args).lower().compile()
    m = compiled.memory_analysis()
    memory = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
              "outputs": m.output_size_in_bytes - m.alias_size_in_bytes}
    memory["peak"] = sum(memory.values())
    memory["io"] = m.argument_size_in_bytes + m.output_size_in_bytes
    return Compiled(memory, analyze(compiled.as_text(), c), time.perf_counter() - t)


def summary(result: Compiled, top: int) -> dict:
    """The JSON row fields of one compiled program."""
    from osdn_jax.perf import label

    r = result.roof
    return dict(memory=result.memory, flops=r.flops, matmul_flops=r.matmul_flops, hbm_bytes=r.hbm_bytes,
                launches=r.launches, dynamic_launches=r.dynamic_launches, seconds=r.seconds,
                launch_seconds=r.seconds_with_launches,
                comm_seconds=r.comm_seconds, fp32_share=r.fp32_share,
                fp32_product_seconds=r.fp32_product_seconds, compile_seconds=result.seconds,
                notes=r.notes + r.uncounted(),
                top=[dict(kernel=label(k.kernel, 80), launches=k.kernel.count, seconds=k.seconds, bound=k.bound,
                          bytes=k.kernel.bytes * k.kernel.count, flops=sum(k.kernel.flops.values()) * k.kernel.count)
                     for k in r.top(top)])


# -- op programs -------------------------------------------------------------------------------


def op_paths(c) -> list[str]:
    if c.platform == "tpu":
        return ["chunked", "jla-chunked"]
    paths = ["chunked", "triton"]
    if c.gpu.compute_capability[0] >= 9:
        paths.append("mosaic")
    return paths + (["jla-mosaic", "jla-chunked"] if c.gpu.compute_capability[0] >= 9 else ["jla-chunked"])


def jla_module(kind: str):
    """jax-linear-attention's op module (``mosaic``: its Hopper kernels, told they run on one)."""
    if kind == "chunked":
        from jla.ops import chunked

        return chunked
    from jla.ops.mosaic_gpu import gated_delta_rule

    for module in list(sys.modules.values()):  # its kernels check for a local Hopper GPU at trace time
        if getattr(module, "__name__", "").startswith("jla") and hasattr(module, "is_hopper"):
            module.is_hopper = lambda: True
    return gated_delta_rule


def op_program(op: str, path: str, shape, mode: str, dev, documents: int = 0):
    """``(fn, args)``: the op's forward (returns o) or forward+backward (gradients of Σ o²)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from osdn_jax import get_preset, ops

    B, T, H, K = shape
    sh = SingleDeviceSharding(dev)
    x = lambda *s, d=jnp.bfloat16: jax.ShapeDtypeStruct(s, d, sharding=sh)  # noqa: E731
    a = dict(q=x(B, T, H, K), k=x(B, T, H, K), v=x(B, T, H, K), beta=x(B, T, H))
    gated = op in ("gdn", "os-gdn")
    if gated:
        a["log_decay"] = x(B, T, H, d=jnp.float32)
    if op.startswith("os"):
        a["d0"] = x(H, K, d=jnp.float32)
    seg = x(B, T, d=jnp.int32) if documents else None
    p = get_preset("may")

    def forward(a, seg):
        if path.startswith("jla"):
            m = jla_module(path.removeprefix("jla-"))
            extra = {} if seg is None else dict(segment_ids=seg)
            if gated:
                return m.gated_delta_rule(a["q"], a["k"], a["v"], a["log_decay"], a["beta"], **extra)[0]
            return m.delta_rule(a["q"], a["k"], a["v"], a["beta"], **extra)[0]
        impl = "chunked" if path == "chunked" else "pallas"
        if op.startswith("os"):
            return ops.osdn(a["q"], a["k"], a["v"], a["beta"], a["d0"], eta=p.eta, d_min=p.d_min, d_max=p.d_max,
                            log_decay=a.get("log_decay"), segment_ids=seg, impl=impl)[0]
        return ops.delta_rule(a["q"], a["k"], a["v"], a["beta"], log_decay=a.get("log_decay"), segment_ids=seg,
                              impl=impl)[0]

    if mode == "fwd":
        return forward, (a, seg)
    return jax.grad(lambda a, seg: jnp.sum(jnp.square(forward(a, seg).astype(jnp.float32)))), (a, seg)


def op_rows(c, args) -> list[dict]:
    from osdn_jax.kernels.config import ARCHS  # noqa: F401  (imports the kernels before jla patches)

    dev = devices(c, 1)[0]
    arch = None if c.platform != "gpu" else f"sm_{c.gpu.compute_capability[0]}0"
    shapes = [QUICK_OP_SHAPE] if args.quick else list(args.shapes or OP_SHAPES)
    ops_ = ["osdn"] if args.quick else args.ops
    paths = ["chunked"] if args.quick else [p for p in op_paths(c) if not args.paths or p in args.paths]
    rows = []
    for shape in shapes:
        for op in ops_:
            for mode in ("fwd", "fwd+bwd"):
                for path in paths:
                    if path.startswith("jla") and op.startswith("os"):
                        continue  # jla has no OSDN: its DeltaNet / GDN rows stand beside ours
                    rows.append(op_row(c, dev, arch, op, path, shape, mode, args.top))
    return rows


def op_row(c, dev, arch, op, path, shape, mode, top, documents=0) -> dict:
    row = dict(target=c.name, device_kind=dev.device_kind, kind="op", op=op, path=path, shape=list(shape), mode=mode,
               documents=documents)
    try:
        fn, fargs = op_program(op, path, shape, mode, dev, documents)
        family = path if path in ("triton", "mosaic") else None
        row.update(summary(compile_program(fn, fargs, c, dev, arch=arch, family=family), top))
    except Exception as e:  # a path this target or this environment cannot build: say why, go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print_op_row(row)
    return row


# -- train steps -------------------------------------------------------------------------------


def train_program(preset: str, rows_per_device: int, devs, vocab: int = 32000, seq_len: int = SEQ_LEN,
                  impl: str = "auto"):
    """``(fn, args, mesh, shardings, model config)`` of the trainer's step on a ``(data=1, fsdp=n,
    context=1)`` mesh; ``impl`` is the mixers' op path."""
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from osdn_jax import model_config
    from osdn_jax.train.step import abstract_train_step

    n = len(devs)
    mesh = Mesh(np.array(devs).reshape(1, n, 1), ("data", "fsdp", "context"), axis_types=(AxisType.Auto,) * 3)
    cfg = model_config(preset, vocab_size=vocab, max_seq_len=seq_len, remat=True, scan_layers=True)
    if impl != "auto":
        cfg = dataclasses.replace(cfg, mixer=dataclasses.replace(cfg.mixer, impl=impl))
    step, (params, opt_state, batch), (param_sh, opt_sh, batch_sh) = abstract_train_step(
        cfg, rows_per_device * n, seq_len, mesh=mesh)
    shardings = (param_sh, opt_sh, batch_sh)
    return step, (params, opt_state, batch), mesh, shardings, cfg


def step_compile(c, preset, rows, devs, vocab=32000, seq_len=SEQ_LEN, impl="auto") -> Compiled:
    step, args, mesh, shardings, _ = train_program(preset, rows, devs, vocab, seq_len, impl)
    return compile_program(step, args, c, devs[0], mesh=mesh, donate=(0, 1), in_shardings=shardings,
                           out_shardings=(shardings[0], shardings[1], None))


def refused_bytes(error: Exception) -> float | None:
    """The memory a refused compile said it needed (TPU: "the total memory required for HLO
    temporaries (23.76G) exceeds available HBM"): a lower bound on its peak, in bytes; None where
    ``error`` is not such a refusal."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    m = re.search(r"required for [^(]*\(([0-9.]+)([KMGT])\)", text)
    if m is None:
        return float("inf")
    return float(m.group(1)) * 1024 ** " KMGT".index(m.group(2))


def largest_batch(peak_of, budget: float, limit: int = 1024) -> tuple[int, dict]:
    """The most rows per device whose compiled peak fits ``budget``. Memory grows about linearly with
    the rows, so a line through the compiles guesses the boundary (from 1 and 4 rows, then through
    the closest fitting and failing counts), and the count next to the guess is compiled too, which
    settles it when the line was right; where it was not, the next guess is the midpoint.
    ``peak_of(rows)`` → bytes. Typically four compiles."""
    seen = {}

    def fits(b):
        if b not in seen:
            seen[b] = peak_of(b)
            print(f"  rows {b}: peak {seen[b] / GiB:.2f} GiB", file=sys.stderr, flush=True)
        return seen[b] <= budget

    if not fits(1):
        return 0, seen
    lo, hi, width_before = 1, None, None
    if fits(4):
        lo = 4
    else:
        hi = 4
    while hi is None or hi - lo > 1:
        if hi is None:  # the local slope: through the two largest counts that fit
            below = max(x for x in seen if x < lo)
            slope = (seen[lo] - seen[below]) / (lo - below)
            b = min(max(lo + int((budget - seen[lo]) // slope) if slope > 0 else 2 * lo, lo + 1), limit)
        else:
            slope = (seen[hi] - seen[lo]) / (hi - lo)
            b = min(max(lo + int((budget - seen[lo]) // slope), lo + 1), hi - 1)
            if width_before is not None and hi - lo > width_before / 2:  # the line did not halve it
                b = (lo + hi) // 2
        width_before = None if hi is None else hi - lo
        if fits(b):
            lo = b
            if hi is None and b >= limit:
                return lo, seen
            neighbour = b + 1
        else:
            hi, neighbour = b, b - 1
        if lo < neighbour < (hi if hi is not None else limit + 1):
            if fits(neighbour):
                lo = neighbour
            else:
                hi = neighbour
    return lo, seen


def train_rows(c, args) -> list[dict]:
    from osdn_jax.flops import flops_per_token

    budget = args.memory_fraction * c.hbm_bytes
    presets = ["tiny"] if args.quick else args.presets
    counts = [1] if args.quick else args.devices
    seq_len = QUICK_SEQ_LEN if args.quick else SEQ_LEN
    rows = []
    for n in counts:
        devs = devices(c, n)
        for preset in presets:
            row = dict(target=c.name, device_kind=devs[0].device_kind, kind="train", preset=preset, devices=n,
                       seq_len=seq_len, impl=args.impl,
                       budget=budget, memory_fraction=args.memory_fraction)
            try:
                if args.quick or args.rows:  # a fixed batch
                    rows_fit, tried = (2 if args.quick else args.rows), {}
                    result = step_compile(c, preset, rows_fit, devs, vocab=512 if args.quick else 32000,
                                          seq_len=seq_len, impl=args.impl)
                else:
                    cache = {}

                    def peak(b):
                        try:
                            cache[b] = step_compile(c, preset, b, devs, impl=args.impl)
                        except Exception as e:  # TPU compilers refuse a program that does not fit
                            if (needed := refused_bytes(e)) is None:
                                raise
                            return needed
                        return cache[b].peak

                    rows_fit, tried = largest_batch(peak, budget)
                    result = cache.get(rows_fit) or cache.get(1)
                row.update(rows_per_device=rows_fit, tried={str(k): v for k, v in tried.items()})
                if result is None:  # not even one row compiled
                    print_train_row(row)
                    rows.append(row)
                    continue
                row.update(summary(result, args.top))
                timed_rows = max(rows_fit, 1)
                _, _, _, _, cfg = train_program(preset, 1, devs[:1], vocab=512 if args.quick else 32000,
                                                seq_len=seq_len)
                tokens = timed_rows * n * seq_len
                row["tokens_per_s"] = tokens / row["seconds"]
                row["flops_per_token"] = flops_per_token(cfg, seq_len)
                row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / (c.dense_bf16 * n)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print_train_row(row)
            rows.append(row)
    return rows


# -- calibration against published H100 timings --------------------------------------------------


def calibration_rows(c, args) -> list[dict]:
    from osdn_jax.flops import flops_per_token

    rows = []
    dev = devices(c, 1)[0]
    for name, spec in CALIBRATION.items():
        if spec["kind"] == "op":
            row = op_row(c, dev, "sm_90", spec["op"], spec["path"], spec["shape"], "fwd+bwd", args.top,
                         spec["documents"])
            row.update(kind="calibration", name=name, measured_ms=spec["measured_ms"],
                       predicted_ms=row.get("seconds", float("nan")) * 1e3)
        else:
            row = dict(target=c.name, kind="calibration", name=name)
            try:
                result = step_compile(c, spec["preset"], spec["rows"], [dev], spec["vocab"], impl=spec["impl"])
                row.update(summary(result, args.top))
                _, _, _, _, cfg = train_program(spec["preset"], 1, [dev], spec["vocab"])
                row["predicted_tokens_per_s"] = spec["rows"] * SEQ_LEN / row["seconds"]
                row["measured_tokens_per_s"] = spec["measured_tokens_per_s"]
                row["flops_per_token"] = flops_per_token(cfg, SEQ_LEN)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    print_calibration(rows)
    return rows


def print_calibration(rows: list[dict]) -> None:
    print("\ncalibration: the prediction beside published H100 measurements (the model is a lower bound on time)")
    print("| measurement | measured | predicted | measured / predicted time |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | | error: {r['error']} | |")
        elif "measured_ms" in r:
            print(f"| {r['name']} | {r['measured_ms']:.3f} ms | {r['predicted_ms']:.3f} ms | "
                  f"{r['measured_ms'] / r['predicted_ms']:.2f} |")
        else:
            ratio = r["predicted_tokens_per_s"] / r["measured_tokens_per_s"]
            print(f"| {r['name']} | {r['measured_tokens_per_s']:,.0f} tokens/s | {r['predicted_tokens_per_s']:,.0f} "
                  f"tokens/s | {ratio:.2f} |")


# -- printing ----------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 1 else f"{s * 1e3:,.0f}"


def print_op_header(c) -> None:
    print(f"\nops on one {c.title} (predicted: compiled, not run); bf16 inputs, 'may' preset for OSDN")
    print("| op | path | B, T, H, K | mode | peak MiB | matmul GFLOP | HBM GB | bytes/token | × min | launches "
          "| fp32 products ms | fp32 share | roofline ms | with launches ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def print_op_row(r: dict) -> None:
    shape = ", ".join(str(s) for s in r["shape"])
    if "error" in r:
        print(f"| {r['op']} | {r['path']} | {shape} | {r['mode']} | n/a: {r['error']} | | | | | | | | | |", flush=True)
        return
    B, T = r["shape"][:2]
    mem = r["memory"]
    print(f"| {r['op']} | {r['path']} | {shape} | {r['mode']} | {mem['peak'] / 2**20:,.0f} | "
          f"{r['matmul_flops'] / 1e9:,.1f} | {r['hbm_bytes'] / 1e9:.2f} | {r['hbm_bytes'] / (B * T):,.0f} | "
          f"{r['hbm_bytes'] / mem['io']:.1f} | {r['launches']:,} | {_ms(r['fp32_product_seconds'])} | "
          f"{r['fp32_share']:.0%} | {_ms(r['seconds'])} | {_launch_ms(r)} |", flush=True)


def _launch_ms(r: dict) -> str:
    return _ms(r["launch_seconds"]) if "launch_seconds" in r else "-"


def print_train_header(c, fraction: float, seq_len: int) -> None:
    print(f"\ntraining step on {c.title} (predicted: compiled, not run): T = {seq_len}, remat, scanned layers, "
          f"chunked loss, AdamW; fits = peak <= {fraction:.2f} x {c.hbm_bytes / GiB:.1f} GiB")
    print("| preset | path | devices | rows/device | peak GiB | step TFLOP | HBM GB | launches | fp32 share | link ms "
          "| step ms | tokens/s | MFU | step ms with launches |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _needs(peak: float) -> str:
    return "more than the chip has" if peak == float("inf") else f"at least {peak / GiB:.1f} GiB"


def print_train_row(r: dict) -> None:
    if "error" in r:
        print(f"| {r['preset']} | {r.get('impl', 'auto')} | {r['devices']} | n/a: {r['error']} | | | | | | | | | | |",
              flush=True)
        return
    if r["rows_per_device"] == 0:
        print(f"| {r['preset']} | {r.get('impl', 'auto')} | {r['devices']} | 0 (1 row needs {_needs(r['tried']['1'])}) "
              "| | | | | | | | | | |", flush=True)
        return
    print(f"| {r['preset']} | {r.get('impl', 'auto')} | {r['devices']} | {r['rows_per_device']} | "
          f"{r['memory']['peak'] / GiB:.1f} | "
          f"{r['matmul_flops'] / 1e12:,.1f} | {r['hbm_bytes'] / 1e9:,.0f} | {r['launches']:,} | "
          f"{r['fp32_share']:.0%} | "
          f"{_ms(r['comm_seconds'])} | {_ms(r['seconds'])} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
          f"{_launch_ms(r)} |", flush=True)


def print_top(rows: list[dict]) -> None:
    print("\ntop kernels by predicted time (fwd+bwd programs of the first shape, and each train step)")
    print("| program | kernel | launches | ms | bound |")
    print("|---|---|---|---|---|")
    first = None
    for r in rows:
        if "top" not in r:
            continue
        if r["kind"] == "op":
            first = first or r["shape"]
            if r["mode"] != "fwd+bwd" or r["shape"] != first:
                continue
            name = f"{r['op']} {r['path']}"
        else:
            name = f"{r['preset']} x{r['devices']}"
        for k in r["top"]:
            print(f"| {name} | {k['kernel']} | {k['launches']:,} | {_ms(k['seconds'])} | {k['bound']} |")


def print_chip(c) -> None:
    peaks = ", ".join(f"{k} {v / 1e12:,.0f}" for k, v in c.peaks.items())
    print(f"\n# {c.title}: peak TFLOP/s {peaks}; HBM {c.hbm_bytes / GiB:.1f} GiB at {c.hbm_bandwidth / 1e12:.2f} TB/s; "
          f"link {c.link_bandwidth / 1e9:.0f} GB/s ({c.source}). Figures are predictions from compiling.", flush=True)


def report(rows: list[dict], fraction: float) -> None:
    """The tables of saved rows, target by target."""
    from osdn_jax.hardware import chip

    for target in dict.fromkeys(r["target"] for r in rows):
        c, mine = chip(target), [r for r in rows if r["target"] == target]
        print_chip(c)
        ops_, train, cal = ([r for r in mine if r["kind"] == k] for k in ("op", "train", "calibration"))
        if ops_:
            print_op_header(c)
            for r in ops_:
                print_op_row(r)
        if train:
            print_train_header(c, train[0].get("memory_fraction", fraction), train[0]["seq_len"])
            for r in train:
                print_train_row(r)
        if ops_ or train:
            print_top(ops_ + train)
        if cal:
            print_calibration(cal)


def _jla_peer(rows, r):
    """The jax-linear-attention Mosaic row beside ``r`` (same target, shape, mode; its DeltaNet for
    OSDN, its GDN for OS-GDN), or None."""
    op = {"osdn": "deltanet", "os-gdn": "gdn"}.get(r["op"], r["op"])
    return next((x for x in rows if x["kind"] == "op" and x["path"] == "jla-mosaic" and x["op"] == op
                 and x["target"] == r["target"] and x["shape"] == r["shape"] and x["mode"] == r["mode"]
                 and "error" not in x), None)


def print_summary(rows: list[dict], fraction: float) -> None:
    """Condensed tables across targets: HBM bytes per token against the minimum and
    jax-linear-attention, predicted times per path and target, and the training steps."""
    ops_ = [r for r in rows if r["kind"] == "op" and "error" not in r]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    shape = list(OP_SHAPES[0])
    first = next((r["target"] for r in ops_ if r["target"] in ("h100", "h200")), targets[0] if targets else None)
    print(f"\nHBM bytes per token, B, T, H, K = {shape}, bf16 ({first}; predicted: compiled, not run). "
          "× min: over the program's own inputs and outputs; × jla: over jax-linear-attention's Mosaic "
          "DeltaNet / GDN at the same shape")
    print("| op | path | fwd bytes/token | fwd × min | fwd × jla | f+b bytes/token | f+b × min | f+b × jla |")
    print("|---|---|---|---|---|---|---|---|")
    for op in OPS:
        for path in PATHS:
            cells = []
            for mode in ("fwd", "fwd+bwd"):
                r = next((x for x in ops_ if x["target"] == first and x["op"] == op and x["path"] == path
                          and x["mode"] == mode and x["shape"] == shape), None)
                if r is None:
                    cells += ["-", "-", "-"]
                    continue
                peer = _jla_peer(ops_, r)
                per_token = r["hbm_bytes"] / (shape[0] * shape[1])
                cells += [f"{per_token:,.0f}", f"{r['hbm_bytes'] / r['memory']['io']:.1f}",
                          f"{r['hbm_bytes'] / peer['hbm_bytes']:.1f}" if peer else "-"]
            if any(c != "-" for c in cells):
                print(f"| {op} | {path} | " + " | ".join(cells) + " |")
    print(f"\npredicted forward+backward ms, B, T, H, K = {shape}, bf16 (roofline, a lower bound; launches in "
          "parentheses); × jla: over jax-linear-attention's Mosaic kernels on the same chip")
    print("| op | path | " + " | ".join(targets) + " | × jla |")
    print("|---|---|" + "---|" * len(targets) + "---|")
    for op in OPS:
        for path in PATHS:
            cells, ratio = [], "-"
            for t in targets:
                r = next((x for x in ops_ if x["target"] == t and x["op"] == op and x["path"] == path
                          and x["mode"] == "fwd+bwd" and x["shape"] == shape), None)
                cells.append("-" if r is None else f"{_ms(r['seconds'])} ({r['launches']:,})")
                peer = None if r is None else _jla_peer(ops_, r)
                if peer is not None and ratio == "-" and path != "jla-mosaic":
                    ratio = f"{r['seconds'] / peer['seconds']:.1f} ({t})"
            if any(c != "-" for c in cells):
                print(f"| {op} | {path} | " + " | ".join(cells) + f" | {ratio} |")
    shapes = [list(x) for x in OP_SHAPES]
    print(f"\nevery shape on {first}, forward+backward: predicted ms (x jax-linear-attention's Mosaic kernels) and HBM "
          "bytes per token (x the minimum)")
    print("| op | path | " + " | ".join(f"B, T, H, K = {', '.join(map(str, s))} | bytes/token" for s in shapes) + " |")
    print("|---|---|" + "---|---|" * len(shapes))
    for op in OPS:
        for path in PATHS:
            cells = []
            for s in shapes:
                r = next((x for x in ops_ if x["target"] == first and x["op"] == op and x["path"] == path
                          and x["mode"] == "fwd+bwd" and x["shape"] == s), None)
                if r is None:
                    cells += ["-", "-"]
                    continue
                peer = None if path == "jla-mosaic" else _jla_peer(ops_, r)
                cells += [_ms(r["seconds"]) + (f" ({r['seconds'] / peer['seconds']:.1f})" if peer else ""),
                          f"{r['hbm_bytes'] / (s[0] * s[1]):,.0f} ({r['hbm_bytes'] / r['memory']['io']:.1f})"]
            if any(c != "-" for c in cells):
                print(f"| {op} | {path} | " + " | ".join(cells) + " |")
    print(f"\nfp32 / HIGHEST products in the default path (chunked), forward+backward, B, T, H, K = {shape}: "
          "their FLOPs, the time they alone take at the chip's fp32 (GPU CUDA cores) or 6-pass bf16 (TPU) "
          "rate, and the share of the predicted time spent in compute-bound fp32 products")
    print("| op | chip | predicted ms | fp32 GFLOP | fp32 products alone ms | share of the time |")
    print("|---|---|---|---|---|---|")
    for op in ("deltanet", "osdn"):
        for t in targets:
            r = next((x for x in ops_ if x["target"] == t and x["op"] == op and x["path"] == "chunked"
                      and x["mode"] == "fwd+bwd" and x["shape"] == shape), None)
            if r is not None:
                fp32 = sum(v for k, v in r["flops"].items() if k in ("fp32", "bf16_6x"))
                print(f"| {op} | {t} | {_ms(r['seconds'])} | {fp32 / 1e9:,.1f} | {_ms(r['fp32_product_seconds'])} "
                      f"| {r['fp32_share']:.0%} |")
    train = [r for r in rows if r["kind"] == "train"]
    if train:
        print(f"\ntraining steps (T = {train[0]['seq_len']}, remat, scanned layers; most rows per device with a peak "
              f"<= {train[0].get('memory_fraction', fraction):.2f} of the chip's memory; predicted)")
        print("| preset | chip | path | devices | rows/device | peak GiB | step s | tokens/s per device | MFU "
              "| launches |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in train:
            if "error" in r or not r.get("rows_per_device"):
                why = r.get("error") or f"1 row needs {_needs(r['tried']['1'])}"
                print(f"| {r['preset']} | {r['target']} | {r.get('impl', 'auto')} | {r['devices']} | 0 ({why}) "
                      "| | | | | |")
                continue
            print(f"| {r['preset']} | {r['target']} | {r.get('impl', 'auto')} | {r['devices']} | "
                  f"{r['rows_per_device']} | {r['memory']['peak'] / GiB:.1f} | {r['seconds']:.2f} | "
                  f"{r['tokens_per_s'] / r['devices']:,.0f} | {r['mfu']:.1%} | {r['launches']:,} |")


def child(args) -> int:

    from osdn_jax.hardware import chip

    c = chip(os.environ["OSDN_AOT_CHILD"])
    print_chip(c)
    rows = []
    if args.calibrate:
        rows += calibration_rows(c, args)
    else:
        if "ops" in args.what:
            print_op_header(c)
            rows += op_rows(c, args)
        if "train" in args.what:
            print_train_header(c, args.memory_fraction, QUICK_SEQ_LEN if args.quick else SEQ_LEN)
            rows += train_rows(c, args)
        print_top(rows)
    notes = sorted({n for r in rows for n in r.get("notes", [])})
    if notes:
        print("\nnotes: " + "; ".join(notes[:12]))
    pathlib.Path(os.environ["OSDN_AOT_OUT"]).write_text(json.dumps(rows))
    return 1 if any("error" in r and r.get("path", "").startswith(("chunked", "triton", "mosaic")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
