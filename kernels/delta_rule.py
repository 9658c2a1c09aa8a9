"""Pallas (Triton) kernels for the chunkwise delta rule (OSDN phase 2), forward and backward.

Same math as ``osdn_jax.ops.chunked`` (see its docstring): read/erase key ``k``, write key ``k̃``
(``k`` itself, a given key, or ``d ⊙ k`` formed in the kernel from OSDN's scale ``d``), optional
log-decay gate, packed documents, initial and final state. Per chunk of C tokens::

    A  = strict_lower(diag(β) K K̃ᵀ ⊙ D)      T = (I + A)⁻¹  (fp32, blocked: tiles.blocked_inverse)
    W  = (T diag(β fs)) K                    U = (T diag(β)) V       K̃_s = K̃ ⊙ d_last
    V' = U − W S                             S ← a S + K̃_sᵀ V'
    O  = scale · (fs ⊙ (Q S) + ((Q K̃ᵀ) ⊙ D) V')

Kernels (grid (B, H, N) per chunk unless serial; serial ones grid (B, H, V/bv)):

forward
  ``delta_rule_intra``      A, T, W, U, K̃_s                                 (per chunk)
  ``delta_rule_states``     S per chunk and V' = U − W S                   (serial over chunks)
  ``delta_rule_output``     O                                              (per chunk)
backward (saves the inputs, T, the chunk-entry states and V')
  ``delta_rule_bwd_local``  W, K̃_s, Q ⊙ fs and (P)ᵀ dO, all in parallel   (per chunk)
  ``delta_rule_states_bwd`` dV' and the state cotangents                   (serial, reverse)
  ``delta_rule_grads_wy``   dv, dT (cotangent of T), the Tᵀ dW parts of dβ, dg   (per chunk)
  ``delta_rule_grads_a``    dA ⊙ D = −strict(Tᵀ dT Tᵀ) ⊙ D and its dβ, dg parts (per chunk)
  ``delta_rule_grads_k``    dk, dk̃ (or dd), the key-side parts of dg           (per chunk)
  ``delta_rule_grads_q``    dq, and dβ, dg finished                            (per chunk)
The four gradient kernels each hold few ``[C, C]`` tiles at once (no register spills).

Layouts: inputs are read in place, ``[B, T, H, ·]`` in their own dtype, through BlockSpecs; rows
past T are masked on load and store, so T need not be a multiple of C. A head dim that is not a
power of two ≥ 16 is zero-padded first (the only copy). Buffers between kernels are ours,
head-major ``[B, H, T_pad, ·]``, in the policy's operand dtype (fp32 for U and dV', which only
ever enter sums). Precision and tile sizes: ``osdn_jax.kernels.config``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from osdn_jax.kernels.config import KernelTiles, Policy, Target, Tiles, current_target, policy_for, tiles_for
from osdn_jax.kernels.tiles import (
    Env, Refs, barrier, blocked_inverse, call, chunk_scalars, gates, load, mm, reverse_cumsum, store, tile_loop,
    valid_rows,
)
from osdn_jax.ops.segments import chunk_document_numbers

f32 = jnp.float32
CHUNK_SIZES = (16, 32, 64)
MAX_HEAD_DIM = 128


def padded_dim(n: int) -> int:
    """The power of two ≥ max(n, 16) the kernels compute in."""
    return max(16, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static description of one call: sizes (K, V padded), options, policy, target, tiles."""

    env: Env
    B: int
    H: int
    K: int
    V: int
    scale: float
    gate: bool
    docs: bool
    key: str
    tiles: Tiles

    @property
    def C(self):
        return self.env.C

    @property
    def N(self):
        return -(-self.env.T // self.env.C)

    @property
    def Tp(self):
        return self.N * self.env.C


# ----------------------------------------------------------------------------------------------
# shared pieces of kernel bodies


def _keys(r, valid, spec: Spec, cols=None):
    """``(k, k̃)`` of this chunk (columns ``cols`` of K, or all): k in its dtype, k̃ as given or
    ``d ⊙ k`` in fp32."""
    view = (lambda ref: ref) if cols is None else (lambda ref: ref.at[:, cols])
    k = load(view(r.k), valid)
    if spec.key == "same":
        return k, k
    if spec.key == "key":
        return k, load(view(r.kw), valid)
    return k, load(view(r.kw), valid, dtype=f32) * k.astype(f32)


def _chunk_rows(spec: Spec):
    """``[C]`` bool: the rows of this program's chunk (grid axis 2) that lie inside the sequence."""
    return valid_rows(pl.program_id(2) * spec.C, spec.C, spec.env.T)


def _chunk_gates(r, valid, spec: Spec):
    g = load(r.g, valid, dtype=f32) if spec.gate else None
    rel = r.rel[...] if spec.docs else None
    return gates(g, rel, spec.C)


def _chunk_inputs(r, valid, spec: Spec):
    return load(r.beta, valid, dtype=f32), _chunk_gates(r, valid, spec)


def _serial_scalars(r, n, spec: Spec):
    """The decay ``a`` of chunk n inside a serial kernel (whole-sequence refs)."""
    tok = pl.ds(n * spec.C, spec.C)
    g = load(r.g.at[tok], valid_rows(n * spec.C, spec.C, spec.env.T), dtype=f32) if spec.gate else None
    rel = r.rel[tok] if spec.docs else None
    return chunk_scalars(g, rel)


# ----------------------------------------------------------------------------------------------
# forward kernels


def _k_cols(i, bk):
    return pl.ds(i * bk, bk)


def _gram(r, valid, spec: Spec, bk: int, *, query: bool = False):
    """``K K̃ᵀ`` (or ``Q K̃ᵀ`` with ``query``), ``[C, C]``, accumulated over K tiles."""

    def body(i, acc):
        cols = _k_cols(i, bk)
        k, kw = _keys(r, valid, spec, cols)
        left = load(r.q.at[:, cols], valid) if query else k
        return acc + mm(left, kw, spec.env, tb=True)

    return tile_loop(spec.K // bk, body, jnp.zeros((spec.C, spec.C), f32))


def _store_w_and_state_key(r, valid, spec: Spec, bk: int, T, beta, gt, *, with_qf: bool = False):
    """Per K tile: ``W = (T diag(β fs)) K`` and ``K̃ ⊙ d_last`` (and ``Q ⊙ fs``) to their buffers."""
    Tw = T * (beta * gt.fs)[None, :]

    def body(i, c):
        cols = _k_cols(i, bk)
        k, kw = _keys(r, valid, spec, cols)
        r.w[:, cols] = mm(Tw, k, spec.env).astype(r.w.dtype)
        r.kt[:, cols] = (kw.astype(f32) * gt.d_last[:, None]).astype(r.kt.dtype)
        if with_qf:
            r.qf[:, cols] = (load(r.q.at[:, cols], valid, dtype=f32) * gt.fs[:, None]).astype(r.qf.dtype)
        return c

    tile_loop(spec.K // bk, body, 0)


def _intra_kernel(*refs, spec: Spec, names):
    r = Refs(names, refs)
    env = spec.env
    bk, bv = spec.tiles.intra.bk, spec.tiles.intra.bv
    valid = _chunk_rows(spec)
    beta, gt = _chunk_inputs(r, valid, spec)
    A = jnp.where(gt.rows > gt.cols, _gram(r, valid, spec, bk) * beta[:, None] * gt.D, 0.0)
    T = blocked_inverse(A, r.t, env)
    _store_w_and_state_key(r, valid, spec, bk, T, beta, gt)
    Tb = T * beta[None, :]

    def v_tile(j, c):
        cols = pl.ds(j * bv, bv)
        r.u[:, cols] = mm(Tb, load(r.v.at[:, cols], valid), env)
        return c

    tile_loop(spec.V // bv, v_tile, 0)


def _outer_sum(count: int, col, row, acc):
    """``acc + Σ_i col(i) row(i)`` with ``col(i) [m, 1]``, ``row(i) [1, n]``: rank-1 updates in
    exact fp32. The IEEE policy's serial products take this form, because Triton's FMA dot holds
    whole operand rows in registers and spills there."""
    return lax.fori_loop(0, count, lambda i, acc: acc + col(i).astype(f32) * row(i).astype(f32), acc)


def _states_kernel(*refs, spec: Spec, names):
    """Serial over chunks, carrying the fp32 state ``[K, bv]``."""
    r = Refs(names, refs)
    env, C, K = spec.env, spec.C, spec.K

    def chunk(n, S):
        tok = pl.ds(n * C, C)
        a = _serial_scalars(r, n, spec)
        r.s_in[pl.ds(n * K, K), :] = S.astype(r.s_in.dtype)
        if not spec.tiles.states.rank1:
            v_new = r.u[tok, :] - mm(r.w[tok, :], S, env)
            r.vn[tok, :] = v_new.astype(r.vn.dtype)
            return a * S + mm(r.kt[tok, :], v_new, env, ta=True)
        barrier(env)  # the rows of S just stored, for every thread
        v_new = _outer_sum(K, lambda k: -r.w[tok, pl.ds(k, 1)], lambda k: r.s_in[pl.ds(n * K + k, 1), :],
                           r.u[tok, :])
        r.vn[tok, :] = v_new.astype(r.vn.dtype)
        barrier(env)
        row = lambda ref: lambda c: ref[pl.ds(n * C + c, 1), :]  # noqa: E731
        return _outer_sum(C, lambda c: row(r.kt)(c).T, row(r.vn), a * S)

    r.s_fin[...] = lax.fori_loop(0, spec.N, chunk, r.s0[...].astype(f32))


def _output_kernel(*refs, spec: Spec, names):
    r = Refs(names, refs)
    env, C = spec.env, spec.C
    bk, bv = spec.tiles.output.bk, spec.tiles.output.bv
    valid = _chunk_rows(spec)
    gt = _chunk_gates(r, valid, spec)
    P = _gram(r, valid, spec, bk, query=True) * gt.D * spec.scale
    q_scale = (spec.scale * gt.fs)[:, None]

    def v_tile(j, c):
        vc = pl.ds(j * bv, bv)

        def qs(i, acc):
            kc = _k_cols(i, bk)
            return acc + mm(load(r.q.at[:, kc], valid), r.s_in[kc, vc], env)

        QS = tile_loop(spec.K // bk, qs, jnp.zeros((C, bv), f32))
        store(r.o.at[:, vc], q_scale * QS + mm(P, r.vn[:, vc], env), valid)
        return c

    tile_loop(spec.V // bv, v_tile, 0)


# ----------------------------------------------------------------------------------------------
# backward kernels


def _bwd_local_kernel(*refs, spec: Spec, names):
    r = Refs(names, refs)
    env = spec.env
    bk, bv = spec.tiles.bwd_local.bk, spec.tiles.bwd_local.bv
    valid = _chunk_rows(spec)
    beta, gt = _chunk_inputs(r, valid, spec)
    _store_w_and_state_key(r, valid, spec, bk, r.t[...], beta, gt, with_qf=True)
    P = _gram(r, valid, spec, bk, query=True) * gt.D * spec.scale

    def v_tile(j, c):
        cols = pl.ds(j * bv, bv)
        r.dvl[:, cols] = mm(P, load(r.do.at[:, cols], valid), env, ta=True)
        return c

    tile_loop(spec.V // bv, v_tile, 0)


def _states_bwd_kernel(*refs, spec: Spec, names):
    """Reverse serial pass, carrying the fp32 state cotangent ``[K, bv]``."""
    r = Refs(names, refs)
    env, C, K, N = spec.env, spec.C, spec.K, spec.N

    def chunk(i, dS):
        n = N - 1 - i
        tok = pl.ds(n * C, C)
        a = _serial_scalars(r, n, spec)
        r.dsout[pl.ds(n * K, K), :] = dS.astype(r.dsout.dtype)
        if not spec.tiles.states_bwd.rank1:
            dv_new = r.dvl[tok, :] + mm(r.kt[tok, :], dS, env)
            r.dvn[tok, :] = dv_new.astype(r.dvn.dtype)
            dO = load(r.do.at[tok, :], valid_rows(n * C, C, env.T))
            return a * dS + spec.scale * mm(r.qf[tok, :], dO, env, ta=True) - mm(r.w[tok, :], dv_new, env, ta=True)
        barrier(env)
        dv_new = _outer_sum(K, lambda k: r.kt[tok, pl.ds(k, 1)], lambda k: r.dsout[pl.ds(n * K + k, 1), :],
                            r.dvl[tok, :])
        r.dvn[tok, :] = dv_new.astype(r.dvn.dtype)
        barrier(env)
        row = lambda ref: lambda c: ref[pl.ds(n * C + c, 1), :]  # noqa: E731
        d_out = lambda c: load(r.do.at[pl.ds(n * C + c, 1), :], valid_rows(n * C + c, 1, env.T))  # noqa: E731
        dS = _outer_sum(C, lambda c: spec.scale * row(r.qf)(c).T, d_out, a * dS)
        return _outer_sum(C, lambda c: -row(r.w)(c).T, row(r.dvn), dS)

    r.ds0[...] = lax.fori_loop(0, N, chunk, r.dsfin[...].astype(f32))


def _v_contract(r, valid, spec: Spec, kc, bk: int, bv: int, *, dqs: bool, dkt: bool):
    """Products that contract V with the chunk states, on K columns ``kc``: ``dQs = dO S_inᵀ``,
    ``dW = −dV' S_inᵀ``, ``dKT = V' dS_outᵀ`` (each ``[C, bk]``) and ``Σ S_in ⊙ dS_out``."""
    env, C = spec.env, spec.C

    def body(j, carry):
        dQs, dW, dKT, da = carry
        vc = pl.ds(j * bv, bv)
        S = r.s_in[kc, vc]
        dW = dW - mm(r.dvn[:, vc], S, env, tb=True)
        if dqs:
            dQs = dQs + mm(load(r.do.at[:, vc], valid), S, env, tb=True)
        if dkt:
            dS = r.dsout[kc, vc]
            dKT = dKT + mm(r.vn[:, vc], dS, env, tb=True)
            da = da + jnp.sum(S.astype(f32) * dS.astype(f32))
        return dQs, dW, dKT, da

    z = jnp.zeros((C, bk), f32)
    return tile_loop(spec.V // bv, body, (z, z, z, jnp.float32(0.0)))


def _grads_wy_kernel(*refs, spec: Spec, names):
    """Through the WY representation (``W = T (β fs K)``, ``U = T (β V)``, ``V' = U − W S``), for
    one chunk: ``dv``, the cotangent ``dT`` of the inverse (to a buffer), and the parts of ``dβ``
    and ``dG`` that need ``Tᵀ dW``."""
    r = Refs(names, refs)
    env, C = spec.env, spec.C
    bk, bv = spec.tiles.grads_wy.bk, spec.tiles.grads_wy.bv
    valid = _chunk_rows(spec)
    beta, gt = _chunk_inputs(r, valid, spec)
    T = r.t[...]

    def v_tile(j, carry):
        dvU, db = carry
        vc = pl.ds(j * bv, bv)
        v, dvn = load(r.v.at[:, vc], valid), r.dvn[:, vc]
        dUr = mm(T, dvn, env, ta=True)
        store(r.dv.at[:, vc], beta[:, None] * dUr, valid)
        return dvU + mm(dvn, v, env, tb=True), db + jnp.sum(dUr * v.astype(f32), axis=1)

    zc, zvec = jnp.zeros((C, C), f32), jnp.zeros((C,), f32)
    dvU, db = tile_loop(spec.V // bv, v_tile, (zc, zvec))

    def k_tile(i, carry):
        dWK, k_dWr = carry
        kc = _k_cols(i, bk)
        k = load(r.k.at[:, kc], valid)
        dW = _v_contract(r, valid, spec, kc, bk, bv, dqs=False, dkt=False)[1]
        return dWK + mm(dW, k, env, tb=True), k_dWr + jnp.sum(mm(T, dW, env, ta=True) * k.astype(f32), axis=1)

    dWK, k_dWr = tile_loop(spec.K // bk, k_tile, (zc, zvec))
    r.dt[...] = dWK * (beta * gt.fs)[None, :] + dvU * beta[None, :]  # dW Wrᵀ + dU Urᵀ
    r.db_part[...] = db + gt.fs * k_dWr
    if spec.gate:
        r.dg_part[...] = beta * k_dWr * gt.fs


def _grads_a_kernel(*refs, spec: Spec, names):
    """``dA ⊙ D`` with ``dA = −strict(Tᵀ dT Tᵀ)`` (to a buffer), and its parts of ``dβ`` and
    ``dG`` (through ``A = β (K K̃ᵀ) ⊙ D``)."""
    r = Refs(names, refs)
    env, C = spec.env, spec.C
    bk = spec.tiles.grads_a.bk
    valid = _chunk_rows(spec)
    beta, gt = _chunk_inputs(r, valid, spec)
    bc = spec.tiles.grads_a.bc or C

    def row_block(m, c):  # rows m·bc … of −Tᵀ dT Tᵀ, through the output buffer
        rb = pl.ds(m * bc, bc)
        X = mm(r.t[:, rb], r.dt[...], env, ta=True)
        r.da[rb, :] = -mm(X, r.t[...], env, tb=True)
        return c

    tile_loop(C // bc, row_block, 0)
    barrier(env)
    dA_D = jnp.where(gt.rows > gt.cols, r.da[...], 0.0) * gt.D
    barrier(env)
    r.da[...] = dA_D

    E = dA_D * _gram(r, valid, spec, bk)
    r.db_out[...] = r.db_part[...] + jnp.sum(E, axis=1)
    if spec.gate:
        E = E * beta[:, None]
        r.dg_out[...] = r.dg_part[...] + jnp.sum(E, axis=1) - jnp.sum(E, axis=0)


def _dP(r, valid, spec: Spec, gt, bv):
    """Cotangent of ``Q K̃ᵀ`` on the mask: ``scale · (dO V'ᵀ) ⊙ D``."""

    def v_tile(j, dP):
        vc = pl.ds(j * bv, bv)
        return dP + mm(load(r.do.at[:, vc], valid), r.vn[:, vc], spec.env, tb=True)

    return tile_loop(spec.V // bv, v_tile, jnp.zeros((spec.C, spec.C), f32)) * gt.D * spec.scale


def _grads_k_kernel(*refs, spec: Spec, names):
    """``dk`` and ``dk̃`` (or, for ``k̃ = d ⊙ k``, the total ``dk`` and ``dd``); with a gate, also
    the key-side terms of ``dG``: ``−colsum(dP ⊙ Q K̃ᵀ) = −rowsum(K̃ ⊙ dPᵀQ)``, the exit-state
    key's use of ``D[C−1, :]`` and the incoming state's decay."""
    r = Refs(names, refs)
    env, C = spec.env, spec.C
    bk, bv = spec.tiles.grads_k.bk, spec.tiles.grads_k.bv
    valid = _chunk_rows(spec)
    beta, gt = _chunk_inputs(r, valid, spec)
    dP = _dP(r, valid, spec, gt, bv)
    M = r.da[...] * beta[:, None]
    T = r.t[...]

    def k_tile(i, carry):
        e_cols, e_last, da = carry
        kc = _k_cols(i, bk)
        q, (k, kw) = load(r.q.at[:, kc], valid), _keys(r, valid, spec, kc)
        _, dW, dKT, da_i = _v_contract(r, valid, spec, kc, bk, bv, dqs=False, dkt=True)
        dPq = mm(dP, q, env, ta=True)
        dk = (beta * gt.fs)[:, None] * mm(T, dW, env, ta=True) + mm(M, kw, env)
        dkw = dPq + dKT * gt.d_last[:, None] + mm(M, k, env, ta=True)
        if spec.key == "same":
            store(r.dk.at[:, kc], dk + dkw, valid)
        elif spec.key == "key":
            store(r.dk.at[:, kc], dk, valid)
            store(r.dkw.at[:, kc], dkw, valid)
        else:  # k̃ = d ⊙ k
            d = load(r.kw.at[:, kc], valid, dtype=f32)
            store(r.dk.at[:, kc], dk + dkw * d, valid)
            store(r.dkw.at[:, kc], dkw * k.astype(f32), valid)
        if spec.gate:
            kw32 = kw.astype(f32)
            e_cols = e_cols + jnp.sum(dPq * kw32, axis=1)
            e_last = e_last + jnp.sum(dKT * kw32, axis=1)
        return e_cols, e_last, da + da_i

    zvec = jnp.zeros((C,), f32)
    e_cols, e_last, da = tile_loop(spec.K // bk, k_tile, (zvec, zvec, jnp.float32(0.0)))
    if spec.gate:
        last = lax.broadcasted_iota(jnp.int32, (C,), 0) == C - 1
        tail = e_last * gt.d_last  # row C−1 of E gains Σ_j, column j loses it
        r.dg_out[...] = (r.dg_part[...] - e_cols - tail + jnp.where(last, jnp.sum(tail) + da * gt.a, 0.0))


def _grads_q_kernel(*refs, spec: Spec, names):
    """``dq``, and the finished ``dβ`` and ``dg`` (adding ``rowsum(dP ⊙ Q K̃ᵀ) = rowsum(Q ⊙
    dP K̃)`` and the query-side use of ``fs``)."""
    r = Refs(names, refs)
    env, C, scale = spec.env, spec.C, spec.scale
    bk, bv = spec.tiles.grads_q.bk, spec.tiles.grads_q.bv
    valid = _chunk_rows(spec)
    gt = _chunk_gates(r, valid, spec)
    dP = _dP(r, valid, spec, gt, bv)

    def k_tile(i, dG):
        kc = _k_cols(i, bk)
        q, (_, kw) = load(r.q.at[:, kc], valid), _keys(r, valid, spec, kc)
        dQs = _v_contract(r, valid, spec, kc, bk, bv, dqs=True, dkt=False)[0]
        dPk = mm(dP, kw, env)
        store(r.dq.at[:, kc], scale * gt.fs[:, None] * dQs + dPk, valid)
        if spec.gate:
            dG = dG + jnp.sum((dPk + scale * gt.fs[:, None] * dQs) * q.astype(f32), axis=1)
        return dG

    dG = tile_loop(spec.K // bk, k_tile, jnp.zeros((C,), f32))
    store(r.db, r.db_part[...], valid)
    if spec.gate:
        store(r.dg, reverse_cumsum(dG + r.dg_part[...], C), valid)


# ----------------------------------------------------------------------------------------------
# pallas_call wiring


class _Specs:
    """BlockSpecs. ``chunk_*``: grid (B, H, N), one chunk per program; ``seq_*``: grid (B, H, J),
    the whole sequence per program, tile j of V. ``nat``: the caller's ``[B, T, H, ·]`` arrays;
    ``buf``: our head-major ``[B, H, T_pad, ·]`` buffers."""

    def __init__(self, spec: Spec, bv: int = 0):
        C, K, V, T, Tp, N = spec.C, spec.K, spec.V, spec.env.T, spec.Tp, spec.N
        self.nat = lambda d: pl.BlockSpec((None, C, None, d), lambda b, h, n: (b, n, h, 0))
        self.nat_tok = pl.BlockSpec((None, C, None), lambda b, h, n: (b, n, h))
        self.rel = pl.BlockSpec((None, C), lambda b, h, n: (b, n))
        self.buf = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n: (b, h, n, 0))
        self.state = pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, n, 0))
        self.seq_nat_v = pl.BlockSpec((None, T, None, bv), lambda b, h, j: (b, 0, h, j))
        self.seq_nat_tok = pl.BlockSpec((None, T, None), lambda b, h, j: (b, 0, h))
        self.seq_rel = pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0))
        self.seq_buf = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b, h, j: (b, h, 0, 0))
        self.seq_buf_v = pl.BlockSpec((None, None, Tp, bv), lambda b, h, j: (b, h, 0, j))
        self.seq_states = pl.BlockSpec((None, None, N * K, bv), lambda b, h, j: (b, h, 0, j))
        self.seq_state = pl.BlockSpec((None, None, K, bv), lambda b, h, j: (b, h, 0, j))


def _call(spec: Spec, body, name: str, tiles: KernelTiles, grid, inputs: dict, outputs: dict):
    return call(body, name, grid, inputs, outputs, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                interpret=spec.env.target.interpret, spec=spec)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _key_inputs(spec: Spec, k, kws, sp_nat):
    return {"k": (k, sp_nat), "kw": (kws if spec.key != "same" else None, sp_nat)}


def _forward(spec: Spec, q, k, kws, v, beta, g, rel, S0):
    B, H, N, C, K, V, Tp = spec.B, spec.H, spec.N, spec.C, spec.K, spec.V, spec.Tp
    op = spec.env.op
    tl = spec.tiles
    sp = _Specs(spec)
    chunked = dict(beta=(beta, sp.nat_tok), g=(g, sp.nat_tok), rel=(rel, sp.rel))
    intra = _call(spec, _intra_kernel, "delta_rule_intra", tl.intra, (B, H, N),
                  {**_key_inputs(spec, k, kws, sp.nat(K)), "v": (v, sp.nat(V)), **chunked},
                  dict(t=(_sds((B, H, Tp, C), f32), sp.buf(C)), w=(_sds((B, H, Tp, K), op), sp.buf(K)),
                       u=(_sds((B, H, Tp, V), f32), sp.buf(V)), kt=(_sds((B, H, Tp, K), op), sp.buf(K))))
    bv = tl.states.bv
    ss = _Specs(spec, bv)
    states = _call(spec, _states_kernel, "delta_rule_states", tl.states, (B, H, V // bv),
                   dict(w=(intra["w"], ss.seq_buf(K)), u=(intra["u"], ss.seq_buf_v), kt=(intra["kt"], ss.seq_buf(K)),
                        g=(g, ss.seq_nat_tok), rel=(rel, ss.seq_rel), s0=(S0, ss.seq_state)),
                   dict(s_in=(_sds((B, H, N * K, V), op), ss.seq_states), vn=(_sds((B, H, Tp, V), op), ss.seq_buf_v),
                        s_fin=(_sds((B, H, K, V), f32), ss.seq_state)))
    out = _call(spec, _output_kernel, "delta_rule_output", tl.output, (B, H, N),
                dict(q=(q, sp.nat(K)), **_key_inputs(spec, k, kws, sp.nat(K)), g=(g, sp.nat_tok), rel=(rel, sp.rel),
                     s_in=(states["s_in"], sp.state), vn=(states["vn"], sp.buf(V))),
                dict(o=(_sds((B, spec.env.T, H, V), v.dtype), sp.nat(V))))
    return (out["o"], states["s_fin"]), (intra["t"], states["s_in"], states["vn"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(spec: Spec, q, k, kws, v, beta, g, rel, S0):
    return _forward(spec, q, k, kws, v, beta, g, rel, S0)[0]


def _core_fwd(spec: Spec, q, k, kws, v, beta, g, rel, S0):
    out, (T_inv, S_in, v_new) = _forward(spec, q, k, kws, v, beta, g, rel, S0)
    return out, (q, k, kws, v, beta, g, rel, T_inv, S_in, v_new)


def _core_bwd(spec: Spec, res, cotangents):
    q, k, kws, v, beta, g, rel, T_inv, S_in, v_new = res
    dO, dS_final = cotangents
    B, H, N, C, K, V, Tp = spec.B, spec.H, spec.N, spec.C, spec.K, spec.V, spec.Tp
    op = spec.env.op
    tl = spec.tiles
    sp = _Specs(spec)
    chunked = dict(beta=(beta, sp.nat_tok), g=(g, sp.nat_tok), rel=(rel, sp.rel))
    local = _call(spec, _bwd_local_kernel, "delta_rule_bwd_local", tl.bwd_local, (B, H, N),
                  dict(q=(q, sp.nat(K)), **_key_inputs(spec, k, kws, sp.nat(K)), **chunked, t=(T_inv, sp.buf(C)),
                       do=(dO, sp.nat(V))),
                  dict(w=(_sds((B, H, Tp, K), op), sp.buf(K)), kt=(_sds((B, H, Tp, K), op), sp.buf(K)),
                       qf=(_sds((B, H, Tp, K), op), sp.buf(K)), dvl=(_sds((B, H, Tp, V), f32), sp.buf(V))))
    bv = tl.states_bwd.bv
    ss = _Specs(spec, bv)
    serial = _call(spec, _states_bwd_kernel, "delta_rule_states_bwd", tl.states_bwd, (B, H, V // bv),
                   dict(w=(local["w"], ss.seq_buf(K)), kt=(local["kt"], ss.seq_buf(K)), qf=(local["qf"], ss.seq_buf(K)),
                        dvl=(local["dvl"], ss.seq_buf_v), do=(dO, ss.seq_nat_v), g=(g, ss.seq_nat_tok),
                        rel=(rel, ss.seq_rel), dsfin=(dS_final, ss.seq_state)),
                   dict(dsout=(_sds((B, H, N * K, V), op), ss.seq_states), dvn=(_sds((B, H, Tp, V), op), ss.seq_buf_v),
                        ds0=(_sds((B, H, K, V), f32), ss.seq_state)))
    vec = pl.BlockSpec((None, None, C), lambda b, h, n: (b, h, n))  # our [B, H, T_pad] buffers
    buf_vec = lambda: _sds((B, H, Tp), f32)  # noqa: E731
    buf_cc = lambda: _sds((B, H, Tp, C), f32)  # noqa: E731
    gate_only = lambda x: x if spec.gate else (None, None)  # noqa: E731
    keys = _key_inputs(spec, k, kws, sp.nat(K))
    states = dict(s_in=(S_in, sp.state), dsout=(serial["dsout"], sp.state), vn=(v_new, sp.buf(V)),
                  dvn=(serial["dvn"], sp.buf(V)))
    wy_out = dict(dv=(_sds(v.shape, v.dtype), sp.nat(V)), dt=(buf_cc(), sp.buf(C)), db_part=(buf_vec(), vec))
    if spec.gate:
        wy_out["dg_part"] = (buf_vec(), vec)
    wy = _call(spec, _grads_wy_kernel, "delta_rule_grads_wy", tl.grads_wy, (B, H, N),
               dict(**keys, v=(v, sp.nat(V)), **chunked, t=(T_inv, sp.buf(C)), **states), wy_out)
    a_out = dict(da=(buf_cc(), sp.buf(C)), db_out=(buf_vec(), vec))
    if spec.gate:
        a_out["dg_out"] = (buf_vec(), vec)
    ga = _call(spec, _grads_a_kernel, "delta_rule_grads_a", tl.grads_a, (B, H, N),
               dict(**keys, **chunked, t=(T_inv, sp.buf(C)), dt=(wy["dt"], sp.buf(C)), db_part=(wy["db_part"], vec),
                    dg_part=gate_only((wy.get("dg_part"), vec))), a_out)
    k_out = dict(dk=(_sds(k.shape, k.dtype), sp.nat(K)))
    if spec.key != "same":
        k_out["dkw"] = (_sds(kws.shape, kws.dtype), sp.nat(K))
    if spec.gate:
        k_out["dg_out"] = (buf_vec(), vec)
    gk = _call(spec, _grads_k_kernel, "delta_rule_grads_k", tl.grads_k, (B, H, N),
               dict(q=(q, sp.nat(K)), **keys, **chunked, t=(T_inv, sp.buf(C)), do=(dO, sp.nat(V)), **states,
                    da=(ga["da"], sp.buf(C)), dg_part=gate_only((ga.get("dg_out"), vec))), k_out)
    q_out = dict(dq=(_sds(q.shape, q.dtype), sp.nat(K)), db=(_sds(beta.shape, beta.dtype), sp.nat_tok))
    if spec.gate:
        q_out["dg"] = (_sds(g.shape, g.dtype), sp.nat_tok)
    gq = _call(spec, _grads_q_kernel, "delta_rule_grads_q", tl.grads_q, (B, H, N),
               dict(q=(q, sp.nat(K)), **keys, **chunked, do=(dO, sp.nat(V)), **states,
                    db_part=(ga["db_out"], vec), dg_part=gate_only((gk.get("dg_out"), vec))), q_out)
    return (gq["dq"], gk["dk"], gk.get("dkw"), wy["dv"], gq["db"], gq.get("dg"), None, serial["ds0"])


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------
# entry point


def supported(K: int, V: int, chunk_size: int) -> str | None:
    """None when the kernels cover these sizes, else the reason they do not."""
    if chunk_size not in CHUNK_SIZES:
        return f"chunk_size {chunk_size} (the kernels take {CHUNK_SIZES})"
    if max(K, V) > MAX_HEAD_DIM:
        return f"head dims K={K}, V={V} (the kernels take up to {MAX_HEAD_DIM}, padded to a power of two)"
    return None


def _pad_last(x, n):
    if x is None or x.shape[-1] == n:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def delta_rule_pallas(q, k, v, beta, *, write_key=None, write_scale=None, log_decay=None, scale,
                      initial_state=None, segment_ids=None, chunk_size=64, precision: str | None = None,
                      target: Target | None = None):
    """Same contract and results as ``osdn_jax.ops.chunked.delta_rule_chunked``, plus
    ``write_scale d [B, T, H, K]`` (fp32): the write key is ``d ⊙ k``, formed in the kernels.

    ``precision`` and ``target``: see ``osdn_jax.kernels.config`` (default: the input dtype's
    policy; the target in force).
    """
    if write_key is not None and write_scale is not None:
        raise ValueError("write_key, write_scale: pass at most one")
    target = current_target() if target is None else target
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    reason = supported(K, V, C)
    if reason is not None:
        raise ValueError(f"impl='pallas': unsupported {reason}")
    Kp, Vp = padded_dim(K), padded_dim(V)
    policy: Policy = policy_for(k.dtype, precision)
    key = "same" if write_key is None and write_scale is None else ("key" if write_scale is None else "scale")
    kws = write_key if write_scale is None else write_scale.astype(f32)
    q, k, kws = (_pad_last(x, Kp) for x in (q, k, kws))
    v = _pad_last(v, Vp)
    rel = None if segment_ids is None else chunk_document_numbers(segment_ids, C)[1].reshape(B, -1)
    if initial_state is None:
        S0 = jnp.zeros((B, H, Kp, Vp), f32)
    else:
        S0 = jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    spec = Spec(Env(policy, target, C, T), B, H, Kp, Vp, float(scale), log_decay is not None,
                segment_ids is not None, key, tiles_for(Kp, Vp, C, policy, target.arch))
    o, S_final = _core(spec, q, k, kws, v, beta, log_decay, rel, S0)
    return o[..., :V], S_final[:, :, :K, :V]
