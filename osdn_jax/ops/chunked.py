"""The chunkwise (WY / UT-transform) delta rule in plain JAX (SPEC §4, phase 2).

For a chunk of C tokens entering with state ``S₀ [K, V]``, with ``G`` the cumulative log decay
inside the chunk (0 without a gate) and ``D[i, j] = exp(G_i − G_j)`` for ``j ≤ i`` in the same
document (else 0)::

    A  = strict_lower(diag(β) K K̃ᵀ ⊙ D)         # row i: erase key k_i, column j: write key k̃_j
    T  = (I + A)⁻¹                               # unit lower-triangular solve, fp32
    W  = T (β ⊙ c ⊙ exp(G) ⊙ K)      U = T (β ⊙ V)
    V' = U − W S₀                                # the values actually written
    O  = (c ⊙ exp(G) ⊙ Q) S₀ + (Q K̃ᵀ ⊙ D) V'
    S₁ = c_C exp(G_C) S₀ + (K̃ ⊙ D[C, :])ᵀ V'

``c_i`` is 1 while token i is still in the document that was open when the chunk began (packed
rows reset the state inside a chunk). Zero-padded tokens (β = 0, k = 0, g = 0) are inert, so T
need not be a multiple of C. Only the chunk-entry states go through a serial ``lax.scan``.

The backward is written out (``jax.custom_vjp``): it saves the inputs, ``T`` and the chunk-entry
states (T/C states, not T), recomputes ``W, U, V'``, runs one reverse scan over chunks for the
state cotangent and forms every other gradient per chunk in parallel. Everything is fp32 at
HIGHEST precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from osdn_jax.ops.segments import chunk_documents

_HI = lax.Precision.HIGHEST


def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=_HI)


def _to_chunks(x: jax.Array, C: int) -> jax.Array:
    """``[B, T, H, ...]`` (or ``[B, T]``) → ``[N, B, H, C, ...]`` (``[N, B, C]``), zero padded."""
    B, T = x.shape[:2]
    pad = (-T) % C
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, (T + pad) // C, C, *x.shape[2:])
    x = jnp.moveaxis(x, 1, 0)  # [N, B, C, ...]
    if x.ndim >= 4:
        x = jnp.moveaxis(x, 3, 2)  # [N, B, H, C, ...]
    return x


def _from_chunks(x: jax.Array, T: int) -> jax.Array:
    """``[N, B, H, C, V]`` → ``[B, T, H, V]``."""
    N, B, H, C, V = x.shape
    x = jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(B, N * C, H, V)
    return x[:, :T]


def _masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``exp(x)`` where ``mask``, 0 elsewhere; the exponent is masked first so no inf/NaN appears."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def unit_lower_inverse(A: jax.Array) -> jax.Array:
    """``(I + A)⁻¹ [..., C, C]`` for strictly lower-triangular ``A``: a triangular solve in fp32."""
    eye = jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape)
    return lax.linalg.triangular_solve(A, eye, left_side=True, lower=True, unit_diagonal=True)


def chunk_size_for(T: int, chunk_size: int) -> int:
    """The chunk actually used: ``chunk_size``, or the next power of two ≥ T when T is shorter."""
    return min(chunk_size, 1 << max(T - 1, 0).bit_length())


def _gates(G, within, carry, like):
    """``D [.., C, C]``, ``exp(G) ⊙ c [.., C]`` and ``c_C exp(G_C) [..]`` for one chunk layout.

    ``G [N, B, H, C]`` or None (no gate); ``within`` the causal (and same-document) mask;
    ``carry [N, B, 1, C]`` or None (no documents); ``like`` is β ``[N, B, H, C]``.
    """
    if G is None:
        D = jnp.broadcast_to(within, (*like.shape, like.shape[-1])).astype(jnp.float32)
        from_start = jnp.ones_like(like)
    else:
        D = _masked_exp(G[..., :, None] - G[..., None, :], within)
        from_start = jnp.exp(G)
    if carry is not None:
        from_start = from_start * carry
    return D, from_start, from_start[..., -1]


def _strict(x: jax.Array) -> jax.Array:
    return jnp.tril(x, -1)


def forward_parts(q, k, kw, v, b, G, within, carry):
    D, fs, a = _gates(G, within, carry, b)
    KKW = _mm("...ik,...jk->...ij", k, kw)
    A = KKW * b[..., :, None] * _strict(D)
    return D, fs, a, KKW, A


def match_varying(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` marked as varying over every manual mesh axis ``like`` varies over (inside a
    ``jax.shard_map`` with ``check_vma=True``): a scan carry that starts equal on every device but
    meets per-device data. Elsewhere it is ``x``."""
    varying = lambda a: jax.typeof(a).manual_axis_type.varying  # noqa: E731
    missing = tuple(sorted(varying(like) - varying(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def _state_pass(W, U, KT, a, S0):
    """Serial over chunks: ``V' = U − W S``, ``S ← a S + KTᵀ V'``. Returns entry states, V', last S."""
    S0 = match_varying(S0, W)

    def step(S, xs):
        W, U, KT, a = xs
        v_new = U - _mm("bhck,bhkv->bhcv", W, S)
        return a[..., None, None] * S + _mm("bhck,bhcv->bhkv", KT, v_new), (S, v_new)

    S_final, (S_in, v_new) = lax.scan(step, S0, (W, U, KT, a))
    return S_in, v_new, S_final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_core(has_gate, q, k, kw, v, b, G, S0, within, carry):
    """Chunked layout in and out: ``q, k, kw [N, B, H, C, K]``, ``v [N, B, H, C, V]``,
    ``b, G [N, B, H, C]``, ``S0 [B, H, K, V]``; returns ``o [N, B, H, C, V]`` and the last state."""
    return _chunk_core_fwd(has_gate, q, k, kw, v, b, G, S0, within, carry)[0]


def _chunk_core_fwd(has_gate, q, k, kw, v, b, G, S0, within, carry):
    G = G if has_gate else None
    D, fs, a, _, A = forward_parts(q, k, kw, v, b, G, within, carry)
    Tm = unit_lower_inverse(A)
    W = _mm("...ij,...jk->...ik", Tm, (b * fs)[..., None] * k)
    U = _mm("...ij,...jv->...iv", Tm, b[..., None] * v)
    S_in, v_new, S_final = _state_pass(W, U, kw * D[..., -1, :, None], a, S0)
    P = _mm("...ik,...jk->...ij", q, kw) * D
    o = _mm("...ck,...kv->...cv", q * fs[..., None], S_in) + _mm("...ij,...jv->...iv", P, v_new)
    return (o, S_final), (q, k, kw, v, b, G, within, carry, Tm, S_in)


def _chunk_core_bwd(has_gate, res, cotangents):
    q, k, kw, v, b, G, within, carry, Tm, S_in = res
    dO, dS_final = cotangents
    D, fs, a, KKW, _ = forward_parts(q, k, kw, v, b, G, within, carry)
    Wr, Ur = (b * fs)[..., None] * k, b[..., None] * v
    W = _mm("...ij,...jk->...ik", Tm, Wr)
    U = _mm("...ij,...jv->...iv", Tm, Ur)
    v_new = U - _mm("...ck,...kv->...cv", W, S_in)
    QKW = _mm("...ik,...jk->...ij", q, kw)
    P = QKW * D
    d_last = D[..., -1, :]
    KT = kw * d_last[..., None]

    # Reverse pass over chunks: dV' = Pᵀ dO + KT dS₁ and dS₀ = Qsᵀ dO + a dS₁ − Wᵀ dV'.
    dS_from_o = _mm("...ck,...cv->...kv", q * fs[..., None], dO)
    dv_from_o = _mm("...ij,...iv->...jv", P, dO)

    def step(dS_next, xs):
        dS_o, dv_o, KT, W, a = xs
        dv_new = dv_o + _mm("bhck,bhkv->bhcv", KT, dS_next)
        dS = dS_o + a[..., None, None] * dS_next - _mm("bhck,bhcv->bhkv", W, dv_new)
        return dS, (dS_next, dv_new)

    dS0, (dS_out, dv_new) = lax.scan(step, dS_final, (dS_from_o, dv_from_o, KT, W, a), reverse=True)

    dq, dk, dkw, dv, db, dG = grads_per_chunk(has_gate, q, k, kw, v, b, G, within, carry, Tm, S_in, v_new, dO,
                                              dv_new, dS_out)
    return dq, dk, dkw, dv, db, dG, dS0, None, None


def grads_per_chunk(has_gate, q, k, kw, v, b, G, within, carry, Tm, S_in, v_new, dO, dv_new, dS_out):
    """Every input cotangent of the chunked core, per chunk in parallel, once the serial passes have
    given the entry states ``S_in``, the new values ``V'``, their cotangents ``dV'`` and the exit-state
    cotangents ``dS_out`` (chunked layout, fp32). Returns ``dq, dk, dkw, dv, db, dG`` (dG None
    without a gate)."""
    D, fs, a, KKW, _ = forward_parts(q, k, kw, v, b, G, within, carry)
    Wr, Ur = (b * fs)[..., None] * k, b[..., None] * v
    QKW = _mm("...ik,...jk->...ij", q, kw)
    d_last = D[..., -1, :]

    dQs = _mm("...cv,...kv->...ck", dO, S_in)
    dP = _mm("...iv,...jv->...ij", dO, v_new) * D  # D folded in: dP now means d(QKW) on the mask
    dW = -_mm("...cv,...kv->...ck", dv_new, S_in)
    dKT = _mm("...cv,...kv->...ck", v_new, dS_out)
    da = jnp.sum(S_in * dS_out, axis=(-2, -1))

    dq = dQs * fs[..., None] + _mm("...ij,...jk->...ik", dP, kw)
    dkw = _mm("...ij,...ik->...jk", dP, q) + dKT * d_last[..., None]

    dT = _mm("...ik,...jk->...ij", dW, Wr) + _mm("...iv,...jv->...ij", dv_new, Ur)
    dWr = _mm("...ji,...jk->...ik", Tm, dW)
    dUr = _mm("...ji,...jv->...iv", Tm, dv_new)
    Tt = jnp.swapaxes(Tm, -1, -2)
    dA = -_strict(_mm("...ij,...jk->...ik", _mm("...ij,...jk->...ik", Tt, dT), Tt))

    dv = b[..., None] * dUr
    k_dWr = jnp.sum(dWr * k, axis=-1)
    db = jnp.sum(dUr * v, axis=-1) + fs * k_dWr
    dk = (b * fs)[..., None] * dWr
    dA_D = dA * D  # dA is strictly lower already
    M = dA_D * b[..., :, None]
    dk = dk + _mm("...ij,...jk->...ik", M, kw)
    dkw = dkw + _mm("...ij,...ik->...jk", M, k)
    db = db + jnp.sum(dA_D * KKW, axis=-1)

    dG = None
    if has_gate:
        # d/dG through D (both indices), exp(G) ⊙ c, and the last row of D used for KT.
        # E = dD ⊙ D (dP already carries its factor D); the last row adds D[C, :]'s use in KT.
        E = dP * QKW + dA_D * KKW * b[..., :, None]
        E = E.at[..., -1, :].add(jnp.sum(dKT * kw, axis=-1) * d_last)
        dfs = jnp.sum(dQs * q, axis=-1) + b * k_dWr
        dG = jnp.sum(E, axis=-1) - jnp.sum(E, axis=-2) + dfs * fs
        dG = dG.at[..., -1].add(da * a)
    return dq, dk, dkw, dv, db, dG


_chunk_core.defvjp(_chunk_core_fwd, _chunk_core_bwd)


def chunk_layout(q, k, v, beta, *, write_key, log_decay, scale, segment_ids, C):
    """The chunked fp32 operands of ``_chunk_core``: ``q, k, kw [N, B, H, C, K]``, ``v [N, B, H, C, V]``,
    ``b, G [N, B, H, C]``, the mask ``within`` and ``carry [N, B, 1, C]`` (None without documents)."""
    f32 = jnp.float32
    q_c = _to_chunks(q.astype(f32) * scale, C)
    k_c = _to_chunks(k.astype(f32), C)
    kw_c = k_c if write_key is None else _to_chunks(write_key.astype(f32), C)
    v_c = _to_chunks(v.astype(f32), C)
    b_c = _to_chunks(beta.astype(f32)[..., None], C)[..., 0]

    within = jnp.tril(jnp.ones((C, C), bool))
    carry = None
    if segment_ids is not None:
        doc, carry = (jnp.moveaxis(x, 1, 0)[:, :, None] for x in chunk_documents(segment_ids, C))  # [N, B, 1, C]
        within = within & (doc[..., :, None] == doc[..., None, :])  # [N, B, 1, C, C]
        carry = carry.astype(f32)
    G = (jnp.cumsum(_to_chunks(log_decay.astype(f32)[..., None], C)[..., 0], axis=-1) if log_decay is not None
         else jnp.zeros_like(b_c))
    return q_c, k_c, kw_c, v_c, b_c, G, within, carry


def delta_rule_chunked(q, k, v, beta, *, write_key=None, log_decay=None, scale, initial_state=None,
                       segment_ids=None, chunk_size=64):
    """Chunkwise delta rule; same contract as ``reference.delta_rule_reference``.

    ``q, k, write_key [B, T, H, K]``, ``v [B, T, H, V]``, ``beta, log_decay [B, T, H]``,
    ``initial_state [B, H, K, V]``, ``segment_ids [B, T]``. Returns ``o [B, T, H, V]`` (dtype of
    v) and the final state ``[B, H, K, V]`` (fp32).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size_for(T, chunk_size)
    parts = chunk_layout(q, k, v, beta, write_key=write_key, log_decay=log_decay, scale=scale,
                          segment_ids=segment_ids, C=C)
    S0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    q_c, k_c, kw_c, v_c, b_c, G, within, carry = parts
    o, S_final = _chunk_core(log_decay is not None, q_c, k_c, kw_c, v_c, b_c, G, S0, within, carry)
    return _from_chunks(o, T).astype(v.dtype), S_final


def transition_summary(k, v, beta, *, write_key=None, log_decay=None, segment_ids=None, chunk_size=64):
    """The whole span's state map as an affine function: ``S_final = M S_0 + N`` for every entry state S_0.

    ``k, write_key [B, T, H, K]``, ``v [B, T, H, V]``, ``beta, log_decay [B, T, H]``, ``segment_ids
    [B, T]``. Returns ``M [B, H, K, K]`` (the product of the transitions ``exp(g_t)(I − β_t k̃_t k_tᵀ)``,
    zero once a document starts inside the span) and ``N [B, H, K, V]`` (the final state from S_0 = 0),
    fp32. One serial pass over chunks with K + V state columns: the state ``[M | N]`` starts at ``[I | 0]``
    and the values are ``[0 | v]``; no outputs are formed.
    """
    f32 = jnp.float32
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size_for(T, chunk_size)
    _, k_c, kw_c, v_c, b_c, G, within, carry = chunk_layout(
        k, k, v, beta, write_key=write_key, log_decay=log_decay, scale=1.0, segment_ids=segment_ids, C=C)
    D, fs, a, _, A = forward_parts(k_c, k_c, kw_c, v_c, b_c, G if log_decay is not None else None, within, carry)
    Tm = unit_lower_inverse(A)
    W = _mm("...ij,...jk->...ik", Tm, (b_c * fs)[..., None] * k_c)
    U = _mm("...ij,...jv->...iv", Tm, b_c[..., None] * v_c)
    U_aug = jnp.concatenate([jnp.zeros((*U.shape[:-1], K), f32), U], axis=-1)
    S0 = jnp.concatenate([jnp.broadcast_to(jnp.eye(K, dtype=f32), (B, H, K, K)), jnp.zeros((B, H, K, V), f32)], -1)
    _, _, S = _state_pass(W, U_aug, kw_c * D[..., -1, :, None], a, S0)
    return S[..., :K], S[..., K:]
