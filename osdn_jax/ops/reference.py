"""The oracle: the recurrences of SPEC §2, one token at a time with ``lax.scan``.

Every other path is tested against these functions. They are written for clarity, not speed: the
state ``S [B, H, K, V]`` is fp32, every product runs at HIGHEST precision, and autodiff stores one
state per token (memory O(T·K·V)).

Per token (all heads at once)::

    S   = 0 (and d = d0)              at a document start
    S   = exp(g_t) S                  # gated variants
    e   = v_t − Sᵀ k_t                # residual, read with the key
    S   = S + β_t k̃_t e_tᵀ            # write with k̃ = k (DeltaNet), a given key, or d_t ⊙ k_t (OSDN)
    o_t = Sᵀ (scale · q_t)            # read after the write
    d   = precondition_step(d, k_t)   # OSDN only, after the write that used d_t
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from osdn_jax.ops.preconditioner import precondition_step
from osdn_jax.ops.segments import document_starts

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class PreconditionerConfig:
    """Static settings of the OSDN preconditioner (η, clip range, β-aware rule)."""

    eta: float
    d_min: float | None
    d_max: float | None
    beta_aware: bool = False


def _recurrent(q, k, v, beta, *, write_key, log_decay, scale, initial_state, segment_ids,
               precond=None, d0=None, log_gamma=None, initial_d=None):
    f32 = jnp.float32
    B, T, H, K = k.shape
    V = v.shape[-1]
    S = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
    if precond is not None:
        d0 = d0.astype(f32)
        d = jnp.broadcast_to(d0, (B, H, K)) if initial_d is None else initial_d.astype(f32)
    else:
        d = jnp.zeros((), f32)  # unused carry

    tm = lambda x: None if x is None else jnp.moveaxis(x.astype(f32), 1, 0)
    starts = None if segment_ids is None else jnp.moveaxis(document_starts(segment_ids), 1, 0)
    xs = (tm(q), tm(k), tm(v), tm(beta), tm(write_key), tm(log_decay), tm(log_gamma), starts)

    def step(carry, x):
        S, d = carry
        q_t, k_t, v_t, b_t, kw_t, g_t, lg_t, start_t = x
        if start_t is not None:
            S = jnp.where(start_t[:, None, None, None], 0.0, S)
            if precond is not None:
                d = jnp.where(start_t[:, None, None], d0, d)
        if g_t is not None:
            S = jnp.exp(g_t)[..., None, None] * S
        if precond is not None:
            kw_t = d * k_t
        elif kw_t is None:
            kw_t = k_t
        e = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, S, precision=_HI)
        S = S + b_t[..., None, None] * kw_t[..., :, None] * e[..., None, :]
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t * scale, S, precision=_HI)
        d_used = d
        if precond is not None:
            d = precondition_step(
                d, k_t, eta=precond.eta, d_min=precond.d_min, d_max=precond.d_max,
                gamma=None if lg_t is None else jnp.exp(lg_t),
                beta=b_t if precond.beta_aware else None,
            )
        return (S, d), (o_t, d_used)

    (S, d), (o, d_traj) = lax.scan(step, (S, d), xs)
    if precond is None:
        return jnp.moveaxis(o, 0, 1).astype(v.dtype), S, None, None
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), S, d, jnp.moveaxis(d_traj, 0, 1)


def delta_rule_reference(q, k, v, beta, *, write_key=None, log_decay=None, scale, initial_state=None,
                         segment_ids=None):
    """DeltaNet / Gated DeltaNet / two-key delta rule, token by token.

    ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta, log_decay [B, T, H]``, ``write_key
    [B, T, H, K]``, ``initial_state [B, H, K, V]``, ``segment_ids [B, T]``.
    Returns ``o [B, T, H, V]`` (dtype of v) and the final state ``[B, H, K, V]`` (fp32).
    """
    o, S, _, _ = _recurrent(q, k, v, beta, write_key=write_key, log_decay=log_decay, scale=scale,
                            initial_state=initial_state, segment_ids=segment_ids)
    return o, S


def osdn_reference(q, k, v, beta, d0, *, precond: PreconditionerConfig, log_gamma=None, log_decay=None,
                   scale, initial_state=None, initial_d=None, segment_ids=None):
    """OSDN (both phases fused in one token loop).

    Returns ``o [B, T, H, V]``, the final state ``[B, H, K, V]``, the final ``d [B, H, K]`` and
    the trajectory ``d [B, T, H, K]`` (value used for the write at each token).
    """
    return _recurrent(q, k, v, beta, write_key=None, log_decay=log_decay, scale=scale,
                      initial_state=initial_state, segment_ids=segment_ids, precond=precond, d0=d0,
                      log_gamma=log_gamma, initial_d=initial_d)
