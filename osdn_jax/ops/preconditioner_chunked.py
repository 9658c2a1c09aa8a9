"""Phase 1 of OSDN in chunks: the ``d`` trajectory with T/C serial steps instead of T.

Where the clip is inactive the update is affine in ``d`` (``s = k ⊙ k``, ``c = β`` for the β-aware
form, else 1, ``b = η c²``)::

    d_{t+1} = γ_t d_t + e_t s_t,     e_t = η c_t − b_t ⟨d_t, s_t⟩

a gated delta rule on a one-column state. Inside a chunk of C tokens that enters with ``d_in``,
with ``G_i = Σ_{m<i} log γ_m`` and ``D[i, j] = exp(G_i − G_{j+1})`` for ``j < i`` in the same
document (else 0)::

    d_i = α_i d_in + ω_i d0 + Σ_j D[i, j] e_j s_j         α_i = exp(G_i) before any restart,
                                                         ω_i = exp(G_i − G_p) after one at p
    (I + A) e = η c − b ⊙ (α S d_in + ω S d0),          A = diag(b) (D ⊙ S Sᵀ), strictly lower
    e = u − W d_in,   u = T (η c − b ω S d0),   W = T diag(b α) S,   T = (I + A)⁻¹

``T``, ``u`` and ``W`` need no ``d_in``, so every chunk forms them at once; only the chunk-entry
values go through a serial scan (two matrix-vector products per chunk). The trajectory is then one
``[C, C] × [C, K]`` product per chunk, and every pre-clip value ``x_{i+1} = γ_i d_i + e_i s_i`` is
checked against ``[d_min, d_max]`` (a value the next token's document restart discards does not
count). Where one falls outside, the chunked result is not the recurrence's from that token on:
a second serial pass starts at the first such chunk and redoes, in each chunk that has one, the
tokens from its first crossing one by one with the clip (the values before it are exact). The
result equals the ``lax.scan`` reference (``preconditioner.preconditioner_scan``) to fp32 rounding.

The backward (``jax.custom_vjp``) saves the trajectory. With ``q_i`` the cotangent of ``d_{i+1}``
(zero where token i+1 restarts), ``m_i`` the mask where ``x_{i+1}`` was inside the clip and
``h_i = γ_i (m_i q_i) − b_i ⟨m_i q_i, s_i⟩ s_i + ḡ_i`` the cotangent of ``d_i`` (ḡ: the
trajectory's own cotangent), chunks without an active clip solve for ``f_i = ⟨s_i, q_i⟩`` with the
transposed system, ``(I + Aᵀ) f = r``, and ``q = Dᵀ (ḡ − b f S) + τ h_outᵀ``; a reverse serial scan
carries the chunk-entry cotangent and runs a chunk with an active clip token by token. Every
input's cotangent then follows per token in parallel. Everything is fp32 at HIGHEST precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from osdn_jax.ops.chunked import (_from_chunks, _masked_exp, _mm, _to_chunks, chunk_size_for, match_varying,
                                  unit_lower_inverse)
from osdn_jax.ops.preconditioner import precondition_step
from osdn_jax.ops.segments import document_starts

f32 = jnp.float32
# Tokens per chunk. Larger than phase 2's 64: the serial passes cost two small kernels and a few
# slices per chunk on a GPU, and the [C, C] factors of a one-column state stay cheap (O(T·C·K) work).
PHASE1_CHUNK = 128


def preconditioner_chunked(
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
    chunk_size: int = PHASE1_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """Same contract and results as ``preconditioner_scan``: the trajectory ``d [B, T, H, K]``
    (the value used for the write at token t) and the final ``d [B, H, K]``, fp32.

    Shapes: ``k [B, T, H, K]``, ``d0 [H, K]``, ``log_gamma, beta [B, T, H]``, ``segment_ids
    [B, T]``, ``initial_d [B, H, K]``. ``beta`` given selects the β-aware form.
    """
    B, T, H, K = k.shape
    C = chunk_size_for(T, chunk_size)
    d0 = d0.astype(f32)
    d_start = jnp.broadcast_to(d0, (B, H, K)) if initial_d is None else initial_d.astype(f32)
    lay = _layout(k, log_gamma, beta, segment_ids, C)
    # static and hashable; without APF or documents, log γ and the restarts are constant zeros, and
    # their cumulative sums are skipped (XLA would spend tens of seconds folding them)
    settings = (float(eta), d_min, d_max, beta is not None, log_gamma is not None, segment_ids is not None)
    d_c, d_final = _trajectory(settings, *lay, d0, d_start)
    return _from_chunks(d_c, T), d_final


def _layout(k, log_gamma, beta, segment_ids, C):
    """Chunked fp32 operands: ``k [N, B, H, C, K]``, ``lg, c [N, B, H, C]`` (log γ, and β or 1),
    ``starts, next_starts [N, B, 1, C]`` (a document restarts at this token / at the next one)."""
    B, T, H, K = k.shape
    k_c = _to_chunks(k.astype(f32), C)
    lg = jnp.zeros((B, T, H), f32) if log_gamma is None else log_gamma.astype(f32)
    lg_c = _to_chunks(lg[..., None], C)[..., 0]
    c = jnp.ones((B, T, H), f32) if beta is None else beta.astype(f32)
    c_c = _to_chunks(c[..., None], C)[..., 0]  # padded tokens: k = 0 makes them inert
    starts = jnp.zeros((B, T), bool) if segment_ids is None else document_starts(segment_ids)
    nxt = jnp.pad(starts[:, 1:], ((0, 0), (0, 1)))
    chunked = lambda x: _to_chunks(x.astype(f32)[..., None, None], C)[..., 0] > 0.5  # noqa: E731
    return k_c, lg_c, c_c, chunked(starts), chunked(nxt)


def _parts(st, k, lg, c, starts):
    """Per chunk, in parallel: ``s = k²``, ``b = η c²``, ``γ``, ``D [.., C, C]``, ``α, ω [.., C]``
    (weights of ``d_in`` and ``d0`` in ``d_i``), ``τ [.., C]`` (weight of ``e_j s_j`` in the chunk's
    exit value) with ``α_C, ω_C``, and ``T = (I + A)⁻¹``."""
    eta = st[0]
    C = k.shape[-2]
    s = k * k
    b = eta * c * c
    has_gamma, has_docs = st[4], st[5]
    G_in = jnp.cumsum(lg, axis=-1) if has_gamma else lg  # Σ_{m ≤ i}
    G = G_in - lg  # Σ_{m < i}
    G_C = G_in[..., -1:]
    # [N, B, 1, C]: restarts so far in this chunk
    doc = jnp.cumsum(starts.astype(jnp.int32), axis=-1) if has_docs else jnp.zeros(starts.shape, jnp.int32)
    same = doc[..., :, None] == doc[..., None, :]
    lower = jnp.tril(jnp.ones((C, C), bool), -1)
    expm = _masked_exp
    D = expm(G[..., :, None] - G_in[..., None, :], same & lower)
    carry = doc == 0
    alpha = jnp.where(carry, jnp.exp(G), 0.0)
    at_start = same & jnp.tril(jnp.ones((C, C), bool)) & starts[..., None, :]
    omega = jnp.sum(expm(G[..., :, None] - G[..., None, :], at_start), axis=-1)
    last = doc[..., -1:] == doc
    tau = expm(G_C - G_in, last)
    alpha_C = jnp.where(carry[..., -1], jnp.exp(G_C[..., 0]), 0.0)
    omega_C = jnp.sum(expm(G_C - G, last & starts), axis=-1)
    A = b[..., :, None] * D * _mm("...ik,...jk->...ij", s, s)
    Tm = unit_lower_inverse(A)
    return s, b, jnp.exp(lg), D, alpha, omega, tau, alpha_C, omega_C, Tm


def _outside(x, d_min, d_max):
    out = jnp.zeros(x.shape, bool)
    if d_min is not None:
        out |= x < d_min
    if d_max is not None:
        out |= x > d_max
    return out


def _chunk_values(st, d_in, d0, s, c, b, gamma, D, alpha, omega, u, W, next_starts):
    """One or all chunks from their entry values ``d_in [.., K]``: the trajectory ``[.., C, K]``,
    the exit value (unclipped) and ``bad [.., C]``: where ``x_{i+1}`` leaves the clip range."""
    e = u - _mm("...ck,...k->...c", W, d_in)
    traj = alpha[..., None] * d_in[..., None, :] + omega[..., None] * d0[:, None, :] \
        + _mm("...ij,...jk->...ik", D, e[..., None] * s)
    x = gamma[..., None] * traj + e[..., None] * s
    bad = jnp.any(_outside(x, st[1], st[2]), axis=-1) & ~next_starts
    return traj, x[..., -1, :], bad


def _affine_pass(a, bias, W, S, x0, *, reverse=False):
    """The serial pass over chunks where no clip is active: ``x ← a x + bias − Sᵀ (W x)`` per chunk
    (``a [N, B, H]``, ``bias [N, B, H, K]``, ``W, S [N, B, H, C, K]``, ``x0 [B, H, K]``). Returns the
    last ``x`` and the value entering each chunk ``[N, B, H, K]``. The two matrix-vector products
    are written as reductions, which XLA fuses with the update into two kernels per chunk (as
    ``dot`` they become GEMM kernels of their own)."""
    def step(x, xs):
        a, bias, W, S = xs
        v = jnp.sum(W * x[..., None, :], axis=-1)  # [B, H, C]
        return a[..., None] * x + bias - jnp.sum(S * v[..., None], axis=-2), x

    return lax.scan(step, match_varying(x0, W), (a, bias, W, S), reverse=reverse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _trajectory(st, k, lg, c, starts, next_starts, d0, d_start):
    return _trajectory_fwd(st, k, lg, c, starts, next_starts, d0, d_start)[0]


def _trajectory_fwd(st, k, lg, c, starts, next_starts, d0, d_start):
    N, B, H, C, K = k.shape
    eta = st[0]
    s, b, gamma, D, alpha, omega, tau, alpha_C, omega_C, Tm = _parts(st, k, lg, c, starts)
    sd0 = _mm("nbhck,hk->nbhc", s, d0)
    u = _mm("...ij,...j->...i", Tm, eta * c - b * omega * sd0)
    W = _mm("...ij,...jk->...ik", Tm, (b * alpha)[..., None] * s)

    # Exit value of a chunk with no active clip: α_C d + ω_C d0 + Sᵀ (τ ⊙ (u − W d)).
    bias = omega_C[..., None] * d0 + _mm("...c,...ck->...k", tau * u, s)
    d_end, d_in = _affine_pass(alpha_C, bias, tau[..., None] * W, s, d_start)
    traj, _, bad = _chunk_values(st, d_in, d0, s, c, b, gamma, D, alpha, omega, u, W, next_starts)
    bad_chunk = jnp.any(bad, axis=(1, 2, 3))  # [N]
    first = jnp.where(jnp.any(bad_chunk), jnp.argmax(bad_chunk), N)

    def careful(state):  # chunk n from its exact entry value; tokens from the first crossing one by one
        n, d, traj, _ = state
        pick = lambda x: lax.dynamic_index_in_dim(x, n, keepdims=False)  # noqa: E731
        s_n, c_n, k_n, gamma_n, starts_n = pick(s), pick(c), pick(k), pick(gamma), pick(starts)
        tr, x_end, bad_n = _chunk_values(st, d, d0, s_n, c_n, pick(b), gamma_n, pick(D), pick(alpha), pick(omega),
                                         pick(u), pick(W), pick(next_starts))
        crossed = jnp.any(bad_n, axis=(0, 1))  # [C]
        i0 = jnp.where(jnp.any(crossed), jnp.argmax(crossed), C)

        def token(state):
            i, d_i, tr = state
            at = lambda x: lax.dynamic_index_in_dim(x, i, axis=-1, keepdims=False)  # noqa: E731
            d_i = jnp.where(at(starts_n)[..., None], d0, d_i)
            tr = lax.dynamic_update_index_in_dim(tr, d_i, i, axis=-2)
            k_i = lax.dynamic_index_in_dim(k_n, i, axis=-2, keepdims=False)
            d_next = precondition_step(d_i, k_i, eta=eta, d_min=st[1], d_max=st[2], gamma=at(gamma_n),
                                       beta=at(c_n) if st[3] else None)
            return i + 1, d_next, tr

        d_i0 = lax.dynamic_index_in_dim(tr, jnp.minimum(i0, C - 1), axis=-2, keepdims=False)
        _, d_redo, tr = lax.while_loop(lambda z: z[0] < C, token, (i0, d_i0, tr))
        d_next = jnp.where(i0 < C, d_redo, x_end)
        return n + 1, d_next, lax.dynamic_update_index_in_dim(traj, tr, n, 0), d_next

    d_first = lax.dynamic_index_in_dim(d_in, jnp.minimum(first, N - 1), keepdims=False)
    _, _, traj, d_end = lax.while_loop(lambda z: z[0] < N, careful, (first, d_first, traj, d_end))
    return (traj, d_end), (k, lg, c, starts, next_starts, d0, traj)


def _trajectory_bwd(st, res, cotangents):
    eta, d_min, d_max, beta_aware = st[:4]
    k, lg, c, starts, next_starts, d0, traj = res
    g_traj, g_end = cotangents
    N, B, H, C, K = k.shape
    s, b, gamma, D, alpha, omega, tau, alpha_C, omega_C, Tm = _parts(st, k, lg, c, starts)

    inner = jnp.sum(traj * s, axis=-1)
    e = eta * c - b * inner
    x = gamma[..., None] * traj + e[..., None] * s
    m = ~_outside(x, d_min, d_max)
    clipped = jnp.any(~m, axis=-1) & ~next_starts
    clipped_chunk = jnp.any(clipped, axis=(1, 2, 3))  # [N]

    # A chunk with no active clip, entered from above by h_out (the cotangent of its exit value):
    # f = Tᵀ (r0 + τ ⊙ S h_out) = f0 + Wb h_out, q = Dᵀ (ḡ − b f S) + τ h_outᵀ, and the cotangent of
    # its entry value h_in = ḡ_0 + γ_0 q_0 − b_0 f_0 s_0 (0 where token 0 restarts): affine in h_out,
    # h_in = a h_out + bias − Sᵀ (ρ ⊙ Wb h_out) with ρ_j = γ_0 D[j, 0] b_j + [j = 0] b_0.
    Tt = jnp.swapaxes(Tm, -1, -2)
    r0 = jnp.sum(jnp.swapaxes(D, -1, -2) * _mm("...ik,...jk->...ij", s, g_traj), axis=-1)
    f0 = _mm("...ij,...j->...i", Tt, r0)
    Wb = _mm("...ij,...jk->...ik", Tt, tau[..., None] * s)
    keep = 1.0 - starts[..., 0].astype(f32)  # [N, B, 1]
    g0 = gamma[..., 0]
    rho = (g0[..., None] * D[..., :, 0] + jnp.eye(C, dtype=f32)[0]) * b
    q0_bias = _mm("...j,...jk->...k", D[..., :, 0], g_traj) - _mm("...c,...ck->...k", D[..., :, 0] * b * f0, s)
    bias = keep[..., None] * (g_traj[..., 0, :] + g0[..., None] * q0_bias - (b[..., 0] * f0[..., 0])[..., None]
                              * s[..., 0, :])
    a_b, W_b = keep * g0 * tau[..., 0], (keep[..., None] * rho)[..., None] * Wb
    dd_start, h_outs = _affine_pass(a_b, bias, W_b, s, g_end, reverse=True)

    def careful(state):  # reverse, from the last chunk with an active clip: those chunks token by token
        n, h, h_outs, Q, _ = state
        pick = lambda x: lax.dynamic_index_in_dim(x, n, keepdims=False)  # noqa: E731
        h_outs = lax.dynamic_update_index_in_dim(h_outs, h, n, 0)
        s_n, m_n, g_n, gamma_n, b_n, starts_n = pick(s), pick(m), pick(g_traj), pick(gamma), pick(b), pick(starts)
        v = jnp.sum(pick(W_b) * h[..., None, :], axis=-1)
        lean = pick(a_b)[..., None] * h + pick(bias) - jnp.sum(s_n * v[..., None], axis=-2)

        def token(state):
            i, h, Q = state
            at = lambda x: lax.dynamic_index_in_dim(x, i, axis=-1, keepdims=False)  # noqa: E731
            row = lambda x: lax.dynamic_index_in_dim(x, i, axis=-2, keepdims=False)  # noqa: E731
            Q = lax.dynamic_update_slice(Q, h[None, :, :, None, :], (n, 0, 0, i, 0))
            gx = jnp.where(row(m_n), h, 0.0)
            s_i = row(s_n)
            h_i = at(gamma_n)[..., None] * gx - (at(b_n) * jnp.sum(gx * s_i, -1))[..., None] * s_i + row(g_n)
            return i - 1, jnp.where(at(starts_n)[..., None], 0.0, h_i), Q

        clip_n = pick(clipped_chunk)
        _, h_tok, Q = lax.while_loop(lambda z: z[0] >= 0, token, (jnp.where(clip_n, C - 1, -1), h, Q))
        h_in = jnp.where(clip_n, h_tok, lean)
        return n - 1, h_in, h_outs, Q, h_in

    last = jnp.where(jnp.any(clipped_chunk), N - 1 - jnp.argmax(clipped_chunk[::-1]), -1)
    h_last = lax.dynamic_index_in_dim(h_outs, jnp.maximum(last, 0), keepdims=False)
    _, _, h_outs, Q, dd_start = lax.while_loop(lambda z: z[0] >= 0, careful,
                                               (last, h_last, h_outs, jnp.zeros_like(traj), dd_start))

    f = f0 + _mm("...ck,...k->...c", Wb, h_outs)
    q = _mm("...ji,...jk->...ik", D, g_traj - (b * f)[..., None] * s) + tau[..., None] * h_outs[..., None, :]
    q = jnp.where(clipped_chunk[:, None, None, None, None], Q, q)

    # Per token: gx = m q; ∂d_i = γ gx − b ⟨gx, s⟩ s + ḡ (to d0 at a restart); ∂s, ∂γ, ∂c.
    gx = jnp.where(m, q, 0.0)
    gx_s = jnp.sum(gx * s, axis=-1)
    h = gamma[..., None] * gx - (b * gx_s)[..., None] * s + g_traj
    dd0 = jnp.sum(jnp.where(starts[..., None], h, 0.0), axis=(0, 1, 3))
    ds = eta * (c * (1.0 - c * inner))[..., None] * gx - (eta * c * c * gx_s)[..., None] * traj \
        if beta_aware else eta * ((1.0 - inner)[..., None] * gx - gx_s[..., None] * traj)
    dk = 2.0 * k * ds
    dlg = jnp.sum(gx * traj, axis=-1) * gamma if st[4] else None  # without APF, log γ is a constant 0
    dc = eta * (1.0 - 2.0 * c * inner) * gx_s if beta_aware else None  # without the β-aware form, c ≡ 1
    return dk, dlg, dc, None, None, dd0, dd_start


_trajectory.defvjp(_trajectory_fwd, _trajectory_bwd)


def clipped_chunks(k, d, *, eta, d_min, d_max, log_gamma=None, beta=None, segment_ids=None, chunk_size=64):
    """``[N, B, H]`` bool: the chunks (per row and head) in which the clip is active, i.e. those the
    chunked phase 1 redoes token by token (a chunk runs that way when any row or head has one).
    ``d [B, T, H, K]`` is the trajectory of ``k``, ``N = ceil(T / C)``."""
    T = k.shape[1]
    C = chunk_size_for(T, chunk_size)
    k_c, lg, c, _, next_starts = _layout(k, log_gamma, beta, segment_ids, C)
    d_c = _to_chunks(d.astype(f32), C)
    s = k_c * k_c
    e = eta * c - eta * c * c * jnp.sum(d_c * s, axis=-1)
    x = jnp.exp(lg)[..., None] * d_c + e[..., None] * s
    real = (jnp.arange(d_c.shape[0] * C) < T).reshape(-1, 1, 1, C)  # padded tokens hold d = 0 here
    return jnp.any(jnp.any(_outside(x, d_min, d_max), axis=-1) & ~next_starts & real, axis=-1)
