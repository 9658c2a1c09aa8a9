"""OSDN's phase 1 (the d trajectory) on this machine: the chunked form against the token scan, and
how often the clip sends the chunked form back to tokens.

1. Forward+backward of ``osdn_preconditioner`` at T = 4096 per preset, ``impl="chunked"`` against
   ``impl="reference"`` (the ``lax.scan``), timed in one process, interleaved, median of the
   repeats; random unit keys (the models' keys are L2-normalized), ``d0`` at the preset's value.
2. With ``--runs DIR ...``: for each trained run, the share of chunks in which the clip is active on
   held-out batches, per OSDN layer (``osdn_jax.diagnostics.clip_activity``), and the share of
   tokens those chunks run one by one (from their first crossing on). ``--eval-seq-len`` packs the
   held-out documents into longer rows than the run trained on (for example 4096, the papers'
   context).

    python benchmarks/phase1.py
    python benchmarks/phase1.py --runs runs/tiny-osdn runs/tiny-osdn-may runs/tiny-osdn-apr-d1
    python benchmarks/phase1.py --skip-timing --runs runs/tiny-osdn --eval-seq-len 4096 --batch 4
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from osdn_jax import ops
from osdn_jax.ops.preconditioner_chunked import PHASE1_CHUNK, clipped_chunks
from osdn_jax.presets import get_preset


def _program(impl: str, preset, chunk_size: int):
    def loss(k, d0):
        d, d_final = ops.osdn_preconditioner(k, d0, eta=preset.eta, d_min=preset.d_min, d_max=preset.d_max, impl=impl,
                                             chunk_size=chunk_size)
        return jnp.sum(jnp.sin(d)) + jnp.sum(d_final)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def time_presets(args) -> None:
    print(f"\nphase 1 forward+backward on {jax.devices()[0].device_kind}, B, T, H, K = {args.batch}, {args.seq_len}, "
          f"{args.heads}, {args.dim}; chunk {args.chunk_size}; median of {args.repeats}, interleaved")
    print("| preset | token scan ms | chunked ms | scan / chunked | chunks with an active clip |")
    print("|---|---|---|---|---|")
    for name in args.presets:
        p = get_preset(name)
        k = ops.l2_normalize(jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.seq_len, args.heads, args.dim)))
        d0 = jnp.full((args.heads, args.dim), p.d0_init, jnp.float32)
        fns = {impl: _program(impl, p, args.chunk_size) for impl in ("reference", "chunked")}
        for fn in fns.values():
            jax.block_until_ready(fn(k, d0))
        times = {impl: [] for impl in fns}
        for _ in range(args.repeats):
            for impl, fn in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(k, d0))
                times[impl].append(time.perf_counter() - t)
        d, _ = ops.osdn_preconditioner(k, d0, eta=p.eta, d_min=p.d_min, d_max=p.d_max, impl="reference")
        flags = clipped_chunks(k, d, eta=p.eta, d_min=p.d_min, d_max=p.d_max, chunk_size=args.chunk_size)
        scan, chunked = (statistics.median(times[i]) for i in ("reference", "chunked"))
        print(f"| {name} | {scan * 1e3:,.1f} | {chunked * 1e3:,.1f} | {scan / chunked:.1f} | "
              f"{float(jnp.mean(jnp.any(flags, axis=(1, 2)))):.0%} |", flush=True)


def clip_in_runs(args) -> None:
    from osdn_jax.diagnostics import clip_activity
    from osdn_jax.train import data as data_lib
    from osdn_jax.train.evaluate import load_run

    print(f"\nchunks with an active clip on held-out batches ({args.batches} batches), per OSDN layer: "
          "'chunks' run partly token by token (any row or head), 'tokens' is the share of tokens run "
          "that way, 'lanes' the share of (row, head, chunk) with a crossing; a document's first step "
          "is exact apart and does not count")
    print("| run | step | preset | rows | layer | chunks | tokens | lanes |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        model, tokenizer, cfg, step = load_run(run)
        data_cfg = cfg.data
        if args.eval_seq_len:
            data_cfg = dataclasses.replace(data_cfg, seq_len=args.eval_seq_len, batch_size=args.batch)
        rows = f"{data_cfg.batch_size} x {data_cfg.seq_len}"
        per_layer: dict[int, list] = {}
        for batch in data_lib.make_eval_batches(data_cfg, tokenizer, args.batches):
            seg = batch.get("segment_ids")
            out = clip_activity(model, jnp.asarray(batch["inputs"]), None if seg is None else jnp.asarray(seg),
                                chunk_size=args.chunk_size)
            for row in out or []:
                per_layer.setdefault(row["layer"], []).append((row["chunks"], row["tokens"], row["lanes"]))
        if not per_layer:
            print(f"| {run} | {step} | - | {rows} | no OSDN layer | | | |")
        preset = model.layer(next(iter(per_layer))).mixer.config.preset if per_layer else "-"
        for layer, vals in sorted(per_layer.items()):
            chunks, tokens, lanes = np.mean(vals, axis=0)
            print(f"| {run} | {step} | {preset} | {rows} | {layer} | {chunks:.0%} | {tokens:.1%} | {lanes:.1%} |",
                  flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=PHASE1_CHUNK)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presets", nargs="+", default=["may", "apr", "apr-d1"])
    ap.add_argument("--runs", nargs="*", default=[], help="trained run directories to measure the clip on")
    ap.add_argument("--batches", type=int, default=4, help="held-out batches per run")
    ap.add_argument("--eval-seq-len", type=int, default=0,
                    help="held-out rows of this length (with --batch rows) instead of the run's")
    ap.add_argument("--skip-timing", action="store_true", help="only the clip measurement of --runs")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seq_len, args.batch, args.heads, args.dim, args.repeats, args.chunk_size = 256, 1, 2, 16, 2, 32
    if not args.skip_timing:
        time_presets(args)
    if args.runs:
        clip_in_runs(args)


if __name__ == "__main__":
    main()
