"""Phase 1 of OSDN: the online diagonal preconditioner ``d`` (SPEC §2).

Per head, with ``s_t = k_t ⊙ k_t``::

    d_{t+1} = clip(γ_t d_t + η (1 − ⟨d_t, s_t⟩) s_t, d_min, d_max)          # code form
    d_{t+1} = clip(γ_t d_t + η β_t (1 − β_t ⟨d_t, s_t⟩) s_t, d_min, d_max)  # β-aware form

``d`` depends only on the keys, γ and d0, so its whole trajectory is computed before the delta rule
runs. The scan carries a ``[B, H, K]`` fp32 state: O(T·K) work per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from osdn_jax.ops.segments import document_starts


def clip(x: jax.Array, lo: float | None, hi: float | None) -> jax.Array:
    """``clip(x, lo, hi)`` whose gradient is 1 inside ``[lo, hi]`` and 0 where the clip is active.

    ``jnp.clip`` splits the gradient at ties (``x == lo``), which happens for ``d0 = d_min = 0``;
    here a value on the bound is inside. ``None`` leaves that side open.
    """
    if lo is not None:
        x = jnp.where(x < lo, jnp.asarray(lo, x.dtype), x)
    if hi is not None:
        x = jnp.where(x > hi, jnp.asarray(hi, x.dtype), x)
    return x


def precondition_step(
    d: jax.Array,
    k: jax.Array,
    *,
    eta: float,
    d_min: float | None,
    d_max: float | None,
    gamma: jax.Array | None = None,
    beta: jax.Array | None = None,
) -> jax.Array:
    """One hypergradient step on ``d [..., K]`` after the write with key ``k [..., K]``.

    ``gamma [...]`` (APF forgetting, None = 1) and ``beta [...]`` (None = code form, given =
    β-aware form) are per head.
    """
    s = k * k
    inner = jnp.sum(d * s, axis=-1, keepdims=True)
    if beta is None:
        hyper = (1.0 - inner) * s
    else:
        b = beta[..., None]
        hyper = b * (1.0 - b * inner) * s
    kept = d if gamma is None else gamma[..., None] * d
    return clip(kept + eta * hyper, d_min, d_max)


def preconditioner_scan(
    k: jax.Array,
    d0: jax.Array,
    *,
    eta: float,
    d_min: float | None,
    d_max: float | None,
    log_gamma: jax.Array | None = None,
    beta: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    initial_d: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The trajectory ``d [B, T, H, K]`` (value used for the write at token t) and the final ``d``.

    Shapes: ``k [B, T, H, K]``, ``d0 [H, K]``, ``log_gamma, beta [B, T, H]``, ``segment_ids
    [B, T]``, ``initial_d [B, H, K]``. Arguments are assumed checked; everything runs in fp32.
    ``d`` restarts at ``d0`` at every document start; ``initial_d`` (default ``d0``) is the value
    at token 0. The final ``d`` is the value after the last token's update (what token T would use).
    """
    f32 = jnp.float32
    B, T, H, K = k.shape
    d0 = d0.astype(f32)
    d_start = jnp.broadcast_to(d0, (B, H, K)) if initial_d is None else initial_d.astype(f32)
    time_major = lambda x: None if x is None else jnp.moveaxis(x.astype(f32), 1, 0)
    starts = None if segment_ids is None else jnp.moveaxis(document_starts(segment_ids), 1, 0)

    def step(d, xs):
        k_t, lg_t, b_t, start_t = xs
        if start_t is not None:
            d = jnp.where(start_t[:, None, None], d0, d)
        gamma = None if lg_t is None else jnp.exp(lg_t)
        d_next = precondition_step(d, k_t, eta=eta, d_min=d_min, d_max=d_max, gamma=gamma, beta=b_t)
        return d_next, d

    d_final, d_traj = lax.scan(step, d_start, (time_major(k), time_major(log_gamma), time_major(beta), starts))
    return jnp.moveaxis(d_traj, 0, 1), d_final
