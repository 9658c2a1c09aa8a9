"""Phase 1 of OSDN in chunks: the ``d`` trajectory with T/C serial steps instead of T.

Where the clip is inactive the update is affine in ``d`` (``s = k ⊙ k``, ``c = β`` for the β-aware
form, else 1, ``b = η c²``)::

    d_{t+1} = γ_t d_t + e_t s_t,     e_t = η c_t − b_t ⟨d_t, s_t⟩

a gated delta rule on a one-column state. The first step of every document (and of the row) is taken
apart, exactly and for all of them at once, clip included: ``R_p = clip(γ_p d0 + e_p s_p)`` at a
document's first token p (``d_in``'s step at the row's token 0). A learned ``d0`` outside
``[d_min, d_max]`` clips there: the ``apr`` preset's ``d_min = 0`` does on trained models, at every
document start, and often nowhere else. The chunked recurrence restarts at p with ``R_p``, which it
carries unchanged to token p + 1 (``k = 0`` and ``γ = 1`` there), and the trajectory keeps ``d0`` at p.
In a chunk of C tokens that enters with ``d_in``, with ``G_i = Σ_{m<i} log γ_m``,
``D[i, j] = exp(G_i − G_{j+1})`` for ``j < i`` in the same document (else 0), and
``ω_i = exp(G_i − G_p)`` and ``R_(i) = R_p`` for the restart ``p`` of ``i``'s document in the chunk
(0 before any)::

    d_i = α_i d_in + ω_i R_(i) + Σ_j D[i, j] e_j s_j      α_i = exp(G_i) before any restart
    (I + A) e = η c − b ⊙ S (α d_in + ω R),               A = diag(b) (D ⊙ S Sᵀ), strictly lower
    e = u − W d_in,   u = T (η c − b ⊙ S ω R),   W = T diag(b α) S,   T = (I + A)⁻¹

``T``, ``u`` and ``W`` need no ``d_in``, so every chunk forms them at once; only the chunk-entry
values go through a serial scan (two matrix-vector products per chunk). The trajectory is then one
``[C, C] × [C, K]`` product per chunk, and every other pre-clip value ``x_{i+1} = γ_i d_i + e_i s_i``
is checked against ``[d_min, d_max]`` (a value the next token's restart replaces does not count). Where one falls outside, the chunked result is not the recurrence's from that token on:
a second serial pass starts at the first such chunk and redoes, in each chunk that has one, the
tokens from its first crossing one by one with the clip (the values before it are exact). The
result equals the ``lax.scan`` reference (``preconditioner.preconditioner_scan``) to fp32 rounding.

The backward (``jax.custom_vjp``) saves the trajectory. With ``q_i`` the cotangent of ``d_{i+1}``
(zero where token i+1 restarts), ``m_i`` the mask where ``x_{i+1}`` was inside the clip and
``h_i = γ_i (m_i q_i) − b_i ⟨m_i q_i, s_i⟩ s_i + ḡ_i`` the cotangent of ``d_i`` (ḡ: the
trajectory's own cotangent), chunks without an active clip solve for ``f_i = ⟨s_i, q_i⟩`` with the
transposed system, ``(I + Aᵀ) f = r``, and ``q = Dᵀ (ḡ − b f S) + τ h_outᵀ``; a reverse serial scan
carries the chunk-entry cotangent and runs a chunk with an active clip token by token. Every
input's cotangent then follows per token in parallel; at a first token ``q`` is the cotangent of its
exact step's result and ``m`` that step's clip, and ``h`` goes to ``d0`` (``d_start`` at token 0).
Everything is fp32 at HIGHEST precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from osdn_jax.ops.chunked import (_from_chunks, _masked_exp, _mm, _to_chunks, chunk_size_for, match_varying,
                                  unit_lower_inverse)
from osdn_jax.ops.preconditioner import clip, precondition_step
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
    first = _first_tokens(B, T, segment_ids)
    lay = _layout(k, log_gamma, beta, first, _unchecked(first), C)
    # static and hashable; without APF, log γ is a constant zero and its cumulative sums are skipped
    # (XLA would spend tens of seconds folding them)
    settings = (float(eta), d_min, d_max, beta is not None, log_gamma is not None)
    d_c, d_end = _trajectory(settings, *lay, d0, d_start)
    return _from_chunks(d_c, T), d_end


def _first_tokens(B, T, segment_ids):
    """``[B, T]`` bool: token 0 and every document start, whose step the chunked phase 1 takes apart."""
    row_start = (jnp.arange(T) == 0)[None, :]
    first = row_start if segment_ids is None else row_start | document_starts(segment_ids)
    # a barrier keeps XLA from folding the constant [B, T] pattern (and what it feeds) at compile time
    return lax.optimization_barrier(jnp.broadcast_to(first, (B, T)))


def _first_values(first, d0, d_start):
    """``[N, B, H, C, K]``: the value ``d`` takes at a first token: ``d_start`` at token 0, else ``d0``."""
    N, B, _, C = first.shape
    row_start = (jnp.arange(N)[:, None] == 0) & (jnp.arange(C)[None, :] == 0)  # [N, C]
    return jnp.where(row_start[:, None, None, :, None], d_start[None, :, :, None, :], d0[None, None, :, None, :])


def _first_steps(st, k, lg, c, first, d0, d_start):
    """The first step of every document and of the row, exact and all at once, clip included: the
    value at a first token, ``x = γ d + η c (1 − c ⟨d, s⟩) s`` after it, and the clip's mask
    (``[N, B, H, C, K]``, meaningful at first tokens)."""
    eta = st[0]
    s = k * k
    d = _first_values(first, d0, d_start)
    x = jnp.exp(lg)[..., None] * d + (eta * c * (1.0 - c * jnp.sum(d * s, axis=-1)))[..., None] * s
    return d, x, ~_outside(x, st[1], st[2])


def _unchecked(first):
    """``[B, T]``: tokens whose pre-clip value ``x_{t+1}`` the clip check skips: a first token (its
    step is taken exactly apart) and the token before one (the next value is the restart's)."""
    return first | jnp.pad(first[:, 1:], ((0, 0), (0, 1)))


def _layout(k, log_gamma, beta, starts, unchecked, C):
    """Chunked fp32 operands: ``k [N, B, H, C, K]``, ``lg, c [N, B, H, C]`` (log γ, and β or 1),
    ``starts [N, B, 1, C]`` (a first token: the chunked recurrence restarts here) and ``next_starts
    [N, B, 1, C]`` (``unchecked``: the clip check skips this token)."""
    B, T, H, K = k.shape
    k_c = _to_chunks(k.astype(f32), C)
    lg = jnp.zeros((B, T, H), f32) if log_gamma is None else log_gamma.astype(f32)
    lg_c = _to_chunks(lg[..., None], C)[..., 0]
    c = jnp.ones((B, T, H), f32) if beta is None else beta.astype(f32)
    c_c = _to_chunks(c[..., None], C)[..., 0]  # padded tokens: k = 0 makes them inert
    chunked = lambda x: _to_chunks(x.astype(f32)[..., None, None], C)[..., 0] > 0.5  # noqa: E731
    return k_c, lg_c, c_c, chunked(starts), chunked(unchecked)


def _parts(st, k, lg, c, starts, Tm=None):
    """Per chunk, in parallel: ``s = k²``, ``b = η c²``, ``γ``, ``D [.., C, C]``, ``α, ω [.., C]``
    (weights of ``d_in`` and of the restart value in ``d_i``), ``τ [.., C]`` (weight of ``e_j s_j``
    in the chunk's exit value) with ``α_C, ω_C``, and ``T = (I + A)⁻¹`` (unless given: the backward
    reuses the forward's, which saves a triangular solve's kernels per call)."""
    eta = st[0]
    C = k.shape[-2]
    s = k * k
    b = eta * c * c
    has_gamma = st[4]
    G_in = jnp.cumsum(lg, axis=-1) if has_gamma else lg  # Σ_{m ≤ i}
    G = G_in - lg  # Σ_{m < i}
    G_C = G_in[..., -1:]
    # [N, B, 1, C]: restarts so far in this chunk
    doc = jnp.cumsum(starts.astype(jnp.int32), axis=-1)
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
    if Tm is None:
        Tm = unit_lower_inverse(b[..., :, None] * D * _mm("...ik,...jk->...ij", s, s))
    return s, b, jnp.exp(lg), D, alpha, omega, tau, alpha_C, omega_C, Tm


def _outside(x, d_min, d_max):
    out = jnp.zeros(x.shape, bool)
    if d_min is not None:
        out |= x < d_min
    if d_max is not None:
        out |= x > d_max
    return out


def _chunk_values(st, d_in, base, s, c, b, gamma, D, alpha, u, W, next_starts):
    """One or all chunks from their entry values ``d_in [.., K]`` (``base = Ω R [.., C, K]``: the
    restart values' part of the trajectory): the trajectory ``[.., C, K]``,
    the exit value (unclipped) and ``bad [.., C]``: where ``x_{i+1}`` leaves the clip range."""
    e = u - _mm("...ck,...k->...c", W, d_in)
    traj = alpha[..., None] * d_in[..., None, :] + base \
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


def _inert(starts, k, lg):
    """The chunked recurrence's keys and log γ: a first token's step is taken apart, so there it
    carries its restart value unchanged (``k = 0``, ``γ = 1``)."""
    return jnp.where(starts[..., None], 0.0, k), jnp.where(starts, 0.0, lg)


def _trajectory_fwd(st, k, lg, c, starts, next_starts, d0, d_start):
    N, B, H, C, K = k.shape
    eta = st[0]
    # A first token's step, exact: the chunked recurrence restarts there at its result R.
    d_first, x_first, _ = _first_steps(st, k, lg, c, starts, d0, d_start)
    R = jnp.where(starts[..., None], clip(x_first, st[1], st[2]), 0.0)
    k_sys, lg_sys = _inert(starts, k, lg)
    s, b, gamma, D, alpha, omega, tau, alpha_C, omega_C, Tm = _parts(st, k_sys, lg_sys, c, starts)
    # each token's restart value (that of its document's restart in this chunk; 0 before any)
    R = jnp.take_along_axis(R, lax.cummax(jnp.where(starts, jnp.arange(C), 0), axis=3)[..., None], axis=3)
    base = omega[..., None] * R
    u = _mm("...ij,...j->...i", Tm, eta * c - b * jnp.sum(s * base, axis=-1))
    W = _mm("...ij,...jk->...ik", Tm, (b * alpha)[..., None] * s)

    # Exit value of a chunk with no active clip: α_C d + ω_C R_last + Sᵀ (τ ⊙ (u − W d)).
    bias = omega_C[..., None] * R[..., -1, :] + _mm("...c,...ck->...k", tau * u, s)
    d_end, d_in = _affine_pass(alpha_C, bias, tau[..., None] * W, s, d_start)
    traj, _, bad = _chunk_values(st, d_in, base, s, c, b, gamma, D, alpha, u, W, next_starts)
    bad_chunk = jnp.any(bad, axis=(1, 2, 3))  # [N]
    n0 = jnp.where(jnp.any(bad_chunk), jnp.argmax(bad_chunk), N)

    def careful(state):  # chunk n from its exact entry value; tokens from the first crossing one by one
        n, d, traj, _ = state
        pick = lambda x: lax.dynamic_index_in_dim(x, n, keepdims=False)  # noqa: E731
        s_n, c_n, k_n, gamma_n, starts_n = pick(s), pick(c), pick(k_sys), pick(gamma), pick(starts)
        R_n = pick(R)
        tr, x_end, bad_n = _chunk_values(st, d, pick(base), s_n, c_n, pick(b), gamma_n, pick(D), pick(alpha),
                                         pick(u), pick(W), pick(next_starts))
        crossed = jnp.any(bad_n, axis=(0, 1))  # [C]
        i0 = jnp.where(jnp.any(crossed), jnp.argmax(crossed), C)

        def token(state):
            i, d_i, tr = state
            at = lambda x: lax.dynamic_index_in_dim(x, i, axis=-1, keepdims=False)  # noqa: E731
            d_i = jnp.where(at(starts_n)[..., None], lax.dynamic_index_in_dim(R_n, i, axis=-2, keepdims=False), d_i)
            tr = lax.dynamic_update_index_in_dim(tr, d_i, i, axis=-2)
            k_i = lax.dynamic_index_in_dim(k_n, i, axis=-2, keepdims=False)
            d_next = precondition_step(d_i, k_i, eta=eta, d_min=st[1], d_max=st[2], gamma=at(gamma_n),
                                       beta=at(c_n) if st[3] else None)
            return i + 1, d_next, tr

        d_i0 = lax.dynamic_index_in_dim(tr, jnp.minimum(i0, C - 1), axis=-2, keepdims=False)
        _, d_redo, tr = lax.while_loop(lambda z: z[0] < C, token, (i0, d_i0, tr))
        d_next = jnp.where(i0 < C, d_redo, x_end)
        return n + 1, d_next, lax.dynamic_update_index_in_dim(traj, tr, n, 0), d_next

    d_n0 = lax.dynamic_index_in_dim(d_in, jnp.minimum(n0, N - 1), keepdims=False)
    _, _, traj, d_end = lax.while_loop(lambda z: z[0] < N, careful, (n0, d_n0, traj, d_end))
    traj = jnp.where(starts[..., None], d_first, traj)
    return (traj, d_end), (k, lg, c, starts, next_starts, d0, d_start, traj, Tm)


def _trajectory_bwd(st, res, cotangents):
    eta, d_min, d_max, beta_aware = st[:4]
    k, lg, c, starts, next_starts, d0, d_start, traj, Tm = res
    g_out, g_end = cotangents
    g_traj = jnp.where(starts[..., None], 0.0, g_out)  # the recurrence's part; first tokens come last
    N, B, H, C, K = k.shape
    s, b, gamma, D, alpha, omega, tau, alpha_C, omega_C, Tm = _parts(st, *_inert(starts, k, lg), c, starts, Tm)

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

    # Per token: gx = m q; ∂d_i = γ gx − b ⟨gx, s⟩ s + ḡ; ∂s, ∂γ, ∂c. At a first token q is the
    # cotangent of its exact step's result (the restart value carried to the next token), m that
    # step's clip, and ∂d_i goes to d0 (to d_start at token 0).
    _, _, m_first = _first_steps(st, k, lg, c, starts, d0, d_start)
    gx = jnp.where(jnp.where(starts[..., None], m_first, m), q, 0.0)
    s, gamma = k * k, jnp.exp(lg)
    inner = jnp.sum(traj * s, axis=-1)
    gx_s = jnp.sum(gx * s, axis=-1)
    h = gamma[..., None] * gx - (b * gx_s)[..., None] * s + g_out
    row_start = (jnp.arange(N)[:, None] == 0) & (jnp.arange(C)[None, :] == 0)  # [N, C]
    dd0 = jnp.sum(jnp.where(starts[..., None] & ~row_start[:, None, None, :, None], h, 0.0), axis=(0, 1, 3))
    dd_start = dd_start + h[0, :, :, 0, :]
    ds = eta * (c * (1.0 - c * inner))[..., None] * gx - (eta * c * c * gx_s)[..., None] * traj \
        if beta_aware else eta * ((1.0 - inner)[..., None] * gx - gx_s[..., None] * traj)
    dk = 2.0 * k * ds
    dlg = jnp.sum(gx * traj, axis=-1) * gamma if st[4] else None  # without APF, log γ is a constant 0
    dc = eta * (1.0 - 2.0 * c * inner) * gx_s if beta_aware else None  # without the β-aware form, c ≡ 1
    return dk, dlg, dc, None, None, dd0, dd_start


_trajectory.defvjp(_trajectory_fwd, _trajectory_bwd)


def clipped_chunks(k, d, *, eta, d_min, d_max, log_gamma=None, beta=None, segment_ids=None, chunk_size=64):
    """``[N, B, H]`` bool: the chunks (per row and head) in which the clip is active, i.e. those the
    chunked phase 1 redoes token by token (a chunk runs that way when any row or head has one). The
    first step of a document (or of the row) does not count: it is taken exactly apart.
    ``d [B, T, H, K]`` is the trajectory of ``k``, ``N = ceil(T / C)``."""
    return jnp.any(clip_crossings(k, d, eta=eta, d_min=d_min, d_max=d_max, log_gamma=log_gamma, beta=beta,
                                  segment_ids=segment_ids, chunk_size=chunk_size), axis=-1)


def redone_tokens(crossings):
    """``[N]`` int: the tokens each chunk runs one by one, from its first crossing in any row or head
    to its end, for ``crossings [N, B, H, C]`` from ``clip_crossings``."""
    C = crossings.shape[-1]
    crossed = jnp.any(crossings, axis=(1, 2))  # [N, C]
    return jnp.where(jnp.any(crossed, axis=-1), C - jnp.argmax(crossed, axis=-1), 0)


def clip_crossings(k, d, *, eta, d_min, d_max, log_gamma=None, beta=None, segment_ids=None, chunk_size=64):
    """``[N, B, H, C]`` bool: the tokens whose step the clip changes, as the chunked phase 1 checks
    them (a document's first step, taken exactly apart, does not count; padding is False)."""
    B, T = k.shape[:2]
    C = chunk_size_for(T, chunk_size)
    first = _first_tokens(B, T, segment_ids)
    k_c, lg, c, _, unchecked = _layout(k, log_gamma, beta, first, _unchecked(first), C)
    d_c = _to_chunks(d.astype(f32), C)
    s = k_c * k_c
    e = eta * c - eta * c * c * jnp.sum(d_c * s, axis=-1)
    x = jnp.exp(lg)[..., None] * d_c + e[..., None] * s
    real = (jnp.arange(d_c.shape[0] * C) < T).reshape(-1, 1, 1, C)  # padded tokens hold d = 0 here
    return jnp.any(_outside(x, d_min, d_max), axis=-1) & ~unchecked & real
