"""Training throughput: tokens/s and estimated model FLOP utilisation (MFU) of full training steps
(forward, backward, AdamW update; the same step `python -m osdn_jax.train` runs).

    python benchmarks/train_throughput.py                       # CPU: `tiny`, every mixer
    python benchmarks/train_throughput.py --presets osdn-340m deltanet-340m --seq-len 4096 \
        --batch 8 --compute-dtype bfloat16                      # one GPU (H200)

FLOPs per token: `osdn_jax.flops.flops_per_token` (the formula is in that module's docstring: 6 × the
matmul parameters plus the chunked delta rule, ≈ 3 × (6·K·V + 4·C·K + 4·C·V) per layer and head, and
causal attention where the model has it). MFU divides by the device's peak: on a CPU the measured
throughput of a large fp32 matmul on this machine, on a GPU the nominal dense peak of the compute
dtype from `osdn_jax.flops.PEAK_TFLOPS` (H200: 989 TFLOP/s bf16, 494 TFLOP/s tf32/fp32 tensor
cores; the H200's when the GPU is not in the table). On a GPU in `osdn_jax.hardware`'s table,
"pred ms" is `osdn_jax.perf`'s roofline time of the very step that ran (a lower bound;
docs/performance.md), so that a GPU run calibrates the predictions of `benchmarks/aot.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from osdn_jax import CausalLM, count_params, model_config
from osdn_jax.compare import median_seconds
from osdn_jax.flops import device_peak_flops, flops_per_token
from osdn_jax.hardware import chip_for_kind
from osdn_jax.perf import analyze
from osdn_jax.train.step import make_train_step  # (no grain / tyro needed: runs on bare GPU images)


def gpu_peak_flops(compute_dtype: str) -> float:
    """The nominal dense peak of GPU 0 (``osdn_jax.flops``), else the H200's."""
    return device_peak_flops(jax.devices()[0].device_kind, compute_dtype) or device_peak_flops("H200", compute_dtype)


def cpu_peak_flops() -> float:
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    t = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(f(a))
    return 5 * 2 * 2048**3 / (time.perf_counter() - t)


def step_seconds(cfg, B: int, T: int, repeats: int, target=None) -> tuple[float, float | None]:
    """(median seconds of a training step, the roofline prediction for that compiled step on
    ``target``, an ``osdn_jax.hardware.Chip``; None without one)."""
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1))
    opt_state = tx.init(params)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, T), np.int32),
             "loss_mask": np.ones((B, T), np.float32)}
    batch = jax.tree.map(jnp.asarray, batch)
    step = jax.jit(make_train_step(graphdef, tx, 1), donate_argnums=(0, 1))
    predicted = None if target is None else analyze(step.lower(params, opt_state, batch).compile().as_text(),
                                                    target).seconds
    state = [params, opt_state]  # donated each step: carry the new buffers forward

    def one_step():
        state[0], state[1], m = step(*state, batch)
        jax.block_until_ready(m)

    return median_seconds(one_step, repeats), predicted


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny"])
    p.add_argument("--mixers", nargs="+", default=None, help="override the preset's mixer (default on CPU: all)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--compute-dtype", default=None)
    p.add_argument("--impl", default="auto")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (CI)")
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    mixers = args.mixers or ([None] if on_gpu or args.presets != ["tiny"] else ["deltanet", "gdn", "osdn", "os_gdn"])
    if args.smoke:
        args.batch, args.seq_len, args.repeats = 2, 32, 1
    peak = None if on_gpu else cpu_peak_flops()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); batch {args.batch}x{args.seq_len}; "
          + ("peak = nominal dense peak" if on_gpu else f"peak = measured fp32 matmul {peak / 1e9:.1f} GFLOP/s"))
    target = chip_for_kind(jax.devices()[0].device_kind)
    head = (f"| {'model':14s} | {'mixer':8s} | {'params':>8s} | {'step ms':>9s} | {'pred ms':>9s} | {'tokens/s':>10s} "
            f"| {'TFLOP/s':>8s} | {'MFU':>6s} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    rows = {}
    for preset in args.presets:
        for mixer in mixers:
            overrides = {"max_seq_len": max(args.seq_len, 1024), "remat": args.remat}
            if args.compute_dtype:
                overrides["compute_dtype"] = args.compute_dtype
            cfg = model_config(preset, mixer=mixer, **overrides)
            cfg = dataclasses.replace(cfg, mixer=dataclasses.replace(cfg.mixer, impl=args.impl))
            s, predicted = step_seconds(cfg, args.batch, args.seq_len, args.repeats, target)
            tok_s = args.batch * args.seq_len / s
            flops = flops_per_token(cfg, args.seq_len) * tok_s
            device_peak = gpu_peak_flops(cfg.compute_dtype) if on_gpu else peak
            rows[(preset, cfg.mixer_name)] = tok_s
            pred = "-" if predicted is None else f"{1e3 * predicted:.1f}"
            print(f"| {preset:14s} | {cfg.mixer_name:8s} | {count_params(cfg) / 1e6:7.1f}M | {1e3 * s:9.1f} | "
                  f"{pred:>9s} | {tok_s:10.0f} | {flops / 1e12:8.3f} | {100 * flops / device_peak:5.1f}% |", flush=True)
    if len(rows) == 2:
        (a, ta), (b, tb) = rows.items()
        print(f"ratio tokens/s {a[0]} / {b[0]}: {ta / tb:.3f}")


if __name__ == "__main__":
    main()
