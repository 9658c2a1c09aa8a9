"""Per-device peak memory of a context-parallel forward+backward against one device.

Under a mesh (``jax.set_mesh``) with a ``context`` axis of size P > 1, ``osdn_jax.ops.osdn`` and
``osdn_jax.CausalLM`` split the time axis over the P devices; a device's activations should then
take ~1/P of the memory one device needs for the whole sequence. This script compiles (never runs)
a jitted ``jax.grad`` of a scalar loss for P = 1 (one device: the plain chunked path) and P > 1 (a
``context`` mesh of P fake CPU devices, inputs sharded ``P(None, "context", ...)``), in one process,
and prints XLA's per-device accounting of each program:

    python benchmarks/context_memory.py                                  # T = 16K, 32K, 64K; P = 1, 2, 4, 8
    python benchmarks/context_memory.py --seq-lens 65536 --contexts 1 8 --levels op
    python benchmarks/context_memory.py --smoke                          # tiny shapes: checks it runs (< 1 min)

Levels: ``op`` is ``ops.osdn`` (impl "chunked", the 'may' preset: eta 0.003, d in [2/3, 1.5]) with
packed documents (``segment_ids``), B=1, fp32, loss ``sum(o²)``, gradients w.r.t. q, k, v, β, d0.
``model`` is a ``CausalLM`` (the ``tiny`` preset with an OSDN mixer, ``--hidden``, ``--layers``;
parameters replicated), loss the mean next-token cross-entropy of packed documents, gradients w.r.t.
the parameters.

Per-device peak = ``temp_size_in_bytes + argument_size_in_bytes + output_size_in_bytes -
alias_size_in_bytes`` of ``compiled.memory_analysis()`` (``osdn_jax.compare.peak_mib``): XLA's
buffer assignment of one device's program (temporaries are the size of its temp arena, which
buffer assignment packs by liveness, so it is the peak of live temporaries; arguments and
outputs live throughout; aliased outputs reuse an argument's buffer). ``generated_code`` and the
``host_*`` fields are 0 on CPU and left out. The numbers do not depend on the input values, so
nothing is allocated: the inputs are ``jax.ShapeDtypeStruct`` s with shardings.

For contrast: with the ops' context path switched off (``osdn_jax.ops.context.context_mesh``
returning None), XLA's own partitioning of the same sharded inputs leaves the op at ~0.35 of one
device's peak at P = 8 (T = 16K), not ~1/8.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

SEQ_LENS = [16384, 32768, 65536]
CONTEXTS = [1, 2, 4, 8]
SMOKE_SEQ_LENS = [1024, 2048]
SMOKE_CONTEXTS = [1, 8]


def context_mesh(n: int):
    """A 1-D mesh over the first ``n`` devices whose axis is ``context`` (``AxisType.Auto``)."""
    return jax.make_mesh((n,), ("context",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def abstract(mesh, shape, dtype=jnp.float32, timed=True) -> jax.ShapeDtypeStruct:
    """An abstract input: time (axis 1) split over ``context`` when ``timed``, else replicated."""
    spec = P(None, "context") if timed else P()
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def op_program(mesh, T: int, H: int, K: int):
    """``(grad fn, abstract args)``: OSDN forward+backward, B=1, packed documents."""
    from osdn_jax import get_preset, ops

    p = get_preset("may")
    x = {name: abstract(mesh, (1, T, H, K)) for name in ("q", "k", "v")}
    x["beta"] = abstract(mesh, (1, T, H))
    x["d0"] = abstract(mesh, (H, K), timed=False)
    segment_ids = abstract(mesh, (1, T), jnp.int32)

    def loss(x, segment_ids):
        o = ops.osdn(x["q"], x["k"], x["v"], x["beta"], x["d0"], eta=p.eta, d_min=p.d_min, d_max=p.d_max,
                     segment_ids=segment_ids, impl="chunked")[0]
        return jnp.sum(jnp.square(o))

    return jax.grad(loss), (x, segment_ids)


def model_config_for(T: int, hidden: int, layers: int):
    from osdn_jax.model import model_config

    return model_config("tiny", mixer="osdn", hidden_size=hidden, num_layers=layers, max_seq_len=T)


def model_program(mesh, T: int, hidden: int, layers: int):
    """``(grad fn, abstract args)``: a CausalLM's cross-entropy forward+backward w.r.t. its parameters."""
    import optax
    from flax import nnx

    from osdn_jax.model import CausalLM

    cfg = model_config_for(T, hidden, layers)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda a: abstract(mesh, a.shape, a.dtype, timed=False), params)
    tokens = abstract(mesh, (1, T), jnp.int32)

    def loss(params, inputs, targets, segment_ids):
        logits = nnx.merge(graphdef, params)(inputs, segment_ids)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

    return jax.grad(loss), (params, tokens, tokens, tokens)


def compiled_memory(fn, args, mesh) -> tuple[float, float, float]:
    """``(per-device peak MiB, temporaries MiB, compile seconds)`` of ``jax.jit(fn)`` for ``args``,
    traced under ``mesh`` (the ops find the ``context`` axis there)."""
    from osdn_jax.compare import peak_mib

    t = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t
    return peak_mib(compiled), compiled.memory_analysis().temp_size_in_bytes / 2**20, seconds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help=f"T (default {SEQ_LENS})")
    p.add_argument("--contexts", type=int, nargs="+", default=None,
                   help=f"context sizes P (default {CONTEXTS}; 1 is always added: the ratios are to it)")
    p.add_argument("--levels", nargs="+", choices=["op", "model"], default=["op", "model"])
    p.add_argument("--heads", type=int, default=8, help="op level: H")
    p.add_argument("--dim", type=int, default=128, help="op level: K = V")
    p.add_argument("--hidden", type=int, default=256, help="model level: hidden size (2 heads)")
    p.add_argument("--layers", type=int, default=2, help="model level: layers")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (T 1024, 2048; P 1, 8), under a minute")
    args = p.parse_args(argv)
    if args.smoke:
        args.heads, args.dim, args.hidden, args.layers = 2, 32, 64, 1
    args.seq_lens = args.seq_lens or (SMOKE_SEQ_LENS if args.smoke else SEQ_LENS)
    args.contexts = sorted({1, *(args.contexts or (SMOKE_CONTEXTS if args.smoke else CONTEXTS))})
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    jax.config.update("jax_num_cpu_devices", max(args.contexts))  # before any device is touched
    contexts = [n for n in args.contexts if n <= jax.device_count()]
    if contexts != args.contexts:
        print(f"only {jax.device_count()} devices: skipping contexts {sorted(set(args.contexts) - set(contexts))}")
    start = time.perf_counter()
    print(f"backend {jax.default_backend()}, {jax.device_count()} devices; fp32; per-device peak = temp + "
          "arguments + outputs - aliased (XLA memory_analysis of the compiled forward+backward)")
    print(f"op: ops.osdn chunked, B=1, H={args.heads}, K=V={args.dim}, packed documents; "
          f"model: CausalLM tiny/osdn, hidden {args.hidden}, {args.layers} layers, B=1")
    print("| level | T | P | per-device peak MiB | temp MiB | ratio to P=1 | ideal 1/P | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for level in args.levels:
        for T in args.seq_lens:
            base = None
            for n in contexts:
                mesh = context_mesh(n)
                if level == "op":
                    fn, xs = op_program(mesh, T, args.heads, args.dim)
                else:
                    fn, xs = model_program(mesh, T, args.hidden, args.layers)
                peak, temp, seconds = compiled_memory(fn, xs, mesh)
                base = peak if n == 1 else base
                print(f"| {level} | {T} | {n} | {peak:.1f} | {temp:.1f} | {peak / base:.3f} | {1 / n:.3f} "
                      f"| {seconds:.1f} |", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
