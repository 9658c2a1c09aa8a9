"""Optimizer: AdamW, linear warmup + cosine decay to a floor, global-norm clipping, and weight decay
masked off norms, biases and the mixers' own gates (d0, A_log, dt_bias)."""

from __future__ import annotations

import jax
import optax

from osdn_jax.layer_stacks import SCANNED

from osdn_jax.train.config import OptimConfig

# Parameters of any rank that never decay: OSDN's d0, Gated DeltaNet's A_log and dt_bias.
NO_DECAY_NAMES = frozenset({"d0", "A_log", "dt_bias"})


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 → ``lr`` over ``warmup_steps``, then cosine to ``min_lr_ratio · lr`` at ``total_steps``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1),
                                              end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params) -> object:
    """A tree of bools like ``params`` (a pure dict): True for matrices (linear kernels, embeddings,
    conv weights), False for vectors (norm weights, biases) and ``NO_DECAY_NAMES``. A scanned model's
    layer parameters count their rank without the stacked layer axis."""
    def keep(path, x) -> bool:
        name = getattr(path[-1], "key", None)
        stacked = getattr(path[0], "key", None) == SCANNED  # a leading axis over the layers
        return x.ndim - stacked >= 2 and name not in NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
