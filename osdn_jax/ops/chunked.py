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
need not be a multiple of C. Only the chunk-entry states go through the serial ``lax.scan``, so
autodiff keeps T/C states, not T. Everything is computed in fp32 at HIGHEST precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from osdn_jax.ops.preconditioner import preconditioner_scan
from osdn_jax.ops.segments import document_index

_HI = lax.Precision.HIGHEST


def _to_chunks(x: jax.Array, C: int, pad_mode: str = "constant") -> jax.Array:
    """``[B, T, H, ...]`` (or ``[B, T]``) → ``[N, B, H, C, ...]`` (``[N, B, C]``), fp32 unless int."""
    B, T = x.shape[:2]
    pad = (-T) % C
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode=pad_mode)
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


@jax.custom_vjp
def unit_lower_inverse(A: jax.Array) -> jax.Array:
    """``(I + A)⁻¹ [..., C, C]`` for strictly lower-triangular ``A``: a triangular solve in fp32.

    The inverse is unit lower-triangular too. Its gradient is written out
    (``dA = −strict_lower(Tᵀ dT Tᵀ)``) so the backward needs two matmuls instead of two more solves.
    """
    eye = jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape)
    return lax.linalg.triangular_solve(A, eye, left_side=True, lower=True, unit_diagonal=True)


def _unit_lower_inverse_fwd(A):
    T = unit_lower_inverse(A)
    return T, T


def _unit_lower_inverse_bwd(T, dT):
    Tt = jnp.swapaxes(T, -1, -2)
    dA = -jnp.matmul(jnp.matmul(Tt, dT, precision=_HI), Tt, precision=_HI)
    return (jnp.tril(dA, -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def chunk_size_for(T: int, chunk_size: int) -> int:
    """The chunk actually used: ``chunk_size``, or the next power of two ≥ T when T is shorter."""
    return min(chunk_size, 1 << max(T - 1, 0).bit_length())


def delta_rule_chunked(q, k, v, beta, *, write_key=None, log_decay=None, scale, initial_state=None,
                       segment_ids=None, chunk_size=64):
    """Chunkwise delta rule; same contract as ``reference.delta_rule_reference``.

    ``q, k, write_key [B, T, H, K]``, ``v [B, T, H, V]``, ``beta, log_decay [B, T, H]``,
    ``initial_state [B, H, K, V]``, ``segment_ids [B, T]``. Returns ``o [B, T, H, V]`` (dtype of
    v) and the final state ``[B, H, K, V]`` (fp32).
    """
    f32 = jnp.float32
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size_for(T, chunk_size)

    q_c = _to_chunks(q.astype(f32) * scale, C)  # [N, B, H, C, K]
    k_c = _to_chunks(k.astype(f32), C)
    kw_c = k_c if write_key is None else _to_chunks(write_key.astype(f32), C)
    v_c = _to_chunks(v.astype(f32), C)  # [N, B, H, C, V]
    b_c = _to_chunks(beta.astype(f32)[..., None], C)[..., 0]  # [N, B, H, C]

    causal = jnp.tril(jnp.ones((C, C), bool))
    if segment_ids is None:
        within = causal  # [C, C]
        carry = None
    else:
        doc = _to_chunks(document_index(segment_ids), C, pad_mode="edge")[:, :, None]  # [N, B, 1, C]
        within = causal & (doc[..., :, None] == doc[..., None, :])  # [N, B, 1, C, C]
        # document open at the end of the previous chunk (chunk 0: the first document, index 0)
        doc_before = jnp.concatenate([jnp.zeros_like(doc[:1, ..., -1]), doc[:-1, ..., -1]])  # [N, B, 1]
        carry = (doc == doc_before[..., None]).astype(f32)  # [N, B, 1, C]

    if log_decay is None:
        D = jnp.broadcast_to(within.astype(f32), (*b_c.shape, C))  # [N, B, H, C, C]
        from_start = jnp.ones_like(b_c)  # exp(G_i): decay from chunk start to token i
        state_decay = jnp.ones(b_c.shape[:-1], f32)  # exp(G_C)
    else:
        G = jnp.cumsum(_to_chunks(log_decay.astype(f32)[..., None], C)[..., 0], axis=-1)
        D = _masked_exp(G[..., :, None] - G[..., None, :], within)
        from_start = jnp.exp(G)
        state_decay = from_start[..., -1]
    if carry is not None:
        from_start = from_start * carry
        state_decay = state_decay * carry[..., -1]

    strict = ~jnp.eye(C, dtype=bool)
    A = jnp.einsum("...ik,...jk->...ij", k_c, kw_c, precision=_HI) * b_c[..., :, None] * jnp.where(strict, D, 0.0)
    T_inv = unit_lower_inverse(A)
    W = jnp.einsum("...ij,...jk->...ik", T_inv, (b_c * from_start)[..., None] * k_c, precision=_HI)
    U = jnp.einsum("...ij,...jv->...iv", T_inv, b_c[..., None] * v_c, precision=_HI)
    kw_tail = kw_c * D[..., -1, :, None]  # k̃_j exp(G_C − G_j), same document as the last token

    def chunk_step(S, xs):
        W, U, kw_tail, a = xs
        v_new = U - jnp.einsum("bhck,bhkv->bhcv", W, S, precision=_HI)
        S_next = a[..., None, None] * S + jnp.einsum("bhck,bhcv->bhkv", kw_tail, v_new, precision=_HI)
        return S_next, (S, v_new)

    S0 = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
    S_final, (S_in, v_new) = lax.scan(chunk_step, S0, (W, U, kw_tail, state_decay))

    scores = jnp.einsum("...ik,...jk->...ij", q_c, kw_c, precision=_HI) * D
    o = (jnp.einsum("...ck,...kv->...cv", q_c * from_start[..., None], S_in, precision=_HI)
         + jnp.einsum("...ij,...jv->...iv", scores, v_new, precision=_HI))
    return _from_chunks(o, T).astype(v.dtype), S_final


def osdn_chunked(q, k, v, beta, d0, *, precond, log_gamma=None, log_decay=None, scale, initial_state=None,
                 initial_d=None, segment_ids=None, chunk_size=64):
    """OSDN in two phases: the ``d`` trajectory by a ``[B, H, K]`` scan, then the chunkwise delta
    rule with read/erase key ``k`` and write key ``k̃ = d ⊙ k`` (fp32).

    ``precond`` is a ``reference.PreconditionerConfig``. Returns ``o [B, T, H, V]``, the final
    state ``[B, H, K, V]`` and the final ``d [B, H, K]``.
    """
    d, d_final = preconditioner_scan(
        k, d0, eta=precond.eta, d_min=precond.d_min, d_max=precond.d_max, log_gamma=log_gamma,
        beta=beta if precond.beta_aware else None, segment_ids=segment_ids, initial_d=initial_d,
    )
    o, S = delta_rule_chunked(
        q, k, v, beta, write_key=d * k.astype(jnp.float32), log_decay=log_decay, scale=scale,
        initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
    )
    return o, S, d_final
