"""Peak memory of one training step (forward, backward, AdamW) as XLA plans it: the dense loss
(whole ``[B, T, vocab]`` logits) against the chunked loss (``osdn_jax.loss``), unrolled against
scanned layers.

    python benchmarks/train_step_memory.py                      # osdn-340m, 8 rows of 4096 tokens
    python benchmarks/train_step_memory.py --remat              # blocks rematerialised too
    python benchmarks/train_step_memory.py --preset tiny --batch 2 --seq-len 64     # seconds

Nothing is allocated: the step is lowered on abstract arrays and compiled for this machine's
backend; ``memory_analysis()`` gives XLA's buffer assignment. ``peak`` = arguments (parameters,
AdamW moments, batch) + temporaries + outputs not aliased to donated arguments. On a CPU host this
is the CPU compiler's plan (the GPU compiler's fusions differ, so treat GPU numbers as close, not
equal); the logits terms do not depend on the backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax

from osdn_jax import model_config
from osdn_jax.loss import DEFAULT_LOSS_CHUNK
from osdn_jax.train.step import abstract_train_step

GB = 1e9


def step_memory(cfg, B: int, T: int, loss_chunk: int) -> tuple[dict, float]:
    """XLA's memory analysis of the compiled train step, and the seconds lowering + compiling took."""
    t = time.perf_counter()
    step, args = abstract_train_step(cfg, B, T, loss_chunk)
    m = step.lower(*args).compile().memory_analysis()
    seconds = time.perf_counter() - t
    sizes = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
             "outputs": m.output_size_in_bytes - m.alias_size_in_bytes}
    sizes["peak"] = sum(sizes.values())
    return sizes, seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="osdn-340m")
    p.add_argument("--batch", type=int, default=8, help="rows per device (8)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (the paper's tokenizer: 32000)")
    p.add_argument("--loss-chunk", type=int, default=DEFAULT_LOSS_CHUNK)
    p.add_argument("--remat", action="store_true", help="rematerialise each block")
    args = p.parse_args(argv)
    base = model_config(args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq_len, 1024), remat=args.remat)
    B, T, V = args.batch, args.seq_len, args.vocab
    print(f"{args.preset} ({base.mixer_name}, {base.num_layers} layers, compute {base.compute_dtype}), "
          f"{B} x {T} tokens, vocab {V}, remat {args.remat}; backend {jax.default_backend()}; "
          f"fp32 logits of the batch: {B * T * V * 4 / GB:.2f} GB")
    head = (f"| {'loss':18s} | {'layers':8s} | {'arguments GB':>12s} | {'temporaries GB':>14s} | "
            f"{'outputs GB':>10s} | {'peak GB':>8s} | {'compile s':>9s} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for chunk in (0, args.loss_chunk):
        for scan in (False, True):
            cfg = dataclasses.replace(base, scan_layers=scan)
            sizes, seconds = step_memory(cfg, B, T, chunk)
            loss = "dense" if chunk == 0 else f"chunked ({chunk})"
            print(f"| {loss:18s} | {'scanned' if scan else 'unrolled':8s} | {sizes['arguments'] / GB:12.2f} | "
                  f"{sizes['temporaries'] / GB:14.2f} | {sizes['outputs'] / GB:10.2f} | {sizes['peak'] / GB:8.2f} | "
                  f"{seconds:9.1f} |", flush=True)


if __name__ == "__main__":
    main()
