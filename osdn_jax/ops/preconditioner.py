"""Phase 1 of OSDN: the online diagonal preconditioner ``d`` (SPEC §2).

Per head, with ``s_t = k_t ⊙ k_t``::

    d_{t+1} = clip(γ_t d_t + η (1 − ⟨d_t, s_t⟩) s_t, d_min, d_max)          # code form
    d_{t+1} = clip(γ_t d_t + η β_t (1 − β_t ⟨d_t, s_t⟩) s_t, d_min, d_max)  # β-aware form

``d`` depends only on the keys, γ and d0, so its whole trajectory is computed before the delta rule
runs. The scan carries a ``[B, H, K]`` fp32 state: O(T·K) work per head.
"""

from __future__ import annotations

import functools

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
    The backward is one reverse scan over the saved trajectory (``_trajectory_bwd``).
    """
    f32 = jnp.float32
    B, T, H, K = k.shape
    d0 = d0.astype(f32)
    d_start = jnp.broadcast_to(d0, (B, H, K)) if initial_d is None else initial_d.astype(f32)
    time_major = lambda x: None if x is None else jnp.moveaxis(x.astype(f32), 1, 0)
    starts = None if segment_ids is None else jnp.moveaxis(document_starts(segment_ids), 1, 0)
    d_traj, d_final = _trajectory((eta, d_min, d_max), time_major(k), d0, d_start, time_major(log_gamma),
                                  time_major(beta), starts)
    return jnp.moveaxis(d_traj, 0, 1), d_final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _trajectory(settings, k, d0, d_start, log_gamma, beta, starts):
    """Time-major: ``k [T, B, H, K]``, ``log_gamma, beta [T, B, H]``, ``starts [T, B]``."""
    return _trajectory_fwd(settings, k, d0, d_start, log_gamma, beta, starts)[0]


def _trajectory_fwd(settings, k, d0, d_start, log_gamma, beta, starts):
    eta, d_min, d_max = settings

    def step(d, xs):
        k_t, lg_t, b_t, start_t = xs
        if start_t is not None:
            d = jnp.where(start_t[:, None, None], d0, d)
        gamma = None if lg_t is None else jnp.exp(lg_t)
        d_next = precondition_step(d, k_t, eta=eta, d_min=d_min, d_max=d_max, gamma=gamma, beta=b_t)
        return d_next, d

    d_final, d_traj = lax.scan(step, d_start, (k, log_gamma, beta, starts))
    return (d_traj, d_final), (k, d0, log_gamma, beta, starts, d_traj)


def _trajectory_bwd(settings, res, cotangents):
    """Reverse scan. With x = γ d + η c(1 − c⟨d, s⟩) s, s = k², c = β (β-aware) or 1, and m the
    mask where the clip is inactive, the cotangent g of d_{t+1} gives, for gx = m ⊙ g:
    ∂d = γ gx − η c² ⟨gx, s⟩ s,  ∂s = η (c(1 − c⟨d, s⟩) gx − c² ⟨gx, s⟩ d),  ∂γ = ⟨gx, d⟩,
    ∂c = η (1 − 2c⟨d, s⟩) ⟨gx, s⟩. At a document start the carried d was replaced by d0."""
    eta, d_min, d_max = settings
    k, d0, log_gamma, beta, starts, d_traj = res
    g_traj, g_final = cotangents

    def step(g, xs):
        d, k_t, lg_t, b_t, start_t, g_out = xs
        s = k_t * k_t
        inner = jnp.sum(d * s, axis=-1, keepdims=True)
        c = 1.0 if b_t is None else b_t[..., None]
        gamma = 1.0 if lg_t is None else jnp.exp(lg_t)[..., None]
        x = gamma * d + eta * c * (1.0 - c * inner) * s
        inside = jnp.ones_like(x, bool)
        if d_min is not None:
            inside &= x >= d_min
        if d_max is not None:
            inside &= x <= d_max
        gx = jnp.where(inside, g, 0.0)
        gx_s = jnp.sum(gx * s, axis=-1, keepdims=True)
        dd = gamma * gx - eta * c * c * gx_s * s + g_out
        ds = eta * (c * (1.0 - c * inner) * gx - c * c * gx_s * d)
        dk = 2.0 * k_t * ds
        dlg = None if lg_t is None else jnp.sum(gx * d, axis=-1) * gamma[..., 0]
        db = None if b_t is None else (eta * (1.0 - 2.0 * c * inner) * gx_s)[..., 0]
        dd0 = jnp.zeros_like(d0)
        if start_t is not None:
            reset = start_t[:, None, None]
            dd0 = jnp.sum(jnp.where(reset, dd, 0.0), axis=0)
            dd = jnp.where(reset, 0.0, dd)
        return dd, (dk, dlg, db, dd0)

    dd_start, (dk, dlg, db, dd0) = lax.scan(
        step, g_final, (d_traj, k, log_gamma, beta, starts, g_traj), reverse=True)
    return dk, jnp.sum(dd0, axis=0), dd_start, dlg, db, None


_trajectory.defvjp(_trajectory_fwd, _trajectory_bwd)
