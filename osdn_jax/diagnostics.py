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
