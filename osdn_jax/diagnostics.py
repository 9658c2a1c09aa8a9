"""The recall residual ratio (SPEC §6): how much each write erases the error at its own key.

For the inner loss ``f_t(S) = ½‖Sᵀk_t − v_t‖²``, the write at token t leaves
``f_t(S_t) / f_t(S') = (1 − w_t)²`` with ``w_t = β_t ⟨d_t, k_t ⊙ k_t⟩`` and S' the state just
before the write (DeltaNet and Gated DeltaNet: d ≡ 1, so ``w_t = β_t‖k_t‖²``, ``(1 − β_t)²`` for unit
keys). A smaller ratio is a write that recalls its own key better. Aggregation is a geometric mean
over tokens (per layer and head), then over heads and layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from osdn_jax.mixers import mixer_class
from osdn_jax.model import CausalLM, check_tokens

# Ratios are floored here before the logarithm: an exact write (w_t = 1) has ratio 0, whose log
# would make the geometric mean 0 whatever the other tokens do.
RATIO_FLOOR = 1e-12


def write_strengths(model: CausalLM, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """``w [L, B, T, H]`` (fp32): the write strength of every layer's mixer on ``tokens [B, T]``."""
    check_tokens("tokens", tokens, model.config.vocab_size, 2, "[B, T]")
    layers = range(model.config.num_layers)
    if not all(hasattr(mixer_class(model.config.layer_mixer(i)), "write_strength") for i in layers):
        raise ValueError(f"model: the recall residual ratio needs delta-rule mixers (deltanet, gdn, osdn, os_gdn); "
                         f"this model's mixer is {model.config.mixer_name!r}")
    x = model.embed(tokens)
    out = []
    for block in map(model.layer, layers):
        out.append(block.mixer.write_strength(block.mixer_norm(x), segment_ids))
        x, _ = block(x, segment_ids)
    return jnp.stack(out)


def log_ratios(w: np.ndarray) -> np.ndarray:
    """``log (1 − w)²`` (floored at ``RATIO_FLOOR``), the per-token log residual ratio (float64)."""
    return np.log(np.maximum(np.square(1.0 - np.asarray(w, np.float64)), RATIO_FLOOR))


def recall_residual_ratio(model: CausalLM, batches, *, mask_key: str | None = "loss_mask") -> dict:
    """Geometric-mean recall residual ratio of ``model`` over ``batches``.

    ``batches``: an iterable of dicts with ``inputs [B, T]`` and optional ``segment_ids [B, T]`` and
    ``mask_key [B, T]`` (which tokens count; all when absent). Returns a JSON-ready dict:
    ``overall``, ``per_layer [L]``, ``per_head [L][H]`` (geometric means), ``mean_write_strength
    [L][H]`` and ``tokens`` (tokens counted).
    """
    fn = nnx.jit(write_strengths)
    log_sum = w_sum = None
    count = 0.0
    for batch in batches:
        tokens = jnp.asarray(batch["inputs"])
        seg = batch.get("segment_ids")
        seg = None if seg is None else jnp.asarray(seg)
        mask = np.ones(tokens.shape, np.float64) if mask_key not in batch else np.asarray(batch[mask_key], np.float64)
        w = np.asarray(fn(model, tokens, seg), np.float64)  # [L, B, T, H]
        lr = log_ratios(w)
        m = mask[None, :, :, None]
        ls, ws = (lr * m).sum(axis=(1, 2)), (w * m).sum(axis=(1, 2))  # [L, H]
        log_sum = ls if log_sum is None else log_sum + ls
        w_sum = ws if w_sum is None else w_sum + ws
        count += float(mask.sum())
    if log_sum is None or count == 0:
        raise ValueError("batches: no tokens to measure (empty input or an all-zero mask)")
    per_head = log_sum / count
    return {
        "overall": float(np.exp(per_head.mean())),
        "per_layer": np.exp(per_head.mean(axis=1)).tolist(),
        "per_head": np.exp(per_head).tolist(),
        "mean_write_strength": (w_sum / count).tolist(),
        "tokens": int(count),
        "ratio_floor": RATIO_FLOOR,
    }


def format_ratio_table(result: dict, title: str = "recall residual ratio (geometric mean)") -> str:
    """The per-layer table of ``recall_residual_ratio``'s result."""
    rows = [title, f"{'layer':>5} {'ratio':>9} {'mean w':>8}  per head"]
    for i, (r, heads, w) in enumerate(zip(result["per_layer"], result["per_head"], result["mean_write_strength"])):
        rows.append(f"{i:>5} {r:>9.4f} {float(np.mean(w)):>8.4f}  " + " ".join(f"{h:.4f}" for h in heads))
    rows.append(f"{'all':>5} {result['overall']:>9.4f}  over {result['tokens']} tokens")
    return "\n".join(rows)


# -- where a model writes: the write strength by position, and the learned d0 -------------------

def positions_in_piece(segment_ids: np.ndarray) -> np.ndarray:
    """``[B, T]`` index of each position within its packed piece (a run of equal segment ids): the
    tokens since its document started, which is when every state (S, d, conv) restarted."""
    B, T = segment_ids.shape
    t = np.broadcast_to(np.arange(T), (B, T))
    starts = np.ones((B, T), bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return t - np.maximum.accumulate(np.where(starts, t, 0), axis=1)


def d0_stats(model: CausalLM) -> list[dict] | None:
    """Per layer, the learned initial preconditioner ``d0 [H, K]`` of OSDN mixers: ``{"layer", "mean",
    "min", "max"}`` (layers without one, e.g. a hybrid's attention, are left out); None when no layer
    has one (DeltaNet, Gated DeltaNet: d ≡ 1)."""
    rows = []
    for i in range(model.config.num_layers):
        mixer = model.layer(i).mixer
        if hasattr(mixer, "d0"):
            d0 = np.asarray(mixer.d0[...], np.float64)
            rows.append({"layer": i, "mean": float(d0.mean()), "min": float(d0.min()), "max": float(d0.max())})
    return rows or None


def write_strength_by_position(model: CausalLM, batches, ranges: list[tuple[int, int]], *,
                               mask_key: str | None = "loss_mask") -> dict:
    """The mean write strength ``w_t = β_t⟨d_t, k_t²⟩`` (DeltaNet / GDN: ``β_t‖k_t‖²``) by position
    bucket, the position being the token's index in its document (``positions_in_piece``).

    ``batches``: as ``recall_residual_ratio``'s. ``ranges``: half-open ``(lo, hi)`` position buckets.
    Returns a JSON-ready dict: ``buckets`` (``lo``, ``hi``, ``tokens``, ``mean`` over heads and
    layers, ``per_layer [L]``), ``tokens`` and ``d0`` (``d0_stats``)."""
    fn = nnx.jit(write_strengths)
    L = model.config.num_layers
    sums, counts = np.zeros((len(ranges), L)), np.zeros(len(ranges))
    for batch in batches:
        tokens = jnp.asarray(batch["inputs"])
        seg = batch.get("segment_ids")
        w = np.asarray(fn(model, tokens, None if seg is None else jnp.asarray(seg)), np.float64).mean(axis=3)
        pos = positions_in_piece(np.zeros(tokens.shape, np.int64) if seg is None else np.asarray(seg))
        mask = np.ones(tokens.shape, bool) if mask_key not in batch else np.asarray(batch[mask_key]) > 0
        for j, (lo, hi) in enumerate(ranges):
            sel = mask & (pos >= lo) & (pos < hi)  # [B, T]
            sums[j] += w[:, sel].sum(axis=1)
            counts[j] += sel.sum()
    if counts.sum() == 0:
        raise ValueError("batches: no tokens to measure (empty input or an all-zero mask)")
    buckets = [{"lo": lo, "hi": hi, "tokens": int(n),
                "mean": float(sums[j].mean() / n) if n else float("nan"),
                "per_layer": (sums[j] / n).tolist() if n else [float("nan")] * L}
               for j, ((lo, hi), n) in enumerate(zip(ranges, counts))]
    return {"buckets": buckets, "tokens": int(counts.sum()), "d0": d0_stats(model)}


def format_strength_table(result: dict, title: str = "write strength by position in the document") -> str:
    """The table of ``write_strength_by_position``'s result, then the learned d0 per layer."""
    L = len(result["buckets"][0]["per_layer"])
    rows = [title, f"{'positions':>14} {'tokens':>9} {'mean w':>8}  " + " ".join(f"{'layer ' + str(i):>8}"
                                                                                  for i in range(L))]
    for b in result["buckets"]:
        rows.append(f"{f'[{b['lo']}, {b['hi']})':>14} {b['tokens']:>9} {b['mean']:>8.4f}  "
                    + " ".join(f"{w:>8.4f}" for w in b["per_layer"]))
    if result["d0"]:
        rows.append("learned d0: " + "; ".join(f"layer {r['layer']} mean {r['mean']:.3f} [{r['min']:.3f}, "
                                               f"{r['max']:.3f}]" for r in result["d0"]))
    return "\n".join(rows)


def clip_activity(model: CausalLM, tokens: jax.Array, segment_ids: jax.Array | None = None, *,
                  chunk_size: int = 64) -> list[dict] | None:
    """Per OSDN layer: how often the clip of the preconditioner is active on ``tokens [B, T]``, read
    as the chunked phase 1 sees it (``osdn_jax.ops.preconditioner_chunked``): ``chunks`` is the
    share of chunks that run (in part) token by token (any row or head with an active clip),
    ``tokens`` the share of tokens they run that way (from a chunk's first crossing to its end) and
    ``lanes`` the share of (row, head, chunk) triples with one. A document's first step is taken
    exactly apart and does not count. None when the model has no OSDN layer."""
    from osdn_jax.ops.preconditioner_chunked import clip_crossings, redone_tokens

    check_tokens("tokens", tokens, model.config.vocab_size, 2, "[B, T]")
    x = model.embed(tokens)
    out = []
    for i in range(model.config.num_layers):
        block = model.layer(i)
        mixer = block.mixer
        if hasattr(mixer, "d0"):
            cfg = mixer.config
            _, _, k, _, beta, gates = mixer._inputs(block.mixer_norm(x).astype(mixer.dtype), segment_ids, None)
            k = k.astype(jnp.float32)
            beta = beta if cfg.beta_aware else None
            d = mixer._write_scale(k, beta, gates, segment_ids)
            d_min, d_max = cfg.clip_range
            crossings = clip_crossings(k, d, eta=cfg.step_size, d_min=d_min, d_max=d_max,
                                       log_gamma=gates.get("log_gamma"), beta=beta, segment_ids=segment_ids,
                                       chunk_size=chunk_size)  # [N, B, H, C]
            flags = jnp.any(crossings, axis=-1)
            out.append({"layer": i, "chunks": float(jnp.mean(jnp.any(flags, axis=(1, 2)))),
                        "tokens": float(jnp.sum(redone_tokens(crossings))) / (crossings.shape[0] * crossings.shape[-1]),
                        "lanes": float(jnp.mean(flags))})
        x, _ = block(x, segment_ids)
    return out or None
