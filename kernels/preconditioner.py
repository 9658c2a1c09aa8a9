"""Pallas (Triton) kernels for OSDN phase 1: the preconditioner trajectory ``d``, forward and backward.

One program per (batch, head) walks the tokens with ``lax.fori_loop`` and carries ``d [K]`` in
registers; the backward walks them in reverse and carries the cotangent of ``d``. Same contract as
``osdn_jax.ops.preconditioner.preconditioner_scan`` (see its docstring and ``_trajectory_bwd`` for
the math). Keys, γ and β are read in place (``[B, T, H, ·]``, their own dtype); ``d`` is written
in place, fp32. A head dim that is not a power of two ≥ 16 is zero-padded first (padded features
have k = 0 and are sliced away). Everything is elementwise fp32: no dots, so no precision policy.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from osdn_jax.kernels.config import Policy, Target, current_target, tiles_for
from osdn_jax.kernels.delta_rule import padded_dim
from osdn_jax.kernels.tiles import Refs, call
from osdn_jax.ops.segments import document_starts

f32 = jnp.float32
MAX_HEAD_DIM = 128


def supported(K: int) -> str | None:
    """None when the kernel covers head dim K, else the reason it does not."""
    if K > MAX_HEAD_DIM:
        return f"head dim K={K} (the kernel takes up to {MAX_HEAD_DIM}, padded to a power of two)"
    return None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static settings: η, the clip range, which optional inputs are present, and the target."""

    eta: float
    d_min: float | None
    d_max: float | None
    apf: bool
    beta_aware: bool
    docs: bool
    target: Target
    num_warps: int


def _inside(x, d_min, d_max):
    inside = jnp.ones(x.shape, bool)
    if d_min is not None:
        inside &= x >= d_min
    if d_max is not None:
        inside &= x <= d_max
    return inside


def _unclipped_update(d, t, r, s: Settings):
    """Token t's pre-clip value ``x = γ d + η c (1 − c⟨d, s⟩) s`` and the pieces the backward reuses."""
    k = r.k[pl.ds(t, 1), :].astype(f32)
    sq = k * k
    c = r.b[pl.ds(t, 1)].astype(f32)[:, None] if s.beta_aware else jnp.ones((1, 1), f32)
    gamma = jnp.exp(r.lg[pl.ds(t, 1)].astype(f32))[:, None] if s.apf else jnp.ones((1, 1), f32)
    inner = jnp.sum(d * sq, axis=1, keepdims=True)
    return gamma * d + s.eta * c * (1.0 - c * inner) * sq, k, sq, c, gamma, inner


def _starts(r, t, s: Settings):
    return (r.st[pl.ds(t, 1)] > 0)[:, None] if s.docs else None


def _fwd_kernel(*refs, s: Settings, T: int, names):
    """Refs per program: ``k [T, K]``, ``lg, b [T]``, ``st [T]``, ``d0, d_start [1, K]``; out
    ``d [T, K]``, ``d_final [1, K]``."""
    r = Refs(names, refs)
    d0 = r.d0[...]

    def step(t, d):
        start = _starts(r, t, s)
        if start is not None:
            d = jnp.where(start, d0, d)
        r.d[pl.ds(t, 1), :] = d
        x = _unclipped_update(d, t, r, s)[0]
        if s.d_min is not None:
            x = jnp.where(x < s.d_min, s.d_min, x)
        if s.d_max is not None:
            x = jnp.where(x > s.d_max, s.d_max, x)
        return x

    r.d_final[...] = lax.fori_loop(0, T, step, r.d_start[...])


def _bwd_kernel(*refs, s: Settings, T: int, names):
    """Reverse walk; outs ``dk [T, K]``, ``dlg, db [T]``, ``d d_start [1, K]``, ``d d0 [1, K]``
    (this program's share: the cotangent that reached d0 through document starts)."""
    r = Refs(names, refs)

    def step(i, carry):
        g, dd0 = carry
        t = T - 1 - i
        d = r.d[pl.ds(t, 1), :]
        x, k, sq, c, gamma, inner = _unclipped_update(d, t, r, s)
        gx = jnp.where(_inside(x, s.d_min, s.d_max), g, 0.0)
        gx_s = jnp.sum(gx * sq, axis=1, keepdims=True)
        dd = gamma * gx - s.eta * c * c * gx_s * sq + r.gd[pl.ds(t, 1), :]
        dsq = s.eta * (c * (1.0 - c * inner) * gx - c * c * gx_s * d)
        r.dk[pl.ds(t, 1), :] = (2.0 * k * dsq).astype(r.dk.dtype)
        if s.apf:
            r.dlg[pl.ds(t, 1)] = (jnp.sum(gx * d, axis=1) * gamma[:, 0]).astype(r.dlg.dtype)
        if s.beta_aware:
            r.db[pl.ds(t, 1)] = (s.eta * (1.0 - 2.0 * c * inner) * gx_s)[:, 0].astype(r.db.dtype)
        start = _starts(r, t, s)
        if start is None:
            return dd, dd0
        return jnp.where(start, 0.0, dd), dd0 + jnp.where(start, dd, 0.0)

    g, dd0 = lax.fori_loop(0, T, step, (r.gfin[...], jnp.zeros(r.dd0.shape, f32)))
    r.dd_start[...] = g
    r.dd0[...] = dd0


class _Specs:
    def __init__(self, T, K):
        self.seq = pl.BlockSpec((None, T, None, K), lambda b, h: (b, 0, h, 0))  # [B, T, H, K] in place
        self.tok = pl.BlockSpec((None, T, None), lambda b, h: (b, 0, h))  # [B, T, H]
        self.starts = pl.BlockSpec((None, T), lambda b, h: (b, 0))  # [B, T]
        self.head = pl.BlockSpec((None, 1, K), lambda b, h: (h, 0, 0))  # [H, 1, K]
        self.row = pl.BlockSpec((None, None, 1, K), lambda b, h: (b, h, 0, 0))  # [B, H, 1, K]


def _call(s: Settings, body, name, inputs: dict, outputs: dict, B, H, T):
    return call(body, name, (B, H), inputs, outputs, num_warps=s.num_warps, num_stages=1,
                interpret=s.target.interpret, s=s, T=T)


def _trajectory_call(s: Settings, k, lg, b, st, d0, d_start):
    """``k [B, T, H, K]``, ``lg, b [B, T, H]``, ``st [B, T]``, ``d0 [H, 1, K]``, ``d_start [B, H, 1, K]``."""
    B, T, H, K = k.shape
    sp = _Specs(T, K)
    out = _call(s, _fwd_kernel, "osdn_preconditioner_fwd",
                dict(k=(k, sp.seq), lg=(lg, sp.tok), b=(b, sp.tok), st=(st, sp.starts), d0=(d0, sp.head),
                     d_start=(d_start, sp.row)),
                dict(d=(jax.ShapeDtypeStruct((B, T, H, K), f32), sp.seq),
                     d_final=(jax.ShapeDtypeStruct((B, H, 1, K), f32), sp.row)), B, H, T)
    return out["d"], out["d_final"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _trajectory(s: Settings, k, lg, b, st, d0, d_start):
    return _trajectory_call(s, k, lg, b, st, d0, d_start)


def _trajectory_fwd(s: Settings, k, lg, b, st, d0, d_start):
    d, d_final = _trajectory_call(s, k, lg, b, st, d0, d_start)
    return (d, d_final), (k, lg, b, st, d)


def _trajectory_bwd(s: Settings, res, cotangents):
    k, lg, b, st, d = res
    g_traj, g_final = cotangents
    B, T, H, K = k.shape
    sp = _Specs(T, K)
    outputs = dict(dk=(jax.ShapeDtypeStruct(k.shape, k.dtype), sp.seq))
    if s.apf:
        outputs["dlg"] = (jax.ShapeDtypeStruct(lg.shape, lg.dtype), sp.tok)
    if s.beta_aware:
        outputs["db"] = (jax.ShapeDtypeStruct(b.shape, b.dtype), sp.tok)
    outputs.update(dd_start=(jax.ShapeDtypeStruct((B, H, 1, K), f32), sp.row),
                   dd0=(jax.ShapeDtypeStruct((B, H, 1, K), f32), sp.row))
    out = _call(s, _bwd_kernel, "osdn_preconditioner_bwd",
                dict(k=(k, sp.seq), lg=(lg, sp.tok), b=(b, sp.tok), st=(st, sp.starts), d=(d, sp.seq),
                     gd=(g_traj, sp.seq), gfin=(g_final, sp.row)), outputs, B, H, T)
    return out["dk"], out.get("dlg"), out.get("db"), None, jnp.sum(out["dd0"], axis=0), out["dd_start"]


_trajectory.defvjp(_trajectory_fwd, _trajectory_bwd)


def preconditioner_pallas(k, d0, *, eta, d_min, d_max, log_gamma=None, beta=None, segment_ids=None,
                          initial_d=None, target: Target | None = None):
    """Same contract and results as ``preconditioner_scan``: ``d [B, T, H, K]`` and ``d_final
    [B, H, K]``, fp32. ``target``: see ``osdn_jax.kernels.config`` (default: the one in force)."""
    target = current_target() if target is None else target
    B, T, H, K = k.shape
    Kp = padded_dim(K)
    pad_k = lambda x: x if Kp == K else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, Kp - K)])  # noqa: E731
    d0 = d0.astype(f32)
    d_start = jnp.broadcast_to(d0, (B, H, K)) if initial_d is None else initial_d.astype(f32)
    st = None if segment_ids is None else document_starts(segment_ids).astype(jnp.int32)
    s = Settings(float(eta), d_min, d_max, log_gamma is not None, beta is not None, segment_ids is not None, target,
                 tiles_for(Kp, Kp, 64, Policy("float32", "ieee"), target.arch).precond.num_warps)
    d, d_final = _trajectory(s, pad_k(k), log_gamma, beta, st, pad_k(d0)[:, None, :], pad_k(d_start)[:, :, None, :])
    return d[..., :K], d_final[:, :, 0, :K]
