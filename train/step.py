"""The compiled training and evaluation steps (pure functions of pure-dict parameters)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def token_losses(graphdef, params, batch) -> jax.Array:
    """``[B, T]`` next-token cross-entropy, 0 wherever ``loss_mask`` is 0."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return ce * batch["loss_mask"].astype(jnp.float32)


def loss_sums(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over ``loss_mask`` and the number of counted targets."""
    return jnp.sum(token_losses(graphdef, params, batch)), jnp.sum(batch["loss_mask"].astype(jnp.float32))


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def make_train_step(graphdef, tx: optax.GradientTransformation, grad_accum: int):
    """``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

    The loss is the mean over every counted target of the batch; with ``grad_accum`` > 1 the rows
    are processed in micro-batches (row ``j`` in micro-batch ``j mod grad_accum``) whose summed
    losses and gradients are added before one update, so the step equals the full-batch step. A
    step whose loss or gradient norm is not finite leaves parameters and optimizer state unchanged
    (``metrics['ok']`` is False).
    """
    grad_fn = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b), has_aux=True)

    def step(params, opt_state, batch):
        if grad_accum == 1:
            (total, count), grads = grad_fn(params, batch)
        else:
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, grad_accum, *x.shape[1:]), 0, 1), batch)

            def body(acc, mb):
                (s, n), g = grad_fn(params, mb)
                return jax.tree.map(jnp.add, acc, (s, n, g)), None

            zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
            (total, count, grads), _ = jax.lax.scan(body, zeros, micro)
        denom = jnp.maximum(count, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm, "ok": ok, "targets": count}
        return _select(ok, new_params, params), _select(ok, new_opt_state, opt_state), metrics

    return step


def mean_loss(eval_step, params, batches) -> tuple[float, float]:
    """``(mean loss over counted targets, number of targets)`` of ``eval_step`` over ``batches``."""
    total = count = 0.0
    for batch in batches:
        s, n = eval_step(params, batch)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0), count


def make_eval_step(graphdef):
    """``eval_step(params, batch) -> (summed loss, counted targets)``."""
    return lambda params, batch: loss_sums(graphdef, params, batch)
