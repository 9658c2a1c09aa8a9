"""Next-token cross-entropy of a ``CausalLM`` whose vocabulary-sized logits never exist whole.

The LM head and the softmax cross-entropy run chunk by chunk of positions inside a ``lax.scan``;
each chunk is a ``jax.checkpoint``, so the backward pass recomputes that chunk's logits instead of
keeping them. The peak extra memory is one chunk's logits and their gradient, ``rows × chunk ×
vocab`` floats each, instead of ``rows × T × vocab`` (4.2 GB of fp32 for 8 rows of 4096 tokens at
vocab 32000). Loss and gradients equal the dense computation's to fp32 rounding.

A chunk takes every ``n``-th position of each row (``n`` = the number of chunks), not ``chunk``
consecutive ones: when the time axis is split over devices (context parallelism) each device then
holds its share of every chunk, and the scan runs over an axis that no device splits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from osdn_jax.activations import constrain_rows

# Positions of each row whose logits exist at once (rows × LOSS_CHUNK × vocab fp32 floats).
DEFAULT_LOSS_CHUNK = 256


def num_loss_chunks(seq_len: int, chunk: int) -> int:
    """Chunks of a row of ``seq_len`` positions: the fewest ``n`` dividing ``seq_len`` with
    ``seq_len / n <= chunk`` (1 when ``chunk`` is 0 or covers the row)."""
    if chunk <= 0 or chunk >= seq_len:
        return 1
    return next(n for n in range(-(-seq_len // chunk), seq_len + 1) if seq_len % n == 0)


def head_cross_entropy(model, features: jax.Array, targets: jax.Array, chunk: int = DEFAULT_LOSS_CHUNK) -> jax.Array:
    """``[B, T]`` fp32 cross-entropy of ``model.head(features)`` against ``targets``.

    ``features [B, T, hidden]``: ``model.features(tokens)``; ``targets [B, T]`` integer ids.
    ``chunk``: positions of each row per chunk (0: the whole logits at once).
    """
    B, T = targets.shape
    n = num_loss_chunks(T, chunk)
    if n == 1:
        return optax.softmax_cross_entropy_with_integer_labels(constrain_rows(model.head(features)),
                                                               constrain_rows(targets))
    head, head_params = model.head_function()

    @jax.checkpoint
    def chunk_losses(params, x, y):  # x [B, T/n, hidden], y [B, T/n] -> [B, T/n]
        return optax.softmax_cross_entropy_with_integer_labels(constrain_rows(head(params, constrain_rows(x))),
                                                               constrain_rows(y))

    def body(carry, xy):
        return carry, chunk_losses(head_params, *xy)

    # [B, T] -> [n, B, T/n] with position t = c·n + i in chunk i, slot c
    split = lambda a: jnp.moveaxis(a.reshape(B, T // n, n, *a.shape[2:]), 2, 0)  # noqa: E731
    _, ce = jax.lax.scan(body, None, (split(features), split(targets)))
    return jnp.moveaxis(ce, 0, 2).reshape(B, T)


def token_losses(model, batch: dict, chunk: int = DEFAULT_LOSS_CHUNK) -> jax.Array:
    """``[B, T]`` next-token cross-entropy of ``model`` on ``batch`` (``inputs``, ``targets``,
    ``segment_ids``, ``loss_mask``), 0 wherever ``loss_mask`` is 0."""
    features = model.features(batch["inputs"], batch["segment_ids"])
    ce = head_cross_entropy(model, features, batch["targets"], chunk)
    return ce * batch["loss_mask"].astype(jnp.float32)


__all__ = ["DEFAULT_LOSS_CHUNK", "head_cross_entropy", "num_loss_chunks", "token_losses"]
