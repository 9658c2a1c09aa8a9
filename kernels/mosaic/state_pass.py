"""Mosaic GPU (Hopper) kernels for the serial state passes of the chunkwise delta rule.

Both kernels walk the chunks of one sequence in order (forward) or in reverse (backward), one
program per ``(b, h, j)`` with ``j`` a 64-wide tile of the value dim. Each program has two
warpgroups (``_serial_pass``): a copy warpgroup issues every chunk's TMA loads into one half of a
double buffer in swizzled shared memory while the math warpgroup works on the other half; the math
warpgroup holds that tile of the state (or of its cotangent), ``[K, 64]`` fp32, in registers across
chunks, and every product is a ``wgmma`` with both operands in shared memory and an fp32 register
accumulator. What a pass writes back leaves through SMEM by TMA stores that run while the next
products are issued.

Forward (``states_forward``), per chunk n (``Wn = −T (β fs K)``, ``Qs = scale fs ⊙ Q``,
``P = scale (Q K̃ᵀ ⊙ D)``, ``KT = K̃ ⊙ D[C−1, :]``, ``a`` the chunk's state decay; all prepared per
chunk in parallel by ``osdn_jax.kernels.mosaic.delta_rule``)::

    S_in[n] = S                       (stored, bf16/fp16: the backward's residual)
    V'      = U + Wn S                (stored)
    O       = Qs S + P V'             (stored, the output)
    S       ← a S + KTᵀ V'

Backward (``states_backward``), reverse over n, with ``dVo = Pᵀ dO`` prepared in parallel::

    dS_out[n] = dS                    (stored)
    dV'       = dVo + KT dS           (stored)
    dS        ← a dS + Qsᵀ dO + Wnᵀ dV'

The summary pass (``states_forward`` without ``qs`` and ``p``) runs the forward recurrence only,
for the sequence split: from ``S = [I | 0]`` with values ``[0 | U]`` it returns a piece's affine
map ``[M | N]`` (``S_exit = M S_entry + N``).

Layouts: every buffer is head-major ``[B, H, T_pad, ·]`` (T_pad a multiple of C = 64), the
states ``[B, H, K, V]``, ``a [B, H, N_pad]`` (N_pad a multiple of 4: TMA rows are 16-byte
multiples). ``K ∈ {64, 128}``, ``V`` a multiple of 64 (the caller pads).

Shared memory per program (K = 128, bf16): the forward double-buffers Qs, Wn, KT (16 KiB each),
P (8 KiB) and U (fp32, 16 KiB): 144 KiB, plus S, V', O staging (32 KiB), the fp32 state staging
(32 KiB) and ``a``. The backward double-buffers Qs, Wn, KT, dO and dVo: 144 KiB likewise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

f32 = jnp.float32
C = 64  # chunk: the M side of every wgmma (one warpgroup issues 64-row tiles)
BV = 64  # value columns per program
HEAD_DIMS = (64, 128)
MAX_CHUNKS = 2048  # the per-chunk decays of a sequence sit in SMEM (8 KiB)
SMEM_BYTES = 227 * 1024  # Hopper's dynamic shared memory per block


def _swizzled(shape, dtype):
    """SMEM for a wgmma operand or TMA tile: (8, 128-byte) tiles with the 128-byte swizzle."""
    width = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, width)), plgpu.SwizzleTransform(128)))


def _wgmma(a, b, shape):
    """``a @ b`` of two SMEM operands (``.T`` views allowed) into a fresh fp32 accumulator, read
    back to registers (which waits for the wgmma)."""

    def body(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(body, plgpu.ACC(shape, f32))


def _wgmma2(a1, b1, a2, b2, shape):
    """``a1 @ b1 + a2 @ b2`` in one accumulator."""

    def body(acc):
        plgpu.wgmma(acc, a1, b1)
        plgpu.wgmma(acc, a2, b2)
        return acc[...]

    return pl.run_scoped(body, plgpu.ACC(shape, f32))


def _wgmma_layout(ref):
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static sizes of one call: batch B, heads H, padded head dims K and V, chunks N (and N_pad)."""

    B: int
    H: int
    K: int
    V: int
    N: int

    @property
    def Tp(self):
        return self.N * C

    @property
    def N_pad(self):
        return -(-self.N // 4) * 4

    @property
    def grid(self):
        return (self.B, self.H, self.V // BV)


def smem_bytes(K: int, op_itemsize: int = 2, n_chunks: int = MAX_CHUNKS) -> int:
    """Shared memory one program of the larger (forward) kernel asks for."""
    stage = 3 * C * K * op_itemsize + C * C * op_itemsize + C * BV * 4
    staging = K * BV * op_itemsize + 2 * C * BV * op_itemsize + K * BV * 4
    return 2 * stage + staging + 4 * (-(-n_chunks // 4) * 4)


def _serial_pass(n_chunks, issue, step, barriers, *, reverse: bool, decays, state_in, state_out, staging):
    """One program's pass over the chunks, with two warpgroups.

    Warpgroup 1 (the copy warpgroup, few registers) issues every chunk's TMA loads into
    ``slot = i % 2`` (``issue(n, slot)``, arriving on ``full[slot]``) and waits on ``empty[slot]``
    before it refills a slot; at the end it also waits for the last two releases, so that it has
    seen every phase of ``empty``. Warpgroup 0 (the math warpgroup) loads the chunk decays
    (``decays = (gmem, smem)``) and the entry state tile ``state_in`` (through the fp32
    ``staging`` buffer), folds ``step(n, slot, carry)`` over the chunks (reversed if asked; chunk
    n's loads awaited on ``full[slot]``, the slot released on ``empty[slot]`` once ``step``, whose
    wgmmas are awaited before it returns, is done with it) and stores the last carry to
    ``state_out``. ``barriers = (full, empty, once)``."""
    full, empty, once = barriers
    order = (lambda i: n_chunks - 1 - i) if reverse else (lambda i: i)
    wg = lax.axis_index("wg")

    @pl.when(wg == 1)
    def _copy_warpgroup():
        plgpu.set_max_registers(40, action="decrease")

        @pl.loop(0, n_chunks)
        def _issue(i):
            slot = lax.rem(i, 2)

            @pl.when(i >= 2)
            def _wait_for_release():
                plgpu.barrier_wait(empty.at[slot])

            issue(order(i), slot)

        @pl.loop(max(n_chunks - 2, 0), n_chunks)
        def _drain(i):
            plgpu.barrier_wait(empty.at[lax.rem(i, 2)])

    @pl.when(wg == 0)
    def _math_warpgroup():
        plgpu.set_max_registers(232, action="increase")
        plgpu.copy_gmem_to_smem(decays[0], decays[1], once)
        plgpu.copy_gmem_to_smem(state_in, staging, once)
        plgpu.barrier_wait(once)

        def body(i, carry):
            slot = lax.rem(i, 2)
            plgpu.barrier_wait(full.at[slot])
            carry = step(order(i), slot, carry)
            plgpu.barrier_arrive(empty.at[slot])
            return carry

        last = lax.fori_loop(0, n_chunks, body, _wgmma_layout(staging))
        _reuse()
        _store(last, staging, state_out)
        plgpu.wait_smem_to_gmem(0)


def _load_chunk(n, slot, bar, head, cols, *, rows=(), tiles=()):
    """Chunk n's TMA loads into ``slot``, all arriving on ``bar[slot]``: whole rows of each
    ``(gmem, smem)`` in ``rows``, the value columns ``cols`` of each in ``tiles``."""
    chunk = pl.ds(n * C, C)
    for src, dst in rows:
        plgpu.copy_gmem_to_smem(src.at[(*head, chunk)], dst.at[slot], bar.at[slot])
    for src, dst in tiles:
        plgpu.copy_gmem_to_smem(src.at[(*head, chunk, cols)], dst.at[slot], bar.at[slot])


def _barriers(loads: int = 5):
    """``full`` (the ``loads`` TMA loads of a slot), ``empty`` (the math warpgroup released a
    slot), ``once`` (the chunk decays and the incoming state tile)."""
    return (plgpu.Barrier(num_arrivals=loads, num_barriers=2), plgpu.Barrier(num_arrivals=1, num_barriers=2),
            plgpu.Barrier(num_arrivals=2))


def _store(value, smem, gmem):
    """Registers → SMEM → GMEM by TMA (the store stays in flight; call ``_reuse`` before the next
    write to ``smem``)."""
    smem[...] = value.astype(smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, gmem)


def _reuse():
    """Wait until every TMA store issued so far has read its SMEM source."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def states_forward(qs, wn, kt, p, u, a, s0, *, out_dtype, interpret=None):
    """``qs, wn, kt [B, H, Tp, K]``, ``p [B, H, Tp, C]`` (operand dtype), ``u [B, H, Tp, V]`` fp32,
    ``a [B, H, N_pad]`` fp32, ``s0 [B, H, K, V]`` fp32. Returns ``o [B, H, Tp, V]`` (out_dtype),
    ``s_in [B, H, N·K, V]`` and ``v' [B, H, Tp, V]`` (operand dtype), ``s_final [B, H, K, V]`` fp32.

    ``qs`` and ``p`` None: the summary pass, which returns only ``s_final`` (no outputs, no
    per-chunk states; the sequence split runs it with ``s0 = [I | 0]``, ``u = [0 | U]``)."""
    B, H, Tp, K = wn.shape
    sh = Shapes(B, H, K, u.shape[-1], Tp // C)
    op = wn.dtype
    summary = qs is None

    def body(*refs):
        if summary:
            (wn_ref, kt_ref, u_ref, a_ref, s0_ref, sfin_ref,
             wn_s, kt_s, u_s, a_s, s_s, vn_s, sf_s, full, empty, once) = refs
        else:
            (qs_ref, wn_ref, kt_ref, p_ref, u_ref, a_ref, s0_ref, o_ref, sin_ref, vn_ref, sfin_ref,
             qs_s, wn_s, kt_s, p_s, u_s, a_s, s_s, vn_s, o_s, sf_s, full, empty, once) = refs
        b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
        cols = pl.ds(j * BV, BV)

        def issue(n, slot):
            rows = ((wn_ref, wn_s), (kt_ref, kt_s)) + (() if summary else ((qs_ref, qs_s), (p_ref, p_s)))
            _load_chunk(n, slot, full, (b, h), cols, rows=rows, tiles=((u_ref, u_s),))

        def step(n, slot, S):
            rows = pl.ds(n * C, C)
            _reuse()  # the previous chunk's stores have read s_s, vn_s, o_s
            s_s[...] = S.astype(op)
            plgpu.commit_smem()
            if not summary:
                plgpu.copy_smem_to_gmem(s_s, sin_ref.at[b, h, pl.ds(n * K, K), cols])
            v_new = _wgmma(wn_s.at[slot], s_s, (C, BV)) + _wgmma_layout(u_s.at[slot])
            vn_s[...] = v_new.astype(op)
            plgpu.commit_smem()
            if not summary:
                plgpu.copy_smem_to_gmem(vn_s, vn_ref.at[b, h, rows, cols])
                out = _wgmma2(qs_s.at[slot], s_s, p_s.at[slot], vn_s, (C, BV))
                _store(out, o_s, o_ref.at[b, h, rows, cols])
            return a_s[n] * S + _wgmma(kt_s.at[slot].T, vn_s, (K, BV))

        _serial_pass(sh.N, issue, step, (full, empty, once), reverse=False, decays=(a_ref.at[b, h], a_s),
                     state_in=s0_ref.at[b, h, :, cols], state_out=sfin_ref.at[b, h, :, cols], staging=sf_s)

    key_tile, u_tile = _swizzled((2, C, K), op), plgpu.SMEM((2, C, BV), f32)
    decays, state_f32 = plgpu.SMEM((sh.N_pad,), f32), plgpu.SMEM((K, BV), f32)
    state_op, values_op = _swizzled((K, BV), op), _swizzled((C, BV), op)
    final = jax.ShapeDtypeStruct((B, H, K, sh.V), f32)
    if summary:  # wn_s, kt_s, u_s, a_s, s_s, vn_s, sf_s
        scratch = [key_tile, key_tile, u_tile, decays, state_op, values_op, state_f32, *_barriers(3)]
        out_type, operands = final, (wn, kt, u, a, s0)
    else:  # qs_s, wn_s, kt_s, p_s, u_s, a_s, s_s, vn_s, o_s, sf_s
        scratch = [key_tile, key_tile, key_tile, _swizzled((2, C, C), op), u_tile, decays, state_op, values_op,
                   _swizzled((C, BV), out_dtype), state_f32, *_barriers(5)]
        out_type = (jax.ShapeDtypeStruct((B, H, Tp, sh.V), out_dtype), jax.ShapeDtypeStruct((B, H, sh.N * K, sh.V), op),
                    jax.ShapeDtypeStruct((B, H, Tp, sh.V), op), final)
        operands = (qs, wn, kt, p, u, a, s0)
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=sh.grid,
                        grid_names=("b", "h", "j"), num_threads=2, thread_name="wg", interpret=interpret,
                        kernel_name="osdn_mosaic_states_summary" if summary else "osdn_mosaic_states_fwd")(*operands)


def states_backward(qs, wn, kt, do, dvo, a, ds_final, *, interpret=None):
    """``qs, wn, kt [B, H, Tp, K]``, ``do [B, H, Tp, V]`` (operand dtype), ``dvo [B, H, Tp, V]`` fp32,
    ``a [B, H, N_pad]``, ``ds_final [B, H, K, V]`` fp32. Returns ``ds_out [B, H, N·K, V]`` and
    ``dv' [B, H, Tp, V]`` (operand dtype) and ``ds0 [B, H, K, V]`` fp32."""
    B, H, Tp, K = wn.shape
    sh = Shapes(B, H, K, do.shape[-1], Tp // C)
    op = wn.dtype

    def body(qs_ref, wn_ref, kt_ref, do_ref, dvo_ref, a_ref, dsf_ref, dsout_ref, dvn_ref, ds0_ref,
             qs_s, wn_s, kt_s, do_s, dvo_s, a_s, ds_s, dvn_s, sf_s, full, empty, once):
        b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("j")
        cols = pl.ds(j * BV, BV)

        def issue(n, slot):
            _load_chunk(n, slot, full, (b, h), cols, rows=((qs_ref, qs_s), (wn_ref, wn_s), (kt_ref, kt_s)),
                        tiles=((do_ref, do_s), (dvo_ref, dvo_s)))

        def step(n, slot, dS):
            rows = pl.ds(n * C, C)
            _reuse()
            _store(dS, ds_s, dsout_ref.at[b, h, pl.ds(n * K, K), cols])
            dv_new = _wgmma(kt_s.at[slot], ds_s, (C, BV)) + _wgmma_layout(dvo_s.at[slot])
            _store(dv_new, dvn_s, dvn_ref.at[b, h, rows, cols])
            return a_s[n] * dS + _wgmma2(qs_s.at[slot].T, do_s.at[slot], wn_s.at[slot].T, dvn_s, (K, BV))

        _serial_pass(sh.N, issue, step, (full, empty, once), reverse=True, decays=(a_ref.at[b, h], a_s),
                     state_in=dsf_ref.at[b, h, :, cols], state_out=ds0_ref.at[b, h, :, cols], staging=sf_s)

    out_type = (jax.ShapeDtypeStruct((B, H, sh.N * K, sh.V), op), jax.ShapeDtypeStruct((B, H, Tp, sh.V), op),
                jax.ShapeDtypeStruct((B, H, K, sh.V), f32))
    scratch = [_swizzled((2, C, K), op), _swizzled((2, C, K), op), _swizzled((2, C, K), op), _swizzled((2, C, BV), op),
               plgpu.SMEM((2, C, BV), f32), plgpu.SMEM((sh.N_pad,), f32),
               _swizzled((K, BV), op), _swizzled((C, BV), op), plgpu.SMEM((K, BV), f32),
               *_barriers()]
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=sh.grid, grid_names=("b", "h", "j"),
                        num_threads=2, thread_name="wg", interpret=interpret,
                        kernel_name="osdn_mosaic_states_bwd")(qs, wn, kt, do, dvo, a, ds_final)
