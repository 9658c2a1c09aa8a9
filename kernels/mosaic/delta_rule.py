"""The chunkwise delta rule (OSDN phase 2) with its serial passes on Mosaic GPU (Hopper), forward
and backward (``jax.custom_vjp``).

Same contract and math as ``osdn_jax.ops.chunked`` (see its docstring). The work splits by shape:

- **Per chunk, all chunks in parallel** (XLA, fp32): ``A = strict(diag(β) K K̃ᵀ ⊙ D)``, the
  triangular solve ``T = (I + A)⁻¹``, the WY factors ``W = T (β fs K)`` and ``U = T (β V)``, the
  masked scores ``P = scale (Q K̃ᵀ ⊙ D)``, and in the backward every gradient once the states are
  known (``osdn_jax.ops.chunked.grads_per_chunk``): batched matmuls over all ``B·H·N`` chunks at
  once.
- **Serial over chunks** (Mosaic GPU, ``state_pass``): the state pass fused with the output
  (``V' = U − W S``, ``O = Qs S + P V'``, ``S ← a S + KTᵀ V'``) and the reverse pass for the state
  cotangent. Operands in the input dtype (bf16 / fp16) by TMA into swizzled SMEM, double
  buffered; ``wgmma`` with fp32 accumulators; the fp32 state tile ``[K, 64]`` in registers.

OSDN's write key ``d ⊙ k`` is formed in the per-chunk stage. Documents (``segment_ids``), the
gate, initial and final state are folded into ``D``, ``fs`` and the chunk decays ``a`` there, so
the kernels see one shape of problem. T is zero-padded to a multiple of C = 64 (inert tokens),
head dims to 64 or 128 (K) and a multiple of 64 (V).

When ``B · H · V/64`` programs cannot fill the GPU, each sequence is cut into pieces that run side
by side (``pieces_for``): the pieces' affine maps ``S_exit = M S_entry + N`` (the summary pass)
give every piece its entry state, and the backward combines the transposed maps the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from osdn_jax.kernels.config import Target
from osdn_jax.kernels.mosaic import state_pass
from osdn_jax.ops.chunked import chunk_layout, forward_parts, grads_per_chunk, unit_lower_inverse

f32 = jnp.float32
C = state_pass.C
OPERANDS = ("bfloat16", "float16")
_HI = jax.lax.Precision.HIGHEST


def _mm(spec, a, b):
    return jnp.einsum(spec, a, b, precision=_HI)


def padded_head(n: int) -> int:
    """The head dim the kernels compute in: K padded to 64 or 128."""
    return 64 if n <= 64 else 128


def padded_value(n: int) -> int:
    return -(-n // state_pass.BV) * state_pass.BV


def supported(K: int, V: int, chunk_size: int, operand: str, arch: str, T: int | None = None) -> str | None:
    """None when the Mosaic kernels cover these arguments, else the reason they do not."""
    if arch != "sm_90":
        return f"GPU generation {arch} (the Mosaic kernels use Hopper's wgmma and TMA: sm_90 only)"
    if operand not in OPERANDS:
        return (f"{operand} operands (the Mosaic kernels take bf16 / fp16 inputs; fp32 inputs run the Triton "
                "kernels' TF32 / IEEE policies)")
    if chunk_size != C:
        return f"chunk_size {chunk_size} (the Mosaic kernels take {C}: one warpgroup's wgmma tile is 64 rows)"
    if max(K, V) > max(state_pass.HEAD_DIMS):
        return (f"head dims K={K}, V={V} (the Mosaic kernels take up to {max(state_pass.HEAD_DIMS)}: the state "
                f"tile [K, 64] sits in one warpgroup's registers, and K=256 would need "
                f"{state_pass.smem_bytes(256) // 1024} KiB of shared memory, over Hopper's "
                f"{state_pass.SMEM_BYTES // 1024} KiB)")
    if T is not None and -(-T // C) > state_pass.MAX_CHUNKS:
        return f"T={T} (the Mosaic kernels take up to {state_pass.MAX_CHUNKS * C} tokens per sequence)"
    return None


SMS = 132  # streaming multiprocessors of an H100 / H200
MIN_PIECE_CHUNKS = 8  # a piece of a split sequence spans at least this many chunks (512 tokens)


def pieces_for(B: int, H: int, V: int, N: int) -> int:
    """How many pieces to split each sequence into so that the serial passes fill the GPU: the
    passes run one program per (row, head, 64 value columns); below ``SMS`` programs, double the
    pieces while each keeps at least ``MIN_PIECE_CHUNKS`` chunks. 1: no split."""
    programs = B * H * (V // state_pass.BV)
    P = 1
    while programs * P < SMS and N // (2 * P) >= MIN_PIECE_CHUNKS:
        P *= 2
    return P


@dataclasses.dataclass(frozen=True)
class _Static:
    has_gate: bool
    op: str  # operand dtype name
    out: str  # output dtype name
    interpret: bool
    pieces: int  # each sequence runs as this many pieces side by side (1: whole)

    @property
    def interpret_params(self):
        if not self.interpret:
            return None
        from jax.experimental.pallas import mosaic_gpu as plgpu

        _check_interpreter_threads()
        return plgpu.InterpretGPUParams(detect_races=True)


INTERPRETER_THREADS = 4


def _check_interpreter_threads():
    """Mosaic GPU's interpreter runs each warpgroup of a kernel (two here) as its own computation on
    JAX's CPU thread pool, beside the computation that launched them; with fewer than 4 pool
    threads a warpgroup waiting on a barrier can starve the other one, and the call never returns.
    XLA's CPU client sizes the pool by the NPROC environment variable, else by the CPUs."""
    pool = os.environ.get("NPROC", "")
    threads = int(pool) if pool.isdigit() else len(os.sched_getaffinity(0))
    if threads < INTERPRETER_THREADS:
        raise RuntimeError(f"interpreting the Mosaic GPU kernels needs {INTERPRETER_THREADS} or more CPU pool threads "
                           f"(one per warpgroup plus the caller's); this process has {threads}. Start it with "
                           f"NPROC={INTERPRETER_THREADS} (or more) in the environment, set before JAX starts.")


def _to_pieces(x, P, dtype=None, fill=0.0):
    """Chunked ``[N, B, H, C, d]`` → head-major ``[B·P, H, L·C, d]``: each sequence cut into P pieces
    of L = ⌈N/P⌉ chunks (the last padded with ``fill`` chunks), a piece per row."""
    N, B, H, Cc, d = x.shape
    L = -(-N // P)
    x = jnp.pad(x, [(0, P * L - N)] + [(0, 0)] * 4, constant_values=fill)
    x = jnp.transpose(x.reshape(P, L, B, H, Cc, d), (2, 0, 3, 1, 4, 5)).reshape(B * P, H, L * Cc, d)
    return x if dtype is None else x.astype(dtype)


def _from_pieces(x, P, rows):
    """Head-major ``[B·P, H, L·r, d]`` (r rows per chunk) → ``[B, H, N·r, d]`` for the first ``rows`` = N·r."""
    BP, H, Lr, d = x.shape
    x = jnp.transpose(x.reshape(BP // P, P, H, Lr, d), (0, 2, 1, 3, 4)).reshape(BP // P, H, P * Lr, d)
    return x[:, :, :rows]


def _from_kernel(x, N):
    """Head-major ``[B, H, N·r, d]`` (r rows per chunk: C tokens, or K for the per-chunk states) →
    chunked ``[N, B, H, r, d]`` (fp32)."""
    B, H, Tp, d = x.shape
    return jnp.transpose(x.reshape(B, H, N, Tp // N, d), (2, 0, 1, 3, 4)).astype(f32)


def _piece_decays(a, P):
    """``a [N, B, H]`` → ``[B·P, H, L_pad]`` (padded chunks keep the state: a = 1; L_pad a multiple
    of 4, for 16-byte TMA rows)."""
    N, B, H = a.shape
    L = -(-N // P)
    a = jnp.pad(a, ((0, P * L - N), (0, 0), (0, 0)), constant_values=1.0)
    a = jnp.transpose(a.reshape(P, L, B, H), (2, 0, 3, 1)).reshape(B * P, H, L)
    return jnp.pad(a, ((0, 0), (0, 0), (0, (-L) % 4)))


def _operands(st: _Static, q, k, kw, v, b, G, within, carry, Tm=None):
    """The per-chunk factors the serial passes read, in chunked layout (fp32); ``Tm``: the saved
    inverse (the backward), else solved here."""
    D, fs, a, _, A = forward_parts(q, k, kw, v, b, G if st.has_gate else None, within, carry)
    Tm = unit_lower_inverse(A) if Tm is None else Tm
    W = _mm("...ij,...jk->...ik", Tm, (b * fs)[..., None] * k)
    U = _mm("...ij,...jv->...iv", Tm, b[..., None] * v)
    P = _mm("...ik,...jk->...ij", q, kw) * D
    KT = kw * D[..., -1, :, None]
    Qs = q * fs[..., None]
    return Tm, W, U, P, KT, Qs, jnp.broadcast_to(a, b.shape[:-1])


def _piece_maps(st: _Static, wn, kt, U, a, B, H):
    """The affine map of every piece, ``S_exit = M S_entry + N``: the summary pass over K + V state
    columns from ``[I | 0]`` with values ``[0 | U]``. Returns ``M [B, P, H, K, K]``, ``N [B, P, H, K, V]``."""
    K, V = wn.shape[-1], U.shape[-1]
    U_aug = jnp.concatenate([jnp.zeros((*U.shape[:-1], K), f32), U], axis=-1)
    start = jnp.concatenate([jnp.broadcast_to(jnp.eye(K, dtype=f32), (B * st.pieces, H, K, K)),
                             jnp.zeros((B * st.pieces, H, K, V), f32)], axis=-1)
    maps = state_pass.states_forward(None, wn, kt, None, _to_pieces(U_aug, st.pieces), a, start,
                                     out_dtype=jnp.dtype(st.op), interpret=st.interpret_params)
    maps = maps.reshape(B, st.pieces, H, K, K + V)
    return maps[..., :K], maps[..., K:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st: _Static, q, k, kw, v, b, G, S0, within, carry):
    """Chunked layout in (fp32), as ``osdn_jax.ops.chunked._chunk_core``; returns ``o [B, H, N·C, V]``
    (output dtype, head-major) and the final state."""
    return _core_fwd(st, q, k, kw, v, b, G, S0, within, carry)[0]


def _core_fwd(st: _Static, q, k, kw, v, b, G, S0, within, carry):
    N, B, H, _, K = q.shape
    V, P = v.shape[-1], st.pieces
    Tm, W, U, Pm, KT, Qs, a = _operands(st, q, k, kw, v, b, G, within, carry)
    wn, kt, a_k = _to_pieces(-W, P, st.op), _to_pieces(KT, P, st.op), _piece_decays(a, P)
    maps = None
    S_entry = S0
    if P > 1:  # the pieces' entry states, in order: S_entry[p + 1] = M_p S_entry[p] + N_p
        maps = _piece_maps(st, wn, kt, U, a_k, B, H)
        entries, S = [], S0
        for p in range(P):
            entries.append(S)
            S = jnp.einsum("bhij,bhjv->bhiv", maps[0][:, p], S, precision=_HI) + maps[1][:, p]
        S_entry = jnp.stack(entries, axis=1).reshape(B * P, H, K, V)
    o, S_in, v_new, S_final = state_pass.states_forward(
        _to_pieces(Qs, P, st.op), wn, kt, _to_pieces(Pm, P, st.op), _to_pieces(U, P), a_k, S_entry,
        out_dtype=jnp.dtype(st.out), interpret=st.interpret_params)
    o, S_in, v_new = _from_pieces(o, P, N * C), _from_pieces(S_in, P, N * K), _from_pieces(v_new, P, N * C)
    S_final = S_final.reshape(B, P, H, K, V)[:, -1]
    return (o, S_final), (q, k, kw, v, b, G, within, carry, Tm, S_in, v_new, None if maps is None else maps[0])


def _core_bwd(st: _Static, res, cotangents):
    q, k, kw, v, b, G, within, carry, Tm, S_in, v_new, M = res
    dO, dS_final = cotangents
    N, B, H, _, K = q.shape
    V, P = v.shape[-1], st.pieces
    _, W, _, Pm, KT, Qs, a = _operands(st, q, k, kw, v, b, G, within, carry, Tm)
    dO_c = _from_kernel(dO, N)
    dvo = _mm("...ij,...iv->...jv", Pm, dO_c)
    operands = (_to_pieces(Qs, P, st.op), _to_pieces(-W, P, st.op), _to_pieces(KT, P, st.op),
                dO.astype(st.op) if P == 1 else _to_pieces(dO_c, P, st.op), _to_pieces(dvo, P), _piece_decays(a, P))
    dS_exit = dS_final.astype(f32)
    if P > 1:  # what reaches each piece's exit: dS_exit[p − 1] = M_pᵀ dS_exit[p] + G_p
        G_local = state_pass.states_backward(*operands, jnp.zeros((B * P, H, K, V), f32),
                                             interpret=st.interpret_params)[2].reshape(B, P, H, K, V)
        exits, d = [], dS_exit
        for p in reversed(range(P)):
            exits.append(d)
            d = jnp.einsum("bhji,bhjv->bhiv", M[:, p], d, precision=_HI) + G_local[:, p]
        dS_exit = jnp.stack(exits[::-1], axis=1).reshape(B * P, H, K, V)
    dS_out, dv_new, dS0 = state_pass.states_backward(*operands, dS_exit, interpret=st.interpret_params)
    dS_out, dv_new = _from_pieces(dS_out, P, N * K), _from_pieces(dv_new, P, N * C)
    dS0 = dS0.reshape(B, P, H, K, V)[:, 0]
    dq, dk, dkw, dv, db, dG = grads_per_chunk(
        st.has_gate, q, k, kw, v, b, G if st.has_gate else None, within, carry, Tm, _from_kernel(S_in, N),
        _from_kernel(v_new, N), dO_c, _from_kernel(dv_new, N), _from_kernel(dS_out, N))
    if dG is None:
        dG = jnp.zeros_like(G)
    return dq, dk, dkw, dv, db, dG, dS0, None, None


_core.defvjp(_core_fwd, _core_bwd)


def _pad_last(x, n):
    if x is None or x.shape[-1] == n:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def delta_rule_mosaic(q, k, v, beta, *, write_key=None, write_scale=None, log_decay=None, scale,
                      initial_state=None, segment_ids=None, chunk_size=64, target: Target, pieces: int | None = None):
    """Same contract and results as ``osdn_jax.kernels.delta_rule.delta_rule_pallas`` (``write_scale``:
    OSDN's ``d``, the write key is ``d ⊙ k``), for bf16 / fp16 inputs on Hopper.

    ``target.interpret``: run the kernels in Mosaic GPU's interpreter (TMA, barriers and wgmma
    simulated on the CPU, with its race detector on). ``pieces``: split each sequence into this
    many pieces that run side by side (default ``pieces_for``: only when B·H leaves the GPU idle)."""
    if write_key is not None and write_scale is not None:
        raise ValueError("write_key, write_scale: pass at most one")
    B, T, H, K = k.shape
    V = v.shape[-1]
    reason = supported(K, V, chunk_size, jnp.dtype(k.dtype).name, target.arch, T)
    if reason is not None:
        raise ValueError(f"impl='pallas' (Mosaic GPU kernels): unsupported {reason}")
    Kp, Vp = padded_head(K), padded_value(V)
    kw = write_key
    if write_scale is not None:
        kw = write_scale.astype(f32) * k.astype(f32)
    q, k, kw = (_pad_last(x, Kp) for x in (q, k, kw))
    v_p = _pad_last(v, Vp)
    parts = chunk_layout(q, k, v_p, beta, write_key=kw, log_decay=log_decay, scale=scale, segment_ids=segment_ids,
                         C=C)
    if initial_state is None:
        S0 = jnp.zeros((B, H, Kp, Vp), f32)
    else:
        S0 = jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    q_c, k_c, kw_c, v_c, b_c, G, within, carry = parts
    n_chunks = q_c.shape[0]
    if pieces is None:
        pieces = pieces_for(B, H, Vp, n_chunks)
    if not 1 <= pieces <= n_chunks:
        raise ValueError(f"pieces: expected 1 ≤ pieces ≤ {n_chunks} (the chunks of T={T}), got {pieces}")
    st = _Static(log_decay is not None, jnp.dtype(k.dtype).name, jnp.dtype(v.dtype).name, target.interpret, pieces)
    o, S_final = _core(st, q_c, k_c, kw_c, v_c, b_c, G, S0, within, carry)
    o = jnp.transpose(o, (0, 2, 1, 3))[:, :T, :, :V]
    return o, S_final[:, :, :K, :V]
