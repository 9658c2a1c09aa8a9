"""Context parallelism: one sequence split along time over the devices of a mesh axis.

Device p of P holds tokens ``[p·L, (p+1)·L)`` of every row. The functions ``delta_rule``,
``preconditioner`` and ``osdn`` below run per device inside ``jax.shard_map`` (time sharded over
``axis_name``); the front door (``osdn_jax.ops``) calls them by itself when the mesh in context
(``jax.set_mesh``) has an axis named ``context`` (``CONTEXT_AXIS``) of size > 1. Each device runs the
chunked path (or the Pallas kernels) on its slice; only per-row-and-head summaries cross devices.

**Phase 2, the delta rule** (plain, gated, any write key). The state leaving a slice is affine in
the state entering it, ``S_out = M S_in + N``: ``M [K, K]`` is the product of the slice's transitions
``exp(g_t)(I − β_t k̃_t k_tᵀ)`` (zero once a document starts inside the slice) and ``N [K, V]`` the
state the slice leaves from ``S_in = 0`` (``chunked.transition_summary``). Every device all-gathers
the P pairs (P·K·(K+V) floats per row and head), combines them in order to get its own ``S_in``,
then runs its slice from ``S_in``. The backward is the mirror image: with ``g`` the cotangent that
reaches ``S_in`` from the slice's own outputs, ``dS_in = Mᵀ dS_out + g``; the P values of ``g`` are
gathered and combined from the last device to the first, giving each device the cotangent of its
``S_out``, and the local backward runs with it.

**Phase 1, OSDN's d.** The clipped update is not affine, so d is relayed: P − 1 rounds in which every
device runs its slice's phase 1 from the d it holds and sends the result to the next device; after
round r the first r + 1 devices hold their exact incoming d. The backward relays the cotangent of d
the other way. Each slice runs the chunked phase 1 (``preconditioner_chunked``: L/C serial steps,
chunks with an active clip token by token) or the phase-1 kernel.

**Documents** (``segment_ids``): a device whose first token starts a new document (its id differs
from the previous device's last token) enters with ``S = 0`` and ``d = d0``; documents may span
devices. The initial state and ``initial_d`` belong to device 0's first document.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from osdn_jax.kernels import dispatch
from osdn_jax.kernels import preconditioner as pallas_preconditioner
from osdn_jax.kernels.config import Target
from osdn_jax.ops.chunked import delta_rule_chunked, match_varying, transition_summary
from osdn_jax.ops.preconditioner import preconditioner_scan
from osdn_jax.ops.preconditioner_chunked import PHASE1_CHUNK, preconditioner_chunked

CONTEXT_AXIS = "context"
_HI = lax.Precision.HIGHEST
f32 = jnp.float32


# -- device-to-device helpers ------------------------------------------------------------------------

def _shift(x: jax.Array, axis_name: str, *, forward: bool = True) -> jax.Array:
    """``x`` from the previous device (``forward``) or the next one; the end device gets zeros."""
    n = lax.axis_size(axis_name)
    perm = [(i, i + 1) for i in range(n - 1)] if forward else [(i + 1, i) for i in range(n - 1)]
    return lax.ppermute(x, axis_name, perm)


def entry_starts(segment_ids: jax.Array | None, axis_name: str) -> jax.Array | None:
    """``[B]`` bool: this device's first token starts a new document (never on device 0)."""
    if segment_ids is None:
        return None
    prev_last = _shift(segment_ids[:, -1], axis_name)
    return (lax.axis_index(axis_name) > 0) & (segment_ids[:, 0] != prev_last)


def halo(x: jax.Array, width: int, axis_name: str, first: jax.Array | None = None) -> jax.Array:
    """The last ``width`` steps of the previous device's ``x [B, L, ...]`` (``[B, width, ...]``);
    device 0 gets ``first`` (zeros when None)."""
    got = _shift(x[:, x.shape[1] - width:], axis_name)
    if first is None:
        return got
    return jnp.where(lax.axis_index(axis_name) == 0, first.astype(x.dtype), got)


# -- phase 2: the delta rule -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Phase2:
    axis_name: str
    scale: float
    chunk_size: int
    kernels: bool  # the Pallas kernels run the slice, else the chunked path
    precision: str | None
    target: Target | None


def _phase2_local(st: _Phase2, q, k, kw, v, beta, log_decay, S_in, *, segment_ids):
    kwargs = dict(write_key=kw, log_decay=log_decay, scale=st.scale, initial_state=S_in, segment_ids=segment_ids,
                  chunk_size=st.chunk_size)
    if st.kernels:
        return dispatch.delta_rule_kernels(q, k, v, beta, precision=st.precision, target=st.target, **kwargs)
    return delta_rule_chunked(q, k, v, beta, **kwargs)


def _combine_forward(Ms, Ns, starts, S0):
    """Entry state of every device ``[P, B, H, K, V]``: ``S_in[p+1] = M[p] S_in[p] + N[p]``, zero where a
    device starts a document."""

    def step(S, xs):
        M, N, start = xs
        if start is not None:
            S = jnp.where(start[:, None, None, None], 0.0, S)
        return jnp.einsum("bhij,bhjv->bhiv", M, S, precision=_HI) + N, S

    return lax.scan(step, S0, (Ms, Ns, starts))[1]


def _combine_backward(Ms, gs, direct, starts):
    """Cotangent of every device's exit state ``[P, B, H, K, V]`` and of the initial state, from the
    last device to the first: ``dS_out[p] = direct[p] + dS_in[p+1]``, ``dS_in[p] = M[p]ᵀ dS_out[p] + g[p]``
    (nothing flows back from a device that starts a document)."""

    def step(carry, xs):
        M, g, d, start = xs
        dS_out = d + carry
        dS_in = jnp.einsum("bhji,bhjv->bhiv", M, dS_out, precision=_HI) + g
        if start is not None:
            dS_in = jnp.where(start[:, None, None, None], 0.0, dS_in)
        return dS_in, dS_out

    dS_init, dS_outs = lax.scan(step, jnp.zeros_like(gs[0]), (Ms, gs, direct, starts), reverse=True)
    return dS_outs, dS_init


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta_rule_cp(st: _Phase2, q, k, kw, v, beta, log_decay, S_init, segment_ids):
    return _delta_rule_cp_fwd(st, q, k, kw, v, beta, log_decay, S_init, segment_ids)[0]


def _delta_rule_cp_fwd(st: _Phase2, q, k, kw, v, beta, log_decay, S_init, segment_ids):
    ax = st.axis_name
    M, N = transition_summary(k, v, beta, write_key=kw, log_decay=log_decay, segment_ids=segment_ids,
                              chunk_size=st.chunk_size)
    starts = entry_starts(segment_ids, ax)
    Ms = lax.all_gather(M, ax)  # [P, B, H, K, K]
    starts_all = None if starts is None else lax.all_gather(starts, ax)  # [P, B]
    S_in = _combine_forward(Ms, lax.all_gather(N, ax), starts_all, S_init)[lax.axis_index(ax)]
    local = functools.partial(_phase2_local, st, segment_ids=segment_ids)
    (o, S_out), pullback = jax.vjp(local, q, k, kw, v, beta, log_decay, S_in)
    return (o, S_out), (pullback, Ms, starts_all)


def _delta_rule_cp_bwd(st: _Phase2, res, cotangents):
    pullback, Ms, starts_all = res
    dO, dS_out = cotangents
    ax = st.axis_name
    g = pullback((dO, jnp.zeros_like(dS_out)))[-1]  # what reaches S_in from this slice's outputs
    dS_outs, _ = _combine_backward(Ms, lax.all_gather(g, ax), lax.all_gather(dS_out, ax), starts_all)
    me = lax.axis_index(ax)
    *grads, dS_in = pullback((dO, dS_outs[me]))
    # Only device 0 reads the initial state; a shard_map that replicates it sums over devices.
    return (*grads, jnp.where(me == 0, dS_in, 0.0), None)


_delta_rule_cp.defvjp(_delta_rule_cp_fwd, _delta_rule_cp_bwd)


def _local_impl(impl: str) -> bool:
    if impl not in ("chunked", "pallas"):
        raise ValueError(f"impl: expected 'chunked' or 'pallas' for a context-parallel op, got {impl!r}")
    return impl == "pallas"


def delta_rule(q, k, v, beta, *, axis_name: str = CONTEXT_AXIS, write_key=None, log_decay=None, scale=None,
               initial_state=None, segment_ids=None, chunk_size=64, impl="chunked", precision=None, target=None):
    """The delta rule on this device's slice of a sequence whose time axis is split over ``axis_name``.

    Call inside ``jax.shard_map``. Per device: ``q, k, write_key [B, L, H, K]``, ``v [B, L, H, V]``,
    ``beta, log_decay [B, L, H]``, ``segment_ids [B, L]`` (this device's tokens), ``initial_state
    [B, H, K, V]`` (the state before the sequence, read on device 0 only). Returns ``o [B, L, H, V]``
    and the state after this device's last token ``[B, H, K, V]`` (fp32; on the last device, the
    sequence's final state). ``impl``: ``"chunked"`` or ``"pallas"`` for the slice.
    """
    B, L, H, K = k.shape
    V = v.shape[-1]
    st = _Phase2(axis_name, K**-0.5 if scale is None else float(scale), chunk_size, _local_impl(impl), precision,
                 target)
    S_init = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
    return _delta_rule_cp(st, q, k, write_key, v, beta, log_decay, match_varying(S_init, k), segment_ids)


# -- phase 1: the preconditioner d -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Phase1:
    axis_name: str
    eta: float
    d_min: float | None
    d_max: float | None
    kernels: bool
    target: Target | None
    chunk_size: int = PHASE1_CHUNK
    chunks: bool = True  # without the kernel: phase 1 in chunks (else the token scan)


def _phase1_local(st: _Phase1, k, d0, d_in, log_gamma, beta, *, segment_ids, starts):
    if starts is not None:
        d_in = jnp.where(starts[:, None, None], d0.astype(f32), d_in)
    kwargs = dict(eta=st.eta, d_min=st.d_min, d_max=st.d_max, log_gamma=log_gamma, beta=beta,
                  segment_ids=segment_ids, initial_d=d_in)
    if st.kernels:
        return pallas_preconditioner.preconditioner_pallas(k, d0, target=st.target, **kwargs)
    if st.chunks:
        return preconditioner_chunked(k, d0, chunk_size=st.chunk_size, **kwargs)
    return preconditioner_scan(k, d0, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _preconditioner_cp(st: _Phase1, k, d0, d_start, log_gamma, beta, segment_ids):
    return _preconditioner_cp_fwd(st, k, d0, d_start, log_gamma, beta, segment_ids)[0]


def _preconditioner_cp_fwd(st: _Phase1, k, d0, d_start, log_gamma, beta, segment_ids):
    ax = st.axis_name
    me = lax.axis_index(ax)
    local = functools.partial(_phase1_local, st, segment_ids=segment_ids, starts=entry_starts(segment_ids, ax))

    def relay(_, d_in):
        _, d_out = local(k, d0, d_in, log_gamma, beta)
        return jnp.where(me == 0, d_start, _shift(d_out, ax))

    d_in = lax.fori_loop(0, lax.axis_size(ax) - 1, relay, d_start)
    out, pullback = jax.vjp(local, k, d0, d_in, log_gamma, beta)
    return out, pullback


def _preconditioner_cp_bwd(st: _Phase1, pullback, cotangents):
    g_traj, g_out = cotangents
    ax = st.axis_name

    def relay(_, g_next):  # the cotangent of this device's exit d that arrives from later devices
        dd_in = pullback((g_traj, g_out + g_next))[2]
        return _shift(dd_in, ax, forward=False)

    g_next = lax.fori_loop(0, lax.axis_size(ax) - 1, relay, jnp.zeros_like(g_out))
    dk, dd0, dd_in, dlg, db = pullback((g_traj, g_out + g_next))
    return dk, dd0, jnp.where(lax.axis_index(ax) == 0, dd_in, 0.0), dlg, db, None


_preconditioner_cp.defvjp(_preconditioner_cp_fwd, _preconditioner_cp_bwd)


def preconditioner(k, d0, *, eta, d_min, d_max, axis_name: str = CONTEXT_AXIS, log_gamma=None, beta=None,
                   segment_ids=None, initial_d=None, impl="chunked", target=None, phase1_chunk_size=PHASE1_CHUNK,
                   phase1_chunks=True):
    """OSDN's phase 1 on this device's slice (inside ``jax.shard_map``, time split over ``axis_name``).

    Per device ``k [B, L, H, K]``, ``log_gamma, beta [B, L, H]``, ``segment_ids [B, L]``; ``d0 [H, K]``
    and ``initial_d [B, H, K]`` (device 0's entry d; default d0) whole. Returns the trajectory
    ``d [B, L, H, K]`` and the d after this device's last token ``[B, H, K]`` (fp32).
    ``impl``: ``"pallas"`` runs the phase-1 kernel per slice, ``"chunked"`` the chunkwise form with
    ``phase1_chunk_size`` tokens per serial step (the token scan where ``phase1_chunks`` is False).
    """
    B, L, H, K = k.shape
    st = _Phase1(axis_name, float(eta), d_min, d_max, _local_impl(impl), target, phase1_chunk_size, phase1_chunks)
    d_start = (jnp.broadcast_to(d0.astype(f32), (B, H, K)) if initial_d is None else initial_d.astype(f32))
    d0, d_start = match_varying(d0, k), match_varying(d_start, k)
    return _preconditioner_cp(st, k, d0, d_start, log_gamma, beta, segment_ids)


def osdn(q, k, v, beta, d0, *, eta, d_min, d_max, axis_name: str = CONTEXT_AXIS, log_gamma=None,
         beta_aware=False, log_decay=None, scale=None, initial_state=None, initial_d=None, segment_ids=None,
         chunk_size=64, impl="chunked", precision=None, target=None, phase1_chunks=True):
    """OSDN (both phases) on this device's slice: the relayed d, then the delta rule with write key
    ``d ⊙ k``. Shapes as in ``delta_rule`` and ``preconditioner``; returns ``(o [B, L, H, V], S_out
    [B, H, K, V], d_out [B, H, K])`` for this device (the sequence's final values on the last one)."""
    d, d_out = preconditioner(k, d0, eta=eta, d_min=d_min, d_max=d_max, axis_name=axis_name, log_gamma=log_gamma,
                              beta=beta if beta_aware else None, segment_ids=segment_ids, initial_d=initial_d,
                              impl=impl, target=target, phase1_chunks=phase1_chunks)
    o, S_out = delta_rule(q, k, v, beta, axis_name=axis_name, write_key=d * k.astype(f32), log_decay=log_decay,
                          scale=scale, initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
                          impl=impl, precision=precision, target=target)
    return o, S_out, d_out


# -- the front door's entry: a global call under a mesh with a context axis -------------------------

def context_mesh(B: int):
    """``(mesh, batch axes)`` when the mesh in context has a ``context`` axis of size > 1, else None.

    Rows go over the other axes (in mesh order) whose sizes divide ``B``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or mesh.shape[CONTEXT_AXIS] == 1:
        return None
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if types[CONTEXT_AXIS] == AxisType.Manual:
        raise ValueError(f"mesh axis {CONTEXT_AXIS!r} is already manual (inside jax.shard_map): call "
                         "osdn_jax.ops.context.delta_rule / osdn per device instead of the front door")
    batch, size = [], 1
    for name in mesh.axis_names:
        n = mesh.shape[name]
        if name != CONTEXT_AXIS and types[name] != AxisType.Manual and n > 1 and B % (size * n) == 0:
            batch.append(name)
            size *= n
    return mesh, tuple(batch)


def _pad_time(x, T: int, n: int):
    """``x [B, T, ...]`` padded to ``n`` steps: zeros (inert tokens: k = 0, β = 0, g = 0) or, for
    integer segment ids, the last id (the padding joins the last document)."""
    if x is None or n == T:
        return x
    mode = "edge" if jnp.issubdtype(x.dtype, jnp.integer) else "constant"
    return jnp.pad(x, [(0, 0), (0, n - T)] + [(0, 0)] * (x.ndim - 2), mode=mode)


def run_sharded(fn, args: dict, layouts: dict, out_layouts, *, T: int, mesh, batch: tuple[str, ...]):
    """``fn(**args)`` per device with time split over ``context`` and rows over ``batch``.

    Layout strings: ``b`` rows, ``t`` time, ``p`` one entry per context device (per-device outputs,
    stacked), other letters whole. Time is padded to a multiple of the context size and cut back
    after; outputs laid out ``p...`` come back as the last device's value.
    """
    n = mesh.shape[CONTEXT_AXIS]
    Tp = -(-T // n) * n
    args = {name: (_pad_time(a, T, Tp) if "t" in layouts[name][:2] else a) for name, a in args.items()}
    names = [name for name, a in args.items() if a is not None]

    def spec(layout: str) -> P:
        table = {"b": batch or None, "t": CONTEXT_AXIS, "p": CONTEXT_AXIS}
        return P(*(table.get(c) for c in layout))

    def local(*xs):
        out = fn(**{**args, **dict(zip(names, xs))})
        return jax.tree.map(lambda x, lay: x[None] if lay.startswith("p") else x, out, out_layouts)

    out = jax.shard_map(local, mesh=mesh, in_specs=tuple(spec(layouts[name]) for name in names),
                        out_specs=jax.tree.map(spec, out_layouts), check_vma=False)(*(args[n_] for n_ in names))
    return jax.tree.map(lambda x, lay: x[-1] if lay.startswith("p") else (x[:, :T] if "t" in lay else x), out,
                        out_layouts)
