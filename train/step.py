"""The compiled training and evaluation steps (pure functions of pure-dict parameters)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from osdn_jax import loss as loss_lib
from osdn_jax.loss import DEFAULT_LOSS_CHUNK


def token_losses(graphdef, params, batch, loss_chunk: int = DEFAULT_LOSS_CHUNK) -> jax.Array:
    """``[B, T]`` next-token cross-entropy, 0 wherever ``loss_mask`` is 0. The logits exist
    ``loss_chunk`` positions of each row at a time (``osdn_jax.loss``; 0: all at once)."""
    return loss_lib.token_losses(nnx.merge(graphdef, params), batch, loss_chunk)


def loss_sums(graphdef, params, batch, loss_chunk: int = DEFAULT_LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over ``loss_mask`` and the number of counted targets."""
    return (jnp.sum(token_losses(graphdef, params, batch, loss_chunk)),
            jnp.sum(batch["loss_mask"].astype(jnp.float32)))


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def make_train_step(graphdef, tx: optax.GradientTransformation, grad_accum: int,
                    loss_chunk: int = DEFAULT_LOSS_CHUNK):
    """``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

    The loss is the mean over every counted target of the batch; with ``grad_accum`` > 1 the rows
    are processed in micro-batches (row ``j`` in micro-batch ``j mod grad_accum``) whose summed
    losses and gradients are added before one update, so the step equals the full-batch step. A
    step whose loss or gradient norm is not finite leaves parameters and optimizer state unchanged
    (``metrics['ok']`` is False). ``loss_chunk``: see ``token_losses``.
    """
    grad_fn = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b, loss_chunk), has_aux=True)

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


def make_eval_step(graphdef, loss_chunk: int = DEFAULT_LOSS_CHUNK):
    """``eval_step(params, batch) -> (summed loss, counted targets)``."""
    return lambda params, batch: loss_sums(graphdef, params, batch, loss_chunk)


def abstract_train_step(model_cfg, batch_size: int, seq_len: int, loss_chunk: int = DEFAULT_LOSS_CHUNK,
                        optim=None, mesh=None) -> tuple:
    """``(step, args)``: the trainer's jitted step (parameters and optimizer state donated) for
    ``CausalLM(model_cfg)`` on batches ``[batch_size, seq_len]``, and abstract arguments for it
    (``jax.ShapeDtypeStruct`` s: nothing is allocated). ``step.lower(*args).compile()`` gives XLA's
    executable, e.g. its ``memory_analysis()``. ``optim``: an ``OptimConfig`` (default: the trainer's).

    With ``mesh`` (the trainer's ``(data, fsdp, context)`` mesh, ``osdn_jax.train.sharding``) it
    returns ``(step, args, shardings)``: the step not yet jitted, the arguments carrying the
    trainer's shardings (parameters and their Adam moments by logical axis, rows over data × fsdp),
    and those shardings ``(params, opt_state, batch)`` for ``jax.jit``'s ``in_shardings``."""
    from osdn_jax.model import CausalLM
    from osdn_jax.train.config import OptimConfig
    from osdn_jax.train.optim import make_optimizer

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    params = nnx.to_pure_dict(abstract)
    tx = make_optimizer(optim or OptimConfig(), 1000)
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in ("inputs", "targets", "segment_ids", "loss_mask")}
    fn = make_train_step(graphdef, tx, 1, loss_chunk)
    opt_state = jax.eval_shape(tx.init, params)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0, 1)), (params, opt_state, batch)
    from osdn_jax.train.sharding import batch_sharding, param_shardings

    param_sh = param_shardings(abstract, mesh)
    opt_sh = _follow_params(opt_state, param_sh, mesh)
    batch_sh = {k: batch_sharding(mesh) for k in batch}
    place = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    return fn, (place(params, param_sh), place(opt_state, opt_sh), place(batch, batch_sh)), (param_sh, opt_sh, batch_sh)


def _follow_params(opt_state, param_sh, mesh):
    """Shardings of the optimizer state: a leaf at the path of a parameter (Adam's moments) takes
    that parameter's sharding, as ``jax.jit(tx.init)(params)`` gives it in the trainer; the rest
    (step counts) is replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    by_path = {tuple(str(k) for k in path): s for path, s in jax.tree_util.tree_leaves_with_path(
        param_sh, is_leaf=lambda x: isinstance(x, NamedSharding))}

    def pick(path, leaf):
        keys = tuple(str(k) for k in path)
        for i in range(len(keys)):
            s = by_path.get(keys[i:])
            if s is not None and len(s.spec) <= len(leaf.shape):
                return s
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(pick, opt_state)
