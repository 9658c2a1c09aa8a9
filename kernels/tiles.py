"""In-kernel building blocks shared by the Pallas kernels: policy-aware dots, masked loads and
stores of native ``[B, T, H, ·]`` blocks, the per-chunk gates and the blocked triangular inverse.

Everything here runs inside a kernel body, on values and refs, and follows the Triton lowering's
rules (power-of-two tiles, ``fori_loop`` only, ``pl.ds`` on refs, no value slicing).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from osdn_jax.kernels.config import Policy, Target

f32 = jnp.float32
SUB = 16  # side of the diagonal blocks of the triangular inverse (and the smallest chunk)


@dataclasses.dataclass(frozen=True)
class Env:
    """Static facts a kernel body needs: the policy, interpret or compiled, chunk C, true length T."""

    policy: Policy
    target: Target
    C: int
    T: int

    @property
    def op(self):
        return self.policy.operand_dtype


class Refs:
    """Named access to a kernel's refs; an input that was not passed reads as None."""

    def __init__(self, names, refs):
        assert len(names) == len(refs), (names, len(refs))
        self.__dict__.update(zip(names, refs))

    def __getattr__(self, name):
        return None


def call(body, name: str, grid, inputs: dict, outputs: dict, *, num_warps: int, num_stages: int,
         interpret: bool, **static) -> dict:
    """One Triton ``pallas_call`` with named refs. ``inputs`` / ``outputs`` map names to
    ``(array or ShapeDtypeStruct, BlockSpec)``; inputs whose array is None are left out. The body
    is called as ``body(*refs, names=..., **static)`` (read the refs with ``Refs``); returns the
    outputs by name."""
    ins = {n: v for n, v in inputs.items() if v[0] is not None}
    names = tuple(ins) + tuple(outputs)
    outs = pl.pallas_call(
        functools.partial(body, names=names, **static), grid=grid, name=name,
        in_specs=[spec for _, spec in ins.values()], out_specs=[spec for _, spec in outputs.values()],
        out_shape=[shape for shape, _ in outputs.values()], interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(*(a for a, _ in ins.values()))
    return dict(zip(outputs, outs))


# ----------------------------------------------------------------------------------------------
# dots


def _round_tf32(x):
    """fp32 rounded to TF32 (10 explicit mantissa bits, nearest-even): what tensor cores read."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0xFFF) + ((bits >> 13) & jnp.uint32(1))) & jnp.uint32(0xFFFFE000)
    return lax.bitcast_convert_type(bits, f32)


def _dims(ta: bool, tb: bool):
    return (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))


def mm(a, b, env: Env, *, ta: bool = False, tb: bool = False):
    """``op(a) @ op(b)`` (``op`` = transpose where asked) with operands in the policy's dtype and
    fp32 accumulation. fp32 operands multiply as TF32 or IEEE; in interpret mode TF32 is emulated
    by rounding the operands, so CPU tests see the GPU's numerics."""
    od = env.op
    a, b = a.astype(od), b.astype(od)
    if od == jnp.dtype(f32):
        if env.policy.fp32 == "ieee":
            prec = lax.Precision.HIGHEST
        elif env.target.interpret:
            a, b, prec = _round_tf32(a), _round_tf32(b), lax.Precision.HIGHEST
        else:
            prec = lax.Precision.DEFAULT  # TF32 tensor cores
    else:
        prec = None
    return lax.dot_general(a, b, _dims(ta, tb), precision=prec, preferred_element_type=f32)


def mm32(a, b, env: Env):
    """fp32 ``a @ b`` at (close to) full fp32 accuracy: IEEE under the IEEE policy, else 3xTF32
    on tensor cores (the interpreter computes it exactly)."""
    if env.policy.fp32 == "ieee" or env.target.interpret:
        prec = lax.Precision.HIGHEST
    else:
        prec = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return lax.dot_general(a.astype(f32), b.astype(f32), _dims(False, False), precision=prec,
                           preferred_element_type=f32)


def barrier(env: Env):
    """Make this program's global stores visible to all its threads (no-op when interpreting)."""
    if not env.target.interpret:
        plgpu.debug_barrier()


def tile_loop(count: int, body, init):
    """``body(i, carry)`` for i < count: a ``fori_loop``, or one direct call when count == 1."""
    if count == 1:
        return body(0, init)
    return lax.fori_loop(0, count, body, init)


# ----------------------------------------------------------------------------------------------
# masked access to native [.., T, ..] blocks


def iota(n: int):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def valid_rows(start, n: int, T: int):
    """``[n]`` bool: rows ``start .. start+n−1`` that lie inside the sequence of length T."""
    return start + iota(n) < T


def load(ref, valid, *, dtype=None):
    """Load a ``[n]`` or ``[n, d]`` block whose rows past T (``valid`` False) read as 0."""
    mask = valid if len(ref.shape) == 1 else jnp.broadcast_to(valid[:, None], ref.shape)
    x = plgpu.load(ref, mask=mask, other=0)
    return x if dtype is None else x.astype(dtype)


def store(ref, value, valid):
    """Store a ``[n]`` or ``[n, d]`` block, skipping rows past T."""
    mask = valid if len(ref.shape) == 1 else jnp.broadcast_to(valid[:, None], ref.shape)
    plgpu.store(ref, value.astype(ref.dtype), mask=mask)


# ----------------------------------------------------------------------------------------------
# gates and documents inside one chunk


@dataclasses.dataclass
class Gates:
    """For one chunk: ``D [C, C]`` (exp(G_i − G_j) for j ≤ i in one document, else 0), ``fs [C]``
    (exp(G) where the incoming state still reaches, else 0), ``d_last [C]`` (row C−1 of D),
    ``a`` (scalar, the decay of the incoming state over the whole chunk) and the row / column
    iotas."""

    D: jax.Array
    fs: jax.Array
    d_last: jax.Array
    a: jax.Array
    rows: jax.Array
    cols: jax.Array


def cumsum(g, C: int):
    """Inclusive cumulative sum of ``g [C]`` (a masked reduction; Triton has no cumsum lowering here)."""
    rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    return jnp.sum(jnp.where(rows >= cols, g[None, :], 0.0), axis=1)


def reverse_cumsum(x, C: int):
    """``out_j = Σ_{i ≥ j} x_i`` for ``x [C]``."""
    rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    return jnp.sum(jnp.where(rows >= cols, x[:, None], 0.0), axis=0)


def chunk_scalars(g, rel):
    """``a``: the decay of the incoming state over one chunk, from raw ``g [C]`` (or None) and
    ``rel [C]`` (or None); 0 if a document starts inside the chunk."""
    a = jnp.float32(1.0)
    if g is not None:
        a = jnp.exp(jnp.sum(g))
    if rel is not None:
        a = jnp.where(jnp.max(rel) == 0, a, 0.0)
    return a


def gates(g, rel, C: int) -> Gates:
    """Gates of one chunk from raw log decays ``g [C]`` (None: no gate) and document numbers
    ``rel [C]`` (None: one document; else 0 for the document open at the chunk start, 1, 2, ...)."""
    rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    within = rows >= cols
    if rel is not None:
        within &= rel[:, None] == rel[None, :]
    if g is None:
        D = jnp.where(within, 1.0, 0.0)
        fs = jnp.ones((C,), f32)
    else:
        G = cumsum(g, C)
        D = jnp.where(within, jnp.exp(jnp.where(within, G[:, None] - G[None, :], 0.0)), 0.0)
        fs = jnp.exp(G)
    if rel is not None:
        fs = jnp.where(rel == 0, fs, 0.0)
    d_last = jnp.sum(jnp.where(rows == C - 1, D, 0.0), axis=0)
    a = chunk_scalars(g, rel)
    return Gates(D, fs, d_last, a, rows, cols)


# ----------------------------------------------------------------------------------------------
# (I + A)⁻¹ for strictly lower A: 16×16 forward substitution, merged block by block


def _inverse16(blocks):
    """``(I + A)⁻¹`` of several strictly lower ``[16, 16]`` blocks at once (independent chains)."""
    rows = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    cols = lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)
    eye = jnp.where(rows == cols, 1.0, 0.0)

    def row(i, Ts):
        out = []
        for A, T in zip(blocks, Ts):
            a_i = jnp.sum(jnp.where(rows == i, A, 0.0), axis=0)  # row i of A, indexed by column
            new = jnp.where(cols == i, 1.0, 0.0) - jnp.sum(a_i[:, None] * T, axis=0)[None, :]
            out.append(jnp.where(rows == i, new, T))
        return tuple(out)

    return lax.fori_loop(1, SUB, row, tuple(eye for _ in blocks))


def blocked_inverse(A, t_ref, env: Env):
    """``T = (I + A)⁻¹`` for strictly lower ``A [C, C]`` (fp32), written to ``t_ref [C, C]`` and
    returned.

    The C/16 diagonal blocks are inverted by forward substitution (15 dependent steps, all
    blocks side by side); the off-diagonal blocks follow by block forward substitution,
    ``T_mn = −T_mm Σ_{n ≤ p < m} A_mp T_pn``, one block diagonal at a time (C/16 − 1 dependent
    steps of small fp32 matmuls). ``t_ref`` doubles as the scratch that splits A into blocks.
    """
    C = env.C
    nb = C // SUB
    if nb == 1:
        (T,) = _inverse16((A,))
        t_ref[...] = T
        return T
    blk = lambda m, n: (pl.ds(m * SUB, SUB), pl.ds(n * SUB, SUB))  # noqa: E731
    t_ref[...] = A
    barrier(env)
    Ab = {(m, p): t_ref[blk(m, p)] for m in range(nb) for p in range(m)}
    Ad = [t_ref[blk(m, m)] for m in range(nb)]
    barrier(env)
    Tb = dict(zip(((m, m) for m in range(nb)), _inverse16(tuple(Ad))))
    for diag in range(1, nb):
        for m in range(diag, nb):
            n = m - diag
            acc = mm32(Ab[m, n], Tb[n, n], env)
            for p in range(n + 1, m):
                acc = acc + mm32(Ab[m, p], Tb[p, n], env)
            Tb[m, n] = -mm32(Tb[m, m], acc, env)
    zero = jnp.zeros((SUB, SUB), f32)
    for m in range(nb):
        for n in range(nb):
            t_ref[blk(m, n)] = Tb[m, n] if n <= m else zero
    barrier(env)
    return t_ref[...]
