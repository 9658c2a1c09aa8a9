"""Compare the reference and chunked paths on random inputs: error and speed-up.

    python -m osdn_jax.compare [--T 2048] [--heads 4] [--dim 64]

Also the timing helpers shared with ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from osdn_jax import get_preset, ops

OPS = ("deltanet", "gdn", "osdn", "osdn-apf")


def make_op_inputs(op: str, B: int, T: int, H: int, K: int, V: int, seed: int = 0, dtype=jnp.float32) -> dict:
    """Inputs shaped like a model's: L2-normalised q/k, sigmoid β, log-sigmoid gates."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    a = dict(
        q=ops.l2_normalize(jax.random.normal(ks[0], (B, T, H, K))).astype(dtype),
        k=ops.l2_normalize(jax.random.normal(ks[1], (B, T, H, K))).astype(dtype),
        v=jax.random.normal(ks[2], (B, T, H, V)).astype(dtype),
        beta=jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))).astype(dtype),
    )
    if op == "gdn":
        a["log_decay"] = jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[4], (B, T, H)))
    if op.startswith("osdn"):
        a["d0"] = jnp.ones((H, K))
    if op == "osdn-apf":
        a["log_gamma"] = jax.nn.log_sigmoid(6.9 + jax.random.normal(ks[5], (B, T, H)))
    return a


def op_fn(op: str, impl: str, chunk_size: int = 64) -> Callable[..., jax.Array]:
    """``f(**inputs) -> o`` for one op and path (OSDN with the 'may' preset)."""
    if op.startswith("osdn"):
        p = get_preset("may")
        return lambda q, k, v, beta, d0, **kw: ops.osdn(q, k, v, beta, d0, eta=p.eta, d_min=p.d_min, d_max=p.d_max,
                                                        chunk_size=chunk_size, impl=impl, **kw)[0]
    return lambda q, k, v, beta, **kw: ops.delta_rule(q, k, v, beta, chunk_size=chunk_size, impl=impl, **kw)[0]


def forward_backward(f: Callable[..., jax.Array]) -> Callable[..., dict]:
    """Gradients of ``sum(o²)`` w.r.t. every input (a full forward + backward)."""
    return jax.grad(lambda a: jnp.sum(jnp.square(f(**a).astype(jnp.float32))))


def compile_for(fn: Callable, inputs: dict, wrap_kwargs: bool = True):
    """``jax.jit(fn)`` lowered and compiled for ``inputs`` (a dict)."""
    if wrap_kwargs:
        return jax.jit(lambda a: fn(**a)).lower(inputs).compile()
    return jax.jit(fn).lower(inputs).compile()


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (s) of ``fn()`` after ``warmup`` calls; ``fn`` waits for its own results
    (``jax.block_until_ready``, ``torch.cuda.synchronize``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def interleaved_seconds(fns: list[Callable[[], object]], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Median wall time (s) of each of ``fns``, called in turn (a, b, a, b, ...) so that drift on
    a shared machine hits all of them alike; use the ratio of two."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [float(np.median(ts)) for ts in times]


def median_ms(compiled, inputs: dict, repeats: int = 5) -> float:
    """Median wall time in ms of a compiled call after one warm-up call."""
    return 1e3 * median_seconds(lambda: jax.block_until_ready(compiled(inputs)), repeats)


def peak_mib(compiled) -> float:
    """Arguments + outputs + temporaries of a compiled program (XLA's own accounting), MiB."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="K = V")
    args = parser.parse_args(argv)
    B, T, H, D = args.batch, args.T, args.heads, args.dim
    print(f"backend {jax.default_backend()}  B={B} T={T} H={H} K=V={D}  (fp32, chunk 64)")
    print(f"{'op':10s} {'max rel err o':>14s} {'max rel err grads':>18s} {'fwd x':>7s} {'fwd+bwd x':>10s}")
    for op in OPS:
        a = make_op_inputs(op, B, T, H, D, D)
        ref_f, chk_f = op_fn(op, "reference"), op_fn(op, "chunked")
        outs, grads, fwd, fb = {}, {}, {}, {}
        for name, f in (("reference", ref_f), ("chunked", chk_f)):
            cf = compile_for(f, a)
            cb = compile_for(forward_backward(f), a, wrap_kwargs=False)
            outs[name], grads[name] = cf(a), cb(a)
            fwd[name], fb[name] = median_ms(cf, a), median_ms(cb, a)
        err_o = float(jnp.max(jnp.abs(outs["chunked"] - outs["reference"])) / jnp.max(jnp.abs(outs["reference"])))
        err_g = max(float(jnp.max(jnp.abs(grads["chunked"][n] - g)) / jnp.max(jnp.abs(g)))
                    for n, g in grads["reference"].items() if float(jnp.max(jnp.abs(g))) > 0)
        print(f"{op:10s} {err_o:14.2e} {err_g:18.2e} {fwd['reference'] / fwd['chunked']:6.1f}x "
              f"{fb['reference'] / fb['chunked']:9.1f}x", flush=True)


if __name__ == "__main__":
    main()
