"""Sampling from a ``CausalLM``: a parallel prefill of the prompts, then a jit-compiled
``lax.while_loop`` of ``decode_step`` that carries the recurrent state (memory constant in the number
of generated tokens).

Prompts of different lengths are left-padded into one ``[B, P]`` batch; the padding is its own
document (``segment_ids`` 0, prompt 1), so every state restarts at the first prompt token and the
padding never reaches the prompt. Attention models decode with a KV cache of exactly
``P + max_new_tokens`` slots (at most ``max_seq_len``); their RoPE positions start at the first
prompt token.

Non-finite logits are not propagated: a row whose logits hold NaN or inf stops there, and
``generate`` raises ``FloatingPointError`` naming the rows and the step once the loop is done.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from osdn_jax.model import CausalLM, check_tokens


@dataclasses.dataclass(frozen=True)
class Generation:
    """``tokens [B, max_new_tokens]`` (int32; ``pad_token`` after a row stopped), ``lengths [B]`` the
    number of tokens generated per row (a stop token is included and counted)."""

    tokens: np.ndarray
    lengths: np.ndarray

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def _left_pad(prompts, pad_token: int, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prompts (a list of token lists, or an int array ``[B, P]``) → ``tokens [B, P]``, ``segment_ids``;
    ``P`` is the longest prompt, or ``pad_to`` if that is more."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
            raise ValueError(f"prompts: expected a list of token lists or an integer array [B, P], "
                             f"got {prompts.shape} {prompts.dtype}")
        prompts = np.asarray(prompts).tolist()
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, Sequence) for p in prompts):
        raise ValueError("prompts: expected a non-empty list of token lists or an integer array [B, P]")
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ValueError(f"prompts: every prompt needs at least one token, got lengths {lengths}")
    P = max(max(lengths), pad_to or 0)
    tokens = np.full((len(prompts), P), pad_token, np.int32)
    segment_ids = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = np.asarray(p, np.int64)
        segment_ids[i, P - len(p):] = 1
    return tokens, segment_ids


def sample_logits(key: jax.Array, logits: jax.Array, temperature: float, top_k: int | None,
                  top_p: float | None) -> jax.Array:
    """Next tokens ``[B]`` from ``logits [B, V]``: greedy at temperature 0, else softmax sampling
    restricted to the ``top_k`` largest and to the smallest set whose mass reaches ``top_p``."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "stop_token", "pad_token", "cache_len", "vocab_limit"))
def _generate(graphdef, state, tokens, segment_ids, key, *, max_new_tokens, temperature, top_k, top_p,
              stop_token, pad_token, cache_len, vocab_limit):
    model = nnx.merge(graphdef, state)
    B = tokens.shape[0]
    cache = None if cache_len is None else model.init_cache(B, cache_len)  # attention: the KV cache
    logits, cache = model.prefill(tokens, segment_ids, cache)
    out = jnp.full((B, max_new_tokens), pad_token, jnp.int32)
    done = jnp.zeros((B,), bool)
    bad_step = jnp.full((B,), -1, jnp.int32)  # step at which a row met non-finite logits

    def cond(carry):
        i, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, done, bad_step, logits, cache, key = carry
        bad = ~done & ~jnp.all(jnp.isfinite(logits), axis=-1)
        bad_step = jnp.where(bad, i, bad_step)
        done = done | bad
        key, sub = jax.random.split(key)
        if vocab_limit is not None:  # ids past the tokenizer's (a padded vocabulary) are never drawn
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        tok = sample_logits(sub, jnp.where(done[:, None], 0.0, logits), temperature, top_k, top_p)
        tok = jnp.where(done, pad_token, tok)
        out = out.at[:, i].set(tok)
        if stop_token is not None:
            done = done | (tok == stop_token)
        logits, cache = model.decode_step(jnp.where(done, 0, tok), cache)
        return i + 1, out, done, bad_step, logits, cache, key

    carry = (jnp.int32(0), out, done, bad_step, logits[:, -1], cache, key)
    _, out, done, bad_step, *_ = jax.lax.while_loop(cond, body, carry)
    return out, bad_step


def generate(model: CausalLM, prompts, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_token: int | None = None, pad_token: int = 0, pad_to: int | None = None,
             vocab_limit: int | None = None) -> Generation:
    """Samples up to ``max_new_tokens`` tokens after each prompt (a list of token lists of any
    lengths, or an int array ``[B, P]``). ``temperature=0`` is greedy. A row ends after
    ``stop_token``; the loop ends when every row has. ``pad_to`` left-pads the batch to at least
    that many positions (the result is the same): callers with many prompt lengths round it up to
    compile fewer shapes. ``vocab_limit``: only ids below it are sampled (a tokenizer smaller than
    the model's vocabulary, e.g. an imported checkpoint's padded one).
    """
    cfg = model.config
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite float >= 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected None or a float in (0, 1], got {top_p!r}")
    for name, tok in (("stop_token", stop_token), ("pad_token", pad_token)):
        if tok is not None and not (isinstance(tok, int) and 0 <= tok < cfg.vocab_size):
            raise ValueError(f"{name}: expected None or a token id in [0, vocab_size={cfg.vocab_size}), got {tok!r}")
    if vocab_limit is not None and not (isinstance(vocab_limit, int) and 1 <= vocab_limit <= cfg.vocab_size):
        raise ValueError(f"vocab_limit: expected None or an int in [1, vocab_size={cfg.vocab_size}], "
                         f"got {vocab_limit!r}")
    if pad_to is not None and not (isinstance(pad_to, int) and pad_to >= 1):
        raise ValueError(f"pad_to: expected None or an int >= 1, got {pad_to!r}")
    tokens, segment_ids = _left_pad(prompts, pad_token, pad_to)
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"prompts: the longest prompt has {tokens.shape[1]} tokens, more than max_seq_len="
                         f"{cfg.max_seq_len}")
    cache_len = None  # recurrent mixers: a fixed-size state, no limit on the tokens generated
    if cfg.kv_cache:  # every decode step (the last one included) writes one KV cache slot
        cache_len = tokens.shape[1] + max_new_tokens
        if cache_len > cfg.max_seq_len:
            raise ValueError(f"max_new_tokens: the longest prompt ({tokens.shape[1]} tokens) plus max_new_tokens="
                             f"{max_new_tokens} is more than max_seq_len={cfg.max_seq_len}, the most an "
                             f"attention model's KV cache holds")
    check_tokens("prompts", tokens, cfg.vocab_size, 2, "[B, P]")
    graphdef, state = nnx.split(model)
    out, bad_step = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(segment_ids),
                              jax.random.PRNGKey(seed), max_new_tokens=max_new_tokens,
                              temperature=float(temperature), top_k=top_k,
                              top_p=None if top_p is None else float(top_p), stop_token=stop_token,
                              pad_token=pad_token, cache_len=cache_len,
                              vocab_limit=None if vocab_limit == cfg.vocab_size else vocab_limit)
    out, bad_step = np.asarray(out), np.asarray(bad_step)
    if (bad_step >= 0).any():
        rows = np.nonzero(bad_step >= 0)[0].tolist()
        raise FloatingPointError(f"generate: non-finite logits (NaN or inf) in rows {rows} at steps "
                                 f"{bad_step[rows].tolist()}; check the model parameters and inputs")
    if stop_token is None:
        lengths = np.full((out.shape[0],), max_new_tokens, np.int32)
    else:
        is_stop = out == stop_token
        lengths = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1) + 1, max_new_tokens).astype(np.int32)
    return Generation(tokens=out, lengths=lengths)
