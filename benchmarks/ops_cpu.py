"""Reference vs chunked on CPU: forward and forward+backward time, and peak memory.

    python benchmarks/ops_cpu.py [--T 512 2048 8192] [--dims 64 128] [--ops deltanet gdn osdn]

B=1, H=4, K=V, fp32. Times are medians (ms) of compiled calls after a warm-up. Peak memory is
XLA's own accounting of the compiled forward+backward program (arguments + outputs +
temporaries). The `jla` column is jax-linear-attention's plain-JAX chunked op (DeltaNet / GDN),
shown when that package is installed (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import importlib.util

import jax

from osdn_jax.compare import compile_for, forward_backward, make_op_inputs, median_ms, op_fn, peak_mib


def jla_fn(op: str):
    if importlib.util.find_spec("jla") is None or op not in ("deltanet", "gdn"):
        return None
    from jla.ops import chunked as jla_chunked

    if op == "gdn":
        return lambda q, k, v, beta, log_decay: jla_chunked.gated_delta_rule(q, k, v, log_decay, beta)[0]
    return lambda q, k, v, beta: jla_chunked.delta_rule(q, k, v, beta)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--ops", nargs="+", default=["deltanet", "gdn", "osdn"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    B, H = 1, 4
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), B={B}, H={H}, fp32, chunk 64")
    head = (f"| {'op':8s} | {'K=V':>4s} | {'T':>5s} | {'ref fwd':>8s} | {'chk fwd':>8s} | {'ref f+b':>8s} | "
            f"{'chk f+b':>8s} | {'f+b x':>6s} | {'ref MiB':>8s} | {'chk MiB':>8s} | {'mem /':>6s} | {'jla f+b':>8s} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for op in args.ops:
        for D in args.dims:
            for T in args.T:
                a = make_op_inputs(op, B, T, H, D, D)
                row = {}
                for name, f in (("ref", op_fn(op, "reference")), ("chk", op_fn(op, "chunked")), ("jla", jla_fn(op))):
                    if f is None:
                        continue
                    fb = compile_for(forward_backward(f), a, wrap_kwargs=False)
                    row[name + " f+b"] = median_ms(fb, a, args.repeats)
                    row[name + " MiB"] = peak_mib(fb)
                    if name != "jla":
                        row[name + " fwd"] = median_ms(compile_for(f, a), a, args.repeats)
                    del fb
                jla = f"{row['jla f+b']:8.1f}" if "jla f+b" in row else f"{'-':>8s}"
                print(f"| {op:8s} | {D:4d} | {T:5d} | {row['ref fwd']:8.1f} | {row['chk fwd']:8.1f} | "
                      f"{row['ref f+b']:8.1f} | {row['chk f+b']:8.1f} | {row['ref f+b'] / row['chk f+b']:5.1f}x | "
                      f"{row['ref MiB']:8.0f} | {row['chk MiB']:8.0f} | {row['ref MiB'] / row['chk MiB']:5.1f}x | {jla} |",
                      flush=True)


if __name__ == "__main__":
    main()
