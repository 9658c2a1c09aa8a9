"""Pallas (Triton) kernels for OSDN phase 1: the preconditioner trajectory ``d``, forward and backward.

One program per (batch, head) walks the tokens with ``lax.fori_loop`` and carries ``d [K]`` in
registers; the backward walks them in reverse and carries the cotangent of ``d``. Same contract as
``osdn_jax.ops.preconditioner.preconditioner_scan`` (see its docstring and ``_trajectory_bwd`` for
the math); the head dim is padded to a power of two (padded features have k = 0 and are sliced
away). On a CPU backend the kernels run with ``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from osdn_jax.ops.segments import document_starts

_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=1)
MAX_HEAD_DIM = 128


def supported(K: int) -> str | None:
    """None when the kernel covers head dim K, else the reason it does not."""
    if K > MAX_HEAD_DIM:
        return f"head dim K={K} (the kernel takes up to {MAX_HEAD_DIM}, padded to a power of two)"
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _inside(x, d_min, d_max):
    inside = jnp.ones(x.shape, bool)
    if d_min is not None:
        inside &= x >= d_min
    if d_max is not None:
        inside &= x <= d_max
    return inside


def _unclipped_update(d, t, k_ref, lg_ref, b_ref, eta):
    """Token t's pre-clip value ``x = γ d + η c (1 − c⟨d, s⟩) s`` and the pieces the backward reuses."""
    k = k_ref[pl.ds(t, 1), :]
    s = k * k
    c = b_ref[pl.ds(t, 1)][:, None]
    gamma = jnp.exp(lg_ref[pl.ds(t, 1)])[:, None]
    inner = jnp.sum(d * s, axis=1, keepdims=True)
    return gamma * d + eta * c * (1.0 - c * inner) * s, k, s, c, gamma, inner


def _fwd_kernel(k_ref, lg_ref, b_ref, st_ref, d0_ref, ds_ref, d_ref, dfin_ref, *, T, eta, d_min, d_max):
    """Refs per program: ``k [T, K]``, ``lg, b, st [T]``, ``d0, d_start [1, K]``; out ``d [T, K]``,
    ``d_final [1, K]``."""
    d0 = d0_ref[...]

    def step(t, d):
        d = jnp.where(st_ref[pl.ds(t, 1)][:, None] > 0, d0, d)
        d_ref[pl.ds(t, 1), :] = d
        x = _unclipped_update(d, t, k_ref, lg_ref, b_ref, eta)[0]
        if d_min is not None:
            x = jnp.where(x < d_min, d_min, x)
        if d_max is not None:
            x = jnp.where(x > d_max, d_max, x)
        return x

    dfin_ref[...] = lax.fori_loop(0, T, step, ds_ref[...])


def _bwd_kernel(k_ref, lg_ref, b_ref, st_ref, d_ref, gd_ref, gfin_ref,
                dk_ref, dlg_ref, db_ref, dds_ref, dd0_ref, *, T, eta, d_min, d_max):
    """Reverse walk; outs ``dk [T, K]``, ``dlg, db [T]``, ``d d_start [1, K]``, ``d d0 [1, K]``
    (this program's share: the cotangent that reached d0 through document starts)."""

    def step(i, carry):
        g, dd0 = carry
        t = T - 1 - i
        d = d_ref[pl.ds(t, 1), :]
        x, k, s, c, gamma, inner = _unclipped_update(d, t, k_ref, lg_ref, b_ref, eta)
        gx = jnp.where(_inside(x, d_min, d_max), g, 0.0)
        gx_s = jnp.sum(gx * s, axis=1, keepdims=True)
        dd = gamma * gx - eta * c * c * gx_s * s + gd_ref[pl.ds(t, 1), :]
        ds = eta * (c * (1.0 - c * inner) * gx - c * c * gx_s * d)
        dk_ref[pl.ds(t, 1), :] = 2.0 * k * ds
        dlg_ref[pl.ds(t, 1)] = jnp.sum(gx * d, axis=1) * gamma[:, 0]
        db_ref[pl.ds(t, 1)] = (eta * (1.0 - 2.0 * c * inner) * gx_s)[:, 0]
        reset = st_ref[pl.ds(t, 1)][:, None] > 0
        return jnp.where(reset, 0.0, dd), dd0 + jnp.where(reset, dd, 0.0)

    g, dd0 = lax.fori_loop(0, T, step, (gfin_ref[...], jnp.zeros_like(dd0_ref)))
    dds_ref[...] = g
    dd0_ref[...] = dd0


def _specs(B, H, T, K):
    seq = pl.BlockSpec((None, None, T, K), lambda b, h: (b, h, 0, 0))
    tok = pl.BlockSpec((None, None, T), lambda b, h: (b, h, 0))
    head = pl.BlockSpec((None, 1, K), lambda b, h: (h, 0, 0))
    row = pl.BlockSpec((None, None, 1, K), lambda b, h: (b, h, 0, 0))
    return seq, tok, head, row


def _trajectory_call(settings, interpret, k, lg, b, st, d0, d_start):
    """Head-major, padded: ``k [B, H, T, K]``, ``lg, b, st [B, H, T]``, ``d0 [H, 1, K]``,
    ``d_start [B, H, 1, K]``."""
    eta, d_min, d_max = settings
    B, H, T, K = k.shape
    seq, tok, head, row = _specs(B, H, T, K)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, T=T, eta=eta, d_min=d_min, d_max=d_max),
        out_shape=(jax.ShapeDtypeStruct((B, H, T, K), jnp.float32), jax.ShapeDtypeStruct((B, H, 1, K), jnp.float32)),
        grid=(B, H), in_specs=[seq, tok, tok, tok, head, row], out_specs=(seq, row),
        compiler_params=_PARAMS, interpret=interpret, name="osdn_preconditioner_fwd",
    )(k, lg, b, st, d0, d_start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _trajectory(settings, interpret, k, lg, b, st, d0, d_start):
    return _trajectory_call(settings, interpret, k, lg, b, st, d0, d_start)


def _trajectory_fwd(settings, interpret, k, lg, b, st, d0, d_start):
    d, d_final = _trajectory_call(settings, interpret, k, lg, b, st, d0, d_start)
    return (d, d_final), (k, lg, b, st, d)


def _trajectory_bwd(settings, interpret, res, cotangents):
    eta, d_min, d_max = settings
    k, lg, b, st, d = res
    g_traj, g_final = cotangents
    B, H, T, K = k.shape
    seq, tok, head, row = _specs(B, H, T, K)
    f32 = jnp.float32
    dk, dlg, db, dd_start, dd0 = pl.pallas_call(
        functools.partial(_bwd_kernel, T=T, eta=eta, d_min=d_min, d_max=d_max),
        out_shape=(jax.ShapeDtypeStruct((B, H, T, K), f32), jax.ShapeDtypeStruct((B, H, T), f32),
                   jax.ShapeDtypeStruct((B, H, T), f32), jax.ShapeDtypeStruct((B, H, 1, K), f32),
                   jax.ShapeDtypeStruct((B, H, 1, K), f32)),
        grid=(B, H), in_specs=[seq, tok, tok, tok, seq, seq, row], out_specs=(seq, tok, tok, row, row),
        compiler_params=_PARAMS, interpret=interpret, name="osdn_preconditioner_bwd",
    )(k, lg, b, st, d, g_traj, g_final)
    return dk, dlg, db, jnp.zeros_like(st), jnp.sum(dd0, axis=0), dd_start


_trajectory.defvjp(_trajectory_fwd, _trajectory_bwd)


def preconditioner_pallas(k, d0, *, eta, d_min, d_max, log_gamma=None, beta=None, segment_ids=None,
                          initial_d=None, interpret: bool | None = None):
    """Same contract and results as ``preconditioner_scan``: ``d [B, T, H, K]`` and ``d_final
    [B, H, K]``, fp32. ``interpret`` defaults to True unless the backend is a GPU."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    f32 = jnp.float32
    B, T, H, K = k.shape
    Kp = max(_next_pow2(K), 16)
    pad_k = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, Kp - K)])
    head_major = lambda x: jnp.swapaxes(x.astype(f32), 1, 2)  # [B, T, H, ...] -> [B, H, T, ...]
    d0 = d0.astype(f32)
    d_start = jnp.broadcast_to(d0, (B, H, K)) if initial_d is None else initial_d.astype(f32)
    zeros = jnp.zeros((B, H, T), f32)
    lg = zeros if log_gamma is None else head_major(log_gamma)
    b = jnp.ones((B, H, T), f32) if beta is None else head_major(beta)
    st = zeros if segment_ids is None else jnp.broadcast_to(document_starts(segment_ids).astype(f32)[:, None], (B, H, T))
    d, d_final = _trajectory((float(eta), d_min, d_max), bool(interpret), pad_k(head_major(k)), lg, b, st,
                             pad_k(d0)[:, None, :], pad_k(d_start)[:, :, None, :])
    return jnp.swapaxes(d[..., :K], 1, 2), d_final[:, :, 0, :K]
