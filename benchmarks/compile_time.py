"""First-step compile time of the training step: unrolled layers (each block traced and compiled
on its own) against scanned layers (``ModelConfig.scan_layers``: one block per group, in a scan);
with ``--step-time``, also the time of a step once compiled.

    python benchmarks/compile_time.py                          # osdn-340m, B=1, T=512, 2/6/24 layers
    python benchmarks/compile_time.py --layers 2 --preset tiny --seq-len 64      # seconds
    python benchmarks/compile_time.py --preset tiny --layers 2 8 --batch 16 --seq-len 256 --step-time

Both forms are compiled ``--repeats`` times for each depth, in alternating order, in one process,
and the fastest of each is kept (this machine is shared: compare within a row). ``trace + lower``: Python tracing and StableHLO; ``compile``: XLA
for this machine's backend. The step is the trainer's (``make_train_step``: forward, backward,
AdamW) on abstract arrays, so nothing is allocated.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from osdn_jax import CausalLM, model_config
from osdn_jax.train.config import OptimConfig
from osdn_jax.train.optim import make_optimizer
from osdn_jax.train.step import abstract_train_step, make_train_step


def compile_seconds(cfg, B: int, T: int) -> tuple[float, float]:
    """``(trace + lower seconds, compile seconds)`` of a fresh train step of ``cfg``."""
    step, args = abstract_train_step(cfg, B, T)
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def step_seconds(configs: dict, B: int, T: int, rounds: int = 6, steps: int = 10) -> dict:
    """Median seconds per train step of each config in ``configs`` (name -> ModelConfig), the
    configs' steps run in turns (``steps`` each, order alternating by round)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, next(iter(configs.values())).vocab_size, (B, T + 1)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "segment_ids": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.ones((B, T), jnp.float32)}
    runs = {}
    for name, cfg in configs.items():
        graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        params = nnx.to_pure_dict(params)
        tx = make_optimizer(OptimConfig(), 1000)
        step = jax.jit(make_train_step(graphdef, tx, 1), donate_argnums=(0, 1))
        state = list(step(params, tx.init(params), batch)[:2])  # compiled and warm
        runs[name] = (step, state)
    times = {name: [] for name in configs}
    for r in range(rounds):
        for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            step, state = runs[name]
            t = time.perf_counter()
            for _ in range(steps):
                state[0], state[1], m = step(state[0], state[1], batch)
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t) / steps)
    return {name: float(np.median(v)) for name, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="osdn-340m")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 6, 24])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--remat", action="store_true", help="rematerialise each block")
    p.add_argument("--repeats", type=int, default=2, help="compiles of each form per depth; the fastest is kept")
    p.add_argument("--step-time", action="store_true", help="also time compiled steps (allocates the model)")
    args = p.parse_args(argv)
    print(f"{args.preset}, {args.batch} x {args.seq_len} tokens, remat {args.remat}; backend {jax.default_backend()}")
    head = (f"| {'layers':>6s} | {'unrolled trace+lower s':>22s} | {'unrolled compile s':>18s} | "
            f"{'scanned trace+lower s':>21s} | {'scanned compile s':>17s} | {'compile ratio':>13s} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for i, layers in enumerate(args.layers):
        base = model_config(args.preset, num_layers=layers, remat=args.remat, max_seq_len=max(args.seq_len, 1024))
        times = {False: (float("inf"),) * 2, True: (float("inf"),) * 2}
        for r in range(args.repeats):
            for scan in ((False, True) if (i + r) % 2 == 0 else (True, False)):
                jax.clear_caches()  # a real compile each time, not a cache hit
                t = compile_seconds(dataclasses.replace(base, scan_layers=scan), args.batch, args.seq_len)
                times[scan] = tuple(map(min, times[scan], t))
        (ul, uc), (sl, sc) = times[False], times[True]
        print(f"| {layers:6d} | {ul:22.1f} | {uc:18.1f} | {sl:21.1f} | {sc:17.1f} | {uc / sc:12.1f}x |", flush=True)
    if args.step_time:
        print(f"\n| {'layers':>6s} | {'unrolled step ms':>16s} | {'scanned step ms':>15s} | "
              f"{'scanned / unrolled':>18s} |")
        print(f"|{'-' * 8}|{'-' * 18}|{'-' * 17}|{'-' * 20}|")
        for layers in args.layers:
            base = model_config(args.preset, num_layers=layers, remat=args.remat, max_seq_len=max(args.seq_len, 1024))
            t = step_seconds({s: dataclasses.replace(base, scan_layers=s) for s in (False, True)}, args.batch,
                             args.seq_len)
            print(f"| {layers:6d} | {1e3 * t[False]:16.1f} | {1e3 * t[True]:15.1f} | {t[True] / t[False]:18.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
