"""Model throughput on CPU: forward+backward tokens/s of `tiny` and `small` (~20M parameters) for
each mixer (chunked path), and decode tokens/s of the recurrent step.

    python benchmarks/model_cpu.py [--presets tiny small] [--mixers deltanet gdn osdn os_gdn]

Training step = loss (next-token cross-entropy) and gradients, compiled with `nnx.jit`; decode =
a compiled `lax.scan` of `decode_step` over `--decode-tokens` tokens after a prefill. Times are
medians of `--repeats` calls after a warm-up; fp32 compute.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from osdn_jax import CausalLM, count_params, model_config
from osdn_jax.compare import median_seconds

SHAPES = {"tiny": (8, 256), "small": (4, 512)}  # (batch, T) of a training step


def train_step_tokens_per_s(model: CausalLM, B: int, T: int, repeats: int) -> float:
    tokens = jax.random.randint(jax.random.PRNGKey(0), (B, T + 1), 0, model.config.vocab_size)

    @nnx.jit
    def loss_and_grads(m, tokens):
        def loss(m):
            logits = m(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return nnx.value_and_grad(loss)(m)

    return B * T / median_seconds(lambda: loss_and_grads(model, tokens), repeats)


def decode_tokens_per_s(model: CausalLM, B: int, n: int, repeats: int) -> float:
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode(state, prompt):
        m = nnx.merge(graphdef, state)
        logits, cache = m.prefill(prompt)

        def body(carry, _):
            tok, cache = carry
            logits, cache = m.decode_step(tok, cache)
            return (jnp.argmax(logits, -1).astype(jnp.int32), cache), None

        (tok, _), _ = jax.lax.scan(body, (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache), None, length=n)
        return tok

    prefill = jax.jit(lambda state, prompt: nnx.merge(graphdef, state).prefill(prompt)[0])
    prompt = jnp.ones((B, 8), jnp.int32)
    t_prefill = median_seconds(lambda: prefill(state, prompt), repeats)
    t_total = median_seconds(lambda: decode(state, prompt), repeats)
    return B * n / max(t_total - t_prefill, 1e-9)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--mixers", nargs="+", default=["deltanet", "gdn", "osdn", "os_gdn"])
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (CI)")
    args = p.parse_args(argv)
    shapes = {name: (2, 32) for name in SHAPES} if args.smoke else SHAPES
    if args.smoke:
        args.decode_tokens, args.repeats = 4, 1
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), fp32 compute, chunked path")
    head = (f"| {'preset':6s} | {'mixer':8s} | {'params':>7s} | {'B x T':>8s} | {'train tok/s':>11s} | "
            f"{'decode tok/s (B=' + str(args.decode_batch) + ')':>22s} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for preset in args.presets:
        B, T = shapes[preset]
        for mixer in args.mixers:
            cfg = model_config(preset, mixer=mixer)
            model = CausalLM(cfg, rngs=nnx.Rngs(0))
            train = train_step_tokens_per_s(model, B, T, args.repeats)
            decode = decode_tokens_per_s(model, args.decode_batch, args.decode_tokens, args.repeats)
            print(f"| {preset:6s} | {mixer:8s} | {count_params(cfg) / 1e6:6.1f}M | {f'{B}x{T}':>8s} | "
                  f"{train:11.0f} | {decode:22.0f} |", flush=True)


if __name__ == "__main__":
    main()
