"""GPU suite, part 2: forward and forward+backward time beside the predicted time, achieved TFLOP/s
and peak memory of the Pallas kernels of both families (Triton; Mosaic GPU, bf16 only) against
the chunked XLA path and, where importable, flash-linear-attention (Triton, PyTorch) and
jax-linear-attention (Mosaic GPU), for bf16 inputs and fp32 inputs (TF32 policy, Triton only).
Run through ``benchmarks/gpu_suite.sh``.

    python benchmarks/gpu_suite.py                  # the full table, on a GPU
    python benchmarks/gpu_suite.py --dtypes bf16    # bf16 rows only
    python benchmarks/gpu_suite.py --families mosaic
    python benchmarks/gpu_suite.py --smoke          # tiny shapes on any backend: checks the script runs

Mosaic rows add "triton f+b x": the Triton family's time on the same inputs over the Mosaic
family's. OSDN rows compare with the peers' DeltaNet (OSDN is DeltaNet plus the preconditioner; the
target is OSDN within 1.1× of jax-linear-attention's DeltaNet and 1.5× faster than fla's).

Times are medians (ms) of ``--repeats`` calls after warm-up, with ``block_until_ready`` (JAX) or
``torch.cuda.synchronize`` (PyTorch), measured in one process. TFLOP/s counts the chunkwise
algorithm's matmul work (forward; forward+backward counted as 3x forward). Beside each measured
time of our programs stands the prediction of ``osdn_jax.perf`` for the very program that ran
(its optimized HLO read on this GPU's peaks from ``osdn_jax.hardware``; the roofline is a lower
bound, ``benchmarks/aot.py`` prints the same without a GPU): "pred" columns, and "meas/pred" = the
measured over the predicted time, the number that calibrates the model. Ratios are "their time /
our time": ≥ 1 means our kernels are at least as fast.

Then context parallelism (``osdn_jax.ops.context``): a training step (forward+backward) of
``ops.osdn`` and of a small ``CausalLM`` with the time axis split over every local device (mesh
``(data=1, context=n)``), against the same step on one device: both times, measured in turn in
this process, their ratio, and XLA's per-device peak memory of each program. It needs two or more
local devices and says "skipped" otherwise; ``--smoke`` gives the CPU 2 fake devices, so the smoke
run takes this path too.
"""

from __future__ import annotations

import argparse
import functools
import os

# On a CPU (--smoke) the Mosaic rows run in Mosaic GPU's interpreter, which needs a CPU thread pool
# of 4 or more (osdn_jax.kernels.mosaic.delta_rule); XLA sizes it by NPROC, read when JAX starts.
os.environ.setdefault("NPROC", str(max(8, os.cpu_count() or 1)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from osdn_jax import get_preset, ops  # noqa: E402
from osdn_jax.compare import interleaved_seconds, make_op_inputs, median_seconds, peak_mib  # noqa: E402
from osdn_jax.hardware import chip, chip_for_kind  # noqa: E402
from osdn_jax.kernels.preconditioner import preconditioner_pallas  # noqa: E402
from osdn_jax.perf import analyze  # noqa: E402

CONFIGS = [(8, 2048, 16, 128), (4, 4096, 16, 128), (2, 8192, 16, 128), (8, 4096, 8, 64)]
SMOKE = [(1, 96, 2, 32)]
# Context parallelism: (B, T, H, K) of the op row; (preset, layers, B, T) of the model row.
CONTEXT_OP, CONTEXT_MODEL = (1, 32768, 16, 128), ("osdn-340m", 4, 1, 16384)
CONTEXT_SMOKE_OP, CONTEXT_SMOKE_MODEL = (1, 256, 2, 32), ("tiny", 1, 1, 256)
SMOKE_CPU_DEVICES = 2


def chunk_flops(B, T, H, K, V, C=64) -> float:
    """Forward matmul FLOPs of the chunkwise algorithm (A, T⁻¹, W, U, states, outputs)."""
    per_chunk = 3 * 2 * C * C * K + 2 * 2 * C * C * V + 3 * 2 * C * K * V + C**3 / 3
    return B * H * (T / C) * per_chunk


DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def predicted_ms(compiled, target) -> str:
    """The roofline time (ms) of a compiled program on ``target`` (an ``osdn_jax.hardware.Chip``; "-"
    where the device is not in the table)."""
    if target is None:
        return "-"
    return f"{analyze(compiled.as_text(), target).seconds * 1e3:.3f}"


def timed_ms(fn, repeats) -> float:
    return 1e3 * median_seconds(fn, repeats, warmup=2)


def ratio(theirs, ours, repeats) -> float:
    """Their time / our time, the two called in turn in this process."""
    t_theirs, t_ours = interleaved_seconds([theirs, ours], repeats, warmup=2)
    return t_theirs / t_ours


def jax_case(op, impl, a, chunk, family=None):
    """(forward fn, forward+backward fn, compiled fwd+bwd) for our paths, inputs as a dict;
    ``family`` forces the kernel family (traced and compiled under it)."""
    if family is not None:
        target = "gpu" if jax.default_backend() == "gpu" else "interpret"
        with ops.kernel_target(target, family=family):
            return jax_case(op, impl, a, chunk)
    p = get_preset("may")

    def forward(a):
        if op == "osdn":
            return ops.osdn(a["q"], a["k"], a["v"], a["beta"], a["d0"], eta=p.eta, d_min=p.d_min, d_max=p.d_max,
                            chunk_size=chunk, impl=impl)[0]
        return ops.delta_rule(a["q"], a["k"], a["v"], a["beta"], log_decay=a.get("log_decay"), chunk_size=chunk,
                              impl=impl)[0]

    fwd = jax.jit(forward).lower(a).compile()  # compiled here: under the caller's kernel target
    fb = jax.jit(jax.grad(lambda a: jnp.sum(forward(a).astype(jnp.float32) ** 2)))
    compiled = fb.lower(a).compile()
    return (lambda: jax.block_until_ready(fwd(a))), (lambda: jax.block_until_ready(compiled(a))), (fwd, compiled)


def fla_case(op, a):
    """flash-linear-attention's Triton chunk kernels under PyTorch, on the same inputs."""
    import torch

    if op in ("deltanet", "osdn"):  # OSDN against fla's DeltaNet
        from fla.ops.delta_rule import chunk_delta_rule as kernel
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as kernel
    dev = torch.device("cuda")
    t = {n: torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(dev) for n, x in a.items() if n != "d0"}
    dt = torch.bfloat16 if a["q"].dtype == jnp.bfloat16 else torch.float32
    q, k, v, beta = (t[n].to(dt).requires_grad_() for n in ("q", "k", "v", "beta"))
    g = t["log_decay"].requires_grad_() if op == "gdn" else None

    def forward():
        return kernel(q, k, v, beta) if g is None else kernel(q, k, v, g, beta)

    def fwd():
        with torch.no_grad():
            forward()
        torch.cuda.synchronize()

    def fb():
        o = forward()[0]
        (o.float() ** 2).sum().backward()
        torch.cuda.synchronize()

    def peak():
        torch.cuda.reset_peak_memory_stats()
        fb()
        return torch.cuda.max_memory_allocated() / 2**20

    return fwd, fb, peak


def jla_case(op, a):
    from jla.ops.mosaic_gpu import gated_delta_rule as jla_gdr

    def forward(a):
        if op in ("deltanet", "osdn"):  # OSDN against jla's DeltaNet
            return jla_gdr.delta_rule(a["q"], a["k"], a["v"], a["beta"])[0]
        return jla_gdr.gated_delta_rule(a["q"], a["k"], a["v"], a["log_decay"], a["beta"])[0]

    fwd = jax.jit(forward)
    fb = jax.jit(jax.grad(lambda a: jnp.sum(forward(a).astype(jnp.float32) ** 2)))
    return (lambda: jax.block_until_ready(fwd(a))), (lambda: jax.block_until_ready(fb(a)))


# -- context parallelism: one step with time split over every local device, against one device ------

def context_mesh(n: int):
    """The mesh ``(data=1, context=n)`` over the first ``n`` local devices (``n = 1``: one device, where
    the ops take their usual path)."""
    return jax.make_mesh((1, n), ("data", "context"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.local_devices()[:n])


def packed_segments(B: int, T: int) -> jax.Array:
    """``[B, T]`` segment ids: three documents per row, whose boundaries fall inside device slices."""
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) * 3 // T, (B, T))


def osdn_step(B, T, H, K, dtype, chunk):
    """``(loss(whole, timed, ints), whole, timed, ints)`` of ``ops.osdn`` (the 'may' preset, packed rows)."""
    p = get_preset("may")
    a = make_op_inputs("osdn", B, T, H, K, K, dtype=dtype)
    d0 = a.pop("d0")

    def loss(whole, timed, ints):
        o = ops.osdn(timed["q"], timed["k"], timed["v"], timed["beta"], whole["d0"], eta=p.eta, d_min=p.d_min,
                     d_max=p.d_max, segment_ids=ints["segment_ids"], chunk_size=chunk)[0]
        return jnp.sum(jnp.square(o.astype(jnp.float32)))

    return loss, {"d0": d0}, a, {"segment_ids": packed_segments(B, T)}


def model_step(preset, layers, B, T):
    """``(loss(params, timed, batch), params, {}, batch)``: a CausalLM's next-token cross-entropy on
    packed rows of random tokens."""
    import optax
    from flax import nnx

    from osdn_jax.model import CausalLM, model_config

    cfg = model_config(preset, num_layers=layers, max_seq_len=T)  # both presets have an OSDN mixer
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T + 1), 0, cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": packed_segments(B, T)}

    def loss(params, timed, batch):
        logits = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]))

    return loss, params, {}, batch


def context_run(loss, whole, timed, ints, n: int):
    """(timed call, compiled) of the jitted gradient of ``loss`` w.r.t. ``whole`` and ``timed`` on
    ``n`` devices: ``whole`` replicated, ``timed`` and ``ints`` ``[B, T, ...]`` split along T."""
    mesh = context_mesh(n)
    put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))  # noqa: E731
    args = (put(whole, P()), put(timed, P(None, "context")), put(ints, P(None, "context")))
    with jax.set_mesh(mesh):  # the ops find the context axis while tracing
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return (lambda: jax.block_until_ready(compiled(*args))), compiled


def context_rows(smoke: bool, dtype: str, repeats: int, chunk: int) -> None:
    """The context-parallel table, or one line saying why it is skipped."""
    n = jax.local_device_count()
    kind = jax.devices()[0].device_kind
    if n < 2:
        print(f"context parallelism: skipped ({n} local device, {kind}; it needs 2 or more)")
        return
    B, T, H, K = CONTEXT_SMOKE_OP if smoke else CONTEXT_OP
    preset, layers, mB, mT = CONTEXT_SMOKE_MODEL if smoke else CONTEXT_MODEL
    steps = {
        f"op: osdn {dtype}": (f"{B}, {T}, {H}, {K}", functools.partial(osdn_step, B, T, H, K, DTYPES[dtype], chunk)),
        f"model: {preset}, {layers} layers": (f"{mB}, {mT}", functools.partial(model_step, preset, layers, mB, mT)),
    }
    print(f"\ncontext parallelism over {n} devices ({kind}), mesh (data=1, context={n}): forward+backward, "
          f"time split over context vs the whole step on one device; speed-up = 1-device time / {n}-device time")
    print("| step | B, T(, H, K) | 1-device f+b ms | context f+b ms | speed-up | 1-device MiB | per-device MiB "
          "| memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (shape, make) in steps.items():
        case = make()
        one, one_compiled = context_run(*case, 1)
        many, many_compiled = context_run(*case, n)
        t_one, t_many = interleaved_seconds([one, many], repeats, warmup=2)
        m_one, m_many = peak_mib(one_compiled), peak_mib(many_compiled)
        print(f"| {name} | {shape} | {1e3 * t_one:.2f} | {1e3 * t_many:.2f} | {t_one / t_many:.2f} | {m_one:.0f} "
              f"| {m_many:.0f} | {m_many / m_one:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ops", nargs="+", default=["deltanet", "gdn", "osdn"])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    ap.add_argument("--families", nargs="+", choices=["triton", "mosaic"], default=["triton", "mosaic"])
    ap.add_argument("--chip", help="predict on this chip's peaks (osdn_jax.hardware; default: the GPU's own)")
    args = ap.parse_args()
    if args.smoke:  # before any device is touched: the context rows then run on the CPU too
        jax.config.update("jax_num_cpu_devices", SMOKE_CPU_DEVICES)
    configs = SMOKE if args.smoke else CONFIGS
    repeats = 3 if args.smoke else args.repeats
    chunk = 32 if args.smoke else 64
    target = chip(args.chip) if args.chip else chip_for_kind(jax.devices()[0].device_kind)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), chunk {chunk}; "
          f"fp32 rows use the TF32 policy; predictions on {target.title if target else 'no known chip'}")
    print("| op | family | dtype | B, T, H, K | pallas fwd ms | pred fwd ms | pallas f+b ms | pred f+b ms | meas/pred "
          "| f+b TFLOP/s | chunked f+b ms | chunked pred ms | chunked f+b x | triton f+b x | fla f+b x | jla f+b x "
          "| pallas MiB | fla MiB | phase 1 share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = ((o, f, d, c) for o in args.ops for f in args.families for d in args.dtypes for c in configs)
    for op, family, dtype, (B, T, H, K) in rows:
        if family == "mosaic" and dtype != "bf16":
            continue  # the Mosaic family takes bf16 / fp16 inputs only
        C = 64 if family == "mosaic" else chunk
        a = make_op_inputs(op, B, T, H, K, K, dtype=DTYPES[dtype])
        fwd, fb, (fwd_compiled, compiled) = jax_case(op, "pallas", a, C, family)
        t_fwd, t_fb = timed_ms(fwd, repeats), timed_ms(fb, repeats)
        pred_fwd, pred_fb = predicted_ms(fwd_compiled, target), predicted_ms(compiled, target)
        tflops = 3 * chunk_flops(B, T, H, K, K, C) / (t_fb * 1e-3) / 1e12
        _, chunked_fb, (_, chunked_compiled) = jax_case(op, "chunked", a, C)
        t_chunked, pred_chunked = timed_ms(chunked_fb, repeats), predicted_ms(chunked_compiled, target)
        ratios = {"chunked": ratio(chunked_fb, fb, repeats), "triton": None}
        if family == "mosaic":
            ratios["triton"] = ratio(jax_case(op, "pallas", a, C, "triton")[1], fb, repeats)
        fla_mib = "-"
        for name, make in (("fla", fla_case), ("jla", jla_case)):
            try:
                case = make(op, a)
                ratios[name] = ratio(case[1], fb, repeats)
                if name == "fla" and T == 8192:
                    fla_mib = f"{case[2]():.0f}"
            except Exception as e:  # not importable here, or unsupported: say so, keep going
                ratios[name] = f"n/a ({type(e).__name__})"
        share = "-"
        if op == "osdn":
            p = get_preset("may")
            ph1 = jax.jit(jax.grad(lambda k, d0: jnp.sum(preconditioner_pallas(
                k, d0, eta=p.eta, d_min=p.d_min, d_max=p.d_max)[0] ** 2), argnums=(0, 1)))
            share = f"{timed_ms(lambda: jax.block_until_ready(ph1(a['k'], a['d0'])), repeats) / t_fb:.1%}"
        fmt = lambda r: "-" if r is None else (r if isinstance(r, str) else f"{r:.2f}")  # noqa: E731
        mib = f"{peak_mib(compiled):.0f}" if T == 8192 or args.smoke else "-"
        vs = "-" if pred_fb == "-" else f"{t_fb / float(pred_fb):.2f}"
        print(f"| {op} | {family} | {dtype} | {B}, {T}, {H}, {K} | {t_fwd:.2f} | {pred_fwd} | {t_fb:.2f} | {pred_fb} "
              f"| {vs} | {tflops:.1f} | {t_chunked:.2f} | {pred_chunked} | {fmt(ratios['chunked'])} "
              f"| {fmt(ratios['triton'])} | {fmt(ratios['fla'])} | {fmt(ratios['jla'])} | {mib} | {fla_mib} "
              f"| {share} |",
              flush=True)
    context_rows(args.smoke, args.dtypes[0], repeats, chunk)


if __name__ == "__main__":
    main()
