"""Pallas (Triton) kernels for the chunkwise delta rule (OSDN phase 2), forward and backward.

Same math as ``osdn_jax.ops.chunked`` (see its docstring): read/erase key ``k``, write key ``k̃``,
optional log-decay gate, packed documents, initial and final state. Five kernels:

forward
  1. ``intra``   grid (B, H, N): ``A``, ``T = (I + A)⁻¹`` by forward substitution in fp32, ``W``, ``U``.
  2. ``states``  grid (B, H, V/BV): one serial pass over chunks carrying the fp32 state ``[K, BV]``;
     writes the chunk-entry states and ``V' = U − W S``.
  3. ``output``  grid (B, H, N): ``O = (q ⊙ exp(G) ⊙ c) S + (q k̃ᵀ ⊙ D) V'``.
backward (saves the inputs, ``T`` and the chunk-entry states)
  4. ``states_bwd`` grid (B, H, V/BV): reverse pass over chunks for the state cotangent, writing
     ``dV'`` and the cotangent of every chunk's exit state.
  5. ``grads``   grid (B, H, N): all other gradients per chunk, in parallel.

Layout inside: head-major ``[B, H, T, ·]`` with T padded to a multiple of the chunk and head dims
padded to a power of two ≥ 16 (padding is inert and sliced away). Everything is fp32 and every dot
is IEEE fp32 (``HIGHEST``). Triton rules respected: power-of-two blocks, ``fori_loop`` only,
``pl.ds`` on refs, no value slicing, no triangular solve. On a CPU backend the kernels run with
``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from osdn_jax.ops.segments import chunk_documents

_HI = lax.Precision.HIGHEST
_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=1)
CHUNK_SIZES = (16, 32, 64)
MAX_HEAD_DIM = 128


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _dot(a, b):
    return jnp.dot(a, b, precision=_HI)


def _dot_tn(a, b):
    """``aᵀ b``."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HI)


def _dot_nt(a, b):
    """``a bᵀ``."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HI)


def _gates(G, doc, carry, C):
    """Per chunk from ``G, doc, carry [C]``: ``D [C, C]``, ``fs = exp(G) ⊙ c [C]``,
    ``d_last = D[C−1, :] [C]``, ``a = c_C exp(G_C)`` (scalar), and the row/col iotas."""
    rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    within = (rows >= cols) & (doc[:, None] == doc[None, :])
    D = jnp.where(within, jnp.exp(jnp.where(within, G[:, None] - G[None, :], 0.0)), 0.0)
    fs = jnp.exp(G) * carry
    d_last = jnp.sum(jnp.where(rows == C - 1, D, 0.0), axis=0)
    last = lax.broadcasted_iota(jnp.int32, (C,), 0) == C - 1
    a = jnp.sum(jnp.where(last, fs, 0.0))
    return D, fs, d_last, a, rows, cols


def _unit_lower_inverse(A, rows, cols):
    """``(I + A)⁻¹`` for strictly lower ``A [C, C]``, row by row (forward substitution, fp32)."""
    C = A.shape[0]

    def row(i, T):
        a_i = jnp.sum(jnp.where(rows == i, A, 0.0), axis=0)  # row i of A
        new = jnp.where(cols == i, 1.0, 0.0) - jnp.sum(a_i[:, None] * T, axis=0)[None, :]
        return jnp.where(rows == i, new, T)

    return lax.fori_loop(1, C, row, (rows == cols).astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# forward kernels


def _intra_kernel(k_ref, kw_ref, v_ref, b_ref, g_ref, doc_ref, c_ref, t_ref, w_ref, u_ref, *, C):
    k, kw, b = k_ref[...], kw_ref[...], b_ref[...]
    D, fs, _, _, rows, cols = _gates(g_ref[...], doc_ref[...], c_ref[...], C)
    A = jnp.where(rows > cols, _dot_nt(k, kw) * b[:, None] * D, 0.0)
    T = _unit_lower_inverse(A, rows, cols)
    t_ref[...] = T
    w_ref[...] = _dot(T, (b * fs)[:, None] * k)
    u_ref[...] = _dot(T, b[:, None] * v_ref[...])


def _states_kernel(w_ref, u_ref, kw_ref, g_ref, doc_ref, c_ref, s0_ref, sin_ref, vn_ref, sfin_ref, *, C, N, K):
    def chunk(n, S):
        tok = pl.ds(n * C, C)
        _, _, d_last, a, _, _ = _gates(g_ref[tok], doc_ref[tok], c_ref[tok], C)
        sin_ref[pl.ds(n * K, K), :] = S
        v_new = u_ref[tok, :] - _dot(w_ref[tok, :], S)
        vn_ref[tok, :] = v_new
        return a * S + _dot_tn(kw_ref[tok, :] * d_last[:, None], v_new)

    sfin_ref[...] = lax.fori_loop(0, N, chunk, s0_ref[...])


def _output_kernel(q_ref, kw_ref, g_ref, doc_ref, c_ref, s_ref, vn_ref, o_ref, *, C):
    q, kw = q_ref[...], kw_ref[...]
    D, fs, _, _, _, _ = _gates(g_ref[...], doc_ref[...], c_ref[...], C)
    P = _dot_nt(q, kw) * D
    o_ref[...] = _dot(q * fs[:, None], s_ref[...]) + _dot(P, vn_ref[...])


# ----------------------------------------------------------------------------------------------
# backward kernels


def _states_bwd_kernel(q_ref, k_ref, kw_ref, b_ref, g_ref, doc_ref, c_ref, t_ref, do_ref, dsfin_ref,
                       dsout_ref, dvn_ref, ds0_ref, *, C, N, K):
    def chunk(i, dS):
        n = N - 1 - i
        tok = pl.ds(n * C, C)
        q, kw, b = q_ref[tok, :], kw_ref[tok, :], b_ref[tok]
        D, fs, d_last, a, _, _ = _gates(g_ref[tok], doc_ref[tok], c_ref[tok], C)
        W = _dot(t_ref[tok, :], (b * fs)[:, None] * k_ref[tok, :])
        dO = do_ref[tok, :]
        dv_new = _dot_tn(_dot_nt(q, kw) * D, dO) + _dot(kw * d_last[:, None], dS)
        dsout_ref[pl.ds(n * K, K), :] = dS
        dvn_ref[tok, :] = dv_new
        return _dot_tn(q * fs[:, None], dO) + a * dS - _dot_tn(W, dv_new)

    ds0_ref[...] = lax.fori_loop(0, N, chunk, dsfin_ref[...])


def _grads_kernel(q_ref, k_ref, kw_ref, v_ref, b_ref, g_ref, doc_ref, c_ref, t_ref, s_ref, dsout_ref,
                  do_ref, dvn_ref, dq_ref, dk_ref, dkw_ref, dv_ref, db_ref, dg_ref, *, C):
    q, k, kw, v, b = q_ref[...], k_ref[...], kw_ref[...], v_ref[...], b_ref[...]
    T, S_in, dS_out, dO, dv_new = t_ref[...], s_ref[...], dsout_ref[...], do_ref[...], dvn_ref[...]
    D, fs, d_last, a, rows, cols = _gates(g_ref[...], doc_ref[...], c_ref[...], C)
    KKW, QKW = _dot_nt(k, kw), _dot_nt(q, kw)
    Wr, Ur = (b * fs)[:, None] * k, b[:, None] * v
    v_new = _dot(T, Ur) - _dot(_dot(T, Wr), S_in)

    dQs = _dot_nt(dO, S_in)
    dP = _dot_nt(dO, v_new) * D
    dW = -_dot_nt(dv_new, S_in)
    dKT = _dot_nt(v_new, dS_out)
    da = jnp.sum(S_in * dS_out)

    dq = dQs * fs[:, None] + _dot(dP, kw)
    dkw = _dot_tn(dP, q) + dKT * d_last[:, None]
    dT = _dot_nt(dW, Wr) + _dot_nt(dv_new, Ur)
    dWr, dUr = _dot_tn(T, dW), _dot_tn(T, dv_new)
    dA = jnp.where(rows > cols, -_dot_nt(_dot_tn(T, dT), T), 0.0)  # −strict(Tᵀ dT Tᵀ)

    k_dWr = jnp.sum(dWr * k, axis=1)
    dA_D = dA * D
    M = dA_D * b[:, None]
    dq_ref[...] = dq
    dk_ref[...] = (b * fs)[:, None] * dWr + _dot(M, kw)
    dkw_ref[...] = dkw + _dot_tn(M, k)
    dv_ref[...] = b[:, None] * dUr
    db_ref[...] = jnp.sum(dUr * v, axis=1) + fs * k_dWr + jnp.sum(dA_D * KKW, axis=1)

    E = dP * QKW + dA_D * KKW * b[:, None]
    E = E + jnp.where(rows == C - 1, (jnp.sum(dKT * kw, axis=1) * d_last)[None, :], 0.0)
    dfs = jnp.sum(dQs * q, axis=1) + b * k_dWr
    last = lax.broadcasted_iota(jnp.int32, (C,), 0) == C - 1
    dg_ref[...] = jnp.sum(E, axis=1) - jnp.sum(E, axis=0) + dfs * fs + jnp.where(last, da * a, 0.0)


# ----------------------------------------------------------------------------------------------
# pallas_call wiring


class _Blocks:
    """The BlockSpecs every kernel uses. Per-chunk grids are (B, H, N); serial grids (B, H, V/BV)."""

    def __init__(self, Tp, K, V, C, BV):
        N = Tp // C
        self.v_blocks = V // BV
        self.chunk = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, n: (b, h, n, 0))  # [C, d] of chunk n
        self.chunk_tok = pl.BlockSpec((None, None, C), lambda b, h, n: (b, h, n))
        self.chunk_state = pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, n, 0))  # state of chunk n
        self.seq = lambda d: pl.BlockSpec((None, None, Tp, d), lambda b, h, j: (b, h, 0, 0))  # whole sequence
        self.seq_v = pl.BlockSpec((None, None, Tp, BV), lambda b, h, j: (b, h, 0, j))
        self.seq_tok = pl.BlockSpec((None, None, Tp), lambda b, h, j: (b, h, 0))
        self.state = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
        self.states = pl.BlockSpec((None, None, N * K, BV), lambda b, h, j: (b, h, 0, j))  # all chunk states


def _setup(cfg, k, v):
    """Sizes, a ``pallas_call`` with our compiler params, and the BlockSpecs."""
    C, BV, interpret = cfg
    B, H, Tp, K = k.shape
    V = v.shape[-1]
    call = functools.partial(pl.pallas_call, compiler_params=_PARAMS, interpret=interpret)
    return B, H, Tp, K, V, C, Tp // C, call, _Blocks(Tp, K, V, C, BV)


def _forward(cfg, q, k, kw, v, b, G, doc, carry, S0):
    B, H, Tp, K, V, C, N, call, blk = _setup(cfg, k, v)
    f32 = jnp.float32
    T_inv, W, U = call(
        functools.partial(_intra_kernel, C=C), grid=(B, H, N), name="delta_rule_intra",
        in_specs=[blk.chunk(K), blk.chunk(K), blk.chunk(V)] + [blk.chunk_tok] * 4,
        out_specs=(blk.chunk(C), blk.chunk(K), blk.chunk(V)),
        out_shape=(jax.ShapeDtypeStruct((B, H, Tp, C), f32), jax.ShapeDtypeStruct((B, H, Tp, K), f32),
                   jax.ShapeDtypeStruct((B, H, Tp, V), f32)),
    )(k, kw, v, b, G, doc, carry)
    S_in, v_new, S_final = call(
        functools.partial(_states_kernel, C=C, N=N, K=K), grid=(B, H, blk.v_blocks), name="delta_rule_states",
        in_specs=[blk.seq(K), blk.seq_v, blk.seq(K)] + [blk.seq_tok] * 3 + [blk.state],
        out_specs=(blk.states, blk.seq_v, blk.state),
        out_shape=(jax.ShapeDtypeStruct((B, H, N * K, V), f32), jax.ShapeDtypeStruct((B, H, Tp, V), f32),
                   jax.ShapeDtypeStruct((B, H, K, V), f32)),
    )(W, U, kw, G, doc, carry, S0)
    o = call(
        functools.partial(_output_kernel, C=C), grid=(B, H, N), name="delta_rule_output",
        in_specs=[blk.chunk(K), blk.chunk(K)] + [blk.chunk_tok] * 3 + [blk.chunk_state, blk.chunk(V)],
        out_specs=blk.chunk(V), out_shape=jax.ShapeDtypeStruct((B, H, Tp, V), f32),
    )(q, kw, G, doc, carry, S_in, v_new)
    return (o, S_final), (T_inv, S_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, kw, v, b, G, doc, carry, S0):
    return _forward(cfg, q, k, kw, v, b, G, doc, carry, S0)[0]


def _core_fwd(cfg, q, k, kw, v, b, G, doc, carry, S0):
    out, (T_inv, S_in) = _forward(cfg, q, k, kw, v, b, G, doc, carry, S0)
    return out, (q, k, kw, v, b, G, doc, carry, T_inv, S_in)


def _core_bwd(cfg, res, cotangents):
    q, k, kw, v, b, G, doc, carry, T_inv, S_in = res
    dO, dS_final = cotangents
    B, H, Tp, K, V, C, N, call, blk = _setup(cfg, k, v)
    f32 = jnp.float32
    dS_out, dv_new, dS0 = call(
        functools.partial(_states_bwd_kernel, C=C, N=N, K=K), grid=(B, H, blk.v_blocks), name="delta_rule_states_bwd",
        in_specs=[blk.seq(K)] * 3 + [blk.seq_tok] * 4 + [blk.seq(C), blk.seq_v, blk.state],
        out_specs=(blk.states, blk.seq_v, blk.state),
        out_shape=(jax.ShapeDtypeStruct((B, H, N * K, V), f32), jax.ShapeDtypeStruct((B, H, Tp, V), f32),
                   jax.ShapeDtypeStruct((B, H, K, V), f32)),
    )(q, k, kw, b, G, doc, carry, T_inv, dO, dS_final)
    dq, dk, dkw, dv, db, dG = call(
        functools.partial(_grads_kernel, C=C), grid=(B, H, N), name="delta_rule_grads",
        in_specs=[blk.chunk(K)] * 3 + [blk.chunk(V)] + [blk.chunk_tok] * 4
        + [blk.chunk(C), blk.chunk_state, blk.chunk_state, blk.chunk(V), blk.chunk(V)],
        out_specs=(blk.chunk(K),) * 3 + (blk.chunk(V), blk.chunk_tok, blk.chunk_tok),
        out_shape=(jax.ShapeDtypeStruct((B, H, Tp, K), f32),) * 3 + (jax.ShapeDtypeStruct((B, H, Tp, V), f32),)
        + (jax.ShapeDtypeStruct((B, H, Tp), f32),) * 2,
    )(q, k, kw, v, b, G, doc, carry, T_inv, S_in, dS_out, dO, dv_new)
    return dq, dk, dkw, dv, db, dG, None, None, dS0


_core.defvjp(_core_fwd, _core_bwd)


def supported(K: int, V: int, chunk_size: int) -> str | None:
    """None when the kernels cover these sizes, else the reason they do not."""
    if chunk_size not in CHUNK_SIZES:
        return f"chunk_size {chunk_size} (the kernels take {CHUNK_SIZES})"
    if max(K, V) > MAX_HEAD_DIM:
        return f"head dims K={K}, V={V} (the kernels take up to {MAX_HEAD_DIM}, padded to a power of two)"
    return None


def delta_rule_pallas(q, k, v, beta, *, write_key=None, log_decay=None, scale, initial_state=None,
                      segment_ids=None, chunk_size=64, interpret: bool | None = None):
    """Same contract and results as ``osdn_jax.ops.chunked.delta_rule_chunked``.

    ``interpret`` defaults to True unless the backend is a GPU.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    f32 = jnp.float32
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    reason = supported(K, V, C)
    if reason is not None:
        raise ValueError(f"impl='pallas': unsupported {reason}")
    Kp, Vp = max(_next_pow2(K), 16), max(_next_pow2(V), 16)
    N = -(-T // C)
    Tp = N * C

    def head_major(x, d, dp):  # [B, T, H, d] -> [B, H, Tp, dp], fp32, zero padded
        x = jnp.swapaxes(x.astype(f32), 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, dp - d)))

    def per_token(x):  # [B, T, H] -> [B, H, Tp]
        return jnp.pad(jnp.swapaxes(x.astype(f32), 1, 2), ((0, 0), (0, 0), (0, Tp - T)))

    q_h = head_major(q.astype(f32) * scale, K, Kp)
    k_h = head_major(k, K, Kp)
    kw_h = k_h if write_key is None else head_major(write_key, K, Kp)
    v_h = head_major(v, V, Vp)
    b_h = per_token(beta)
    if log_decay is None:
        G = jnp.zeros((B, H, Tp), f32)
    else:
        G = jnp.cumsum(per_token(log_decay).reshape(B, H, N, C), axis=-1).reshape(B, H, Tp)
    if segment_ids is None:
        doc = jnp.zeros((B, H, Tp), f32)
        carry = jnp.ones((B, H, Tp), f32)
    else:
        doc, carry = (jnp.broadcast_to(x.reshape(B, 1, Tp).astype(f32), (B, H, Tp))
                      for x in chunk_documents(segment_ids, C))
    S0 = jnp.zeros((B, H, Kp, Vp), f32)
    if initial_state is not None:
        S0 = jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    cfg = (C, min(Vp, 64), bool(interpret))
    o, S_final = _core(cfg, q_h, k_h, kw_h, v_h, b_h, G, doc, carry, S0)
    o = jnp.swapaxes(o[:, :, :T, :V], 1, 2).astype(v.dtype)
    return o, S_final[:, :, :K, :V]
