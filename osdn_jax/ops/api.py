"""The ops front door: ``delta_rule``, ``osdn_preconditioner`` and ``osdn``.

Layouts: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta, log_decay, log_gamma [B, T, H]``,
states ``[B, H, K, V]`` (fp32), ``d0 [H, K]``, ``d [B, T, H, K]``, ``segment_ids [B, T]``.

``impl`` chooses the path:

- ``"reference"``: ``lax.scan`` token by token (the oracle);
- ``"chunked"``: the chunkwise WY/UT form in plain JAX (any backend; a hand-written backward);
- ``"pallas"``: the Pallas kernels, forward and backward, of one of two families
  (``osdn_jax.kernels.dispatch``): Mosaic GPU on Hopper (sm_90, bf16 / fp16, chunk 64) and Triton
  elsewhere (sm_80, fp32 policies, other chunks). They compile for a GPU target and run in an
  interpreter elsewhere (``osdn_jax.kernels.kernel_target`` chooses, e.g. to lower the real GPU
  kernels on a CPU host, and can force a family). Arguments the chosen family does not cover raise
  a ``ValueError``. Under a mesh they run per device (``osdn_jax.kernels.partition``);
- under a mesh (``jax.set_mesh``) with a ``context`` axis of size > 1, every path but the reference
  runs context-parallel: time split over ``context``, rows over the other axes
  (``osdn_jax.ops.context``);
- ``"auto"``: the kernels on a GPU target for the (family, GPU generation, operand dtype) triples
  that passed the GPU suite (``PALLAS_VERIFIED_ON_GPU``, e.g. ``("mosaic", "sm_90", "bfloat16")``), else
  ``"chunked"``; never under ``precision="ieee"`` (the exact XLA path serves that).

``precision`` (kernels only; the reference and chunked paths always multiply in IEEE fp32):
None = bf16 / fp16 inputs multiply in their dtype on tensor cores, fp32 inputs as TF32;
``"tf32"`` or ``"ieee"`` = fp32 operands, TF32 or IEEE products (``osdn_jax.kernels.config``).

Dispatch fails closed: a path runs only for the arguments its tests cover.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from osdn_jax.kernels import config as kernel_config
from osdn_jax.kernels import dispatch
from osdn_jax.kernels import preconditioner as pallas_preconditioner
from osdn_jax.kernels.partition import run_partitioned
from osdn_jax.ops import checks, context
from osdn_jax.ops.chunked import delta_rule_chunked
from osdn_jax.ops.preconditioner import preconditioner_scan
from osdn_jax.ops.preconditioner_chunked import PHASE1_CHUNK, preconditioner_chunked
from osdn_jax.ops.reference import PreconditionerConfig, delta_rule_reference, osdn_reference

IMPLS = ("auto", "reference", "chunked", "pallas")

_delta_rule_reference = jax.jit(delta_rule_reference, static_argnames=("scale",))
_delta_rule_chunked = jax.jit(delta_rule_chunked, static_argnames=("scale", "chunk_size"))
_osdn_reference = jax.jit(osdn_reference, static_argnames=("precond", "scale"))
_preconditioner_reference = jax.jit(preconditioner_scan, static_argnames=("eta", "d_min", "d_max"))
_preconditioner_chunked = jax.jit(preconditioner_chunked, static_argnames=("eta", "d_min", "d_max", "chunk_size"))

# Operand layouts for the mesh partitioning of the kernels (b: batch, h: heads).
_LAYOUTS = dict(q="bthk", k="bthk", v="bthk", beta="bth", write_key="bthk", log_decay="bth", log_gamma="bth",
                initial_state="bhkv", initial_d="bhk", segment_ids="bt", d0="hk")


def _delta_rule_kernels(q, k, v, beta, *, write_key, log_decay, initial_state, segment_ids, scale, chunk_size,
                        precision, target):
    args = dict(q=q, k=k, v=v, beta=beta, write_key=write_key, log_decay=log_decay, initial_state=initial_state,
                segment_ids=segment_ids)
    fn = functools.partial(dispatch.delta_rule_kernels, scale=scale, chunk_size=chunk_size,
                           precision=precision, target=target)
    return run_partitioned(fn, args, _LAYOUTS, ("bthv", "bhkv"), q=q, B=k.shape[0], H=k.shape[2])


def _preconditioner_kernel(k, d0, *, eta, d_min, d_max, log_gamma, beta, segment_ids, initial_d, target):
    args = dict(k=k, d0=d0, log_gamma=log_gamma, beta=beta, segment_ids=segment_ids, initial_d=initial_d)
    fn = functools.partial(pallas_preconditioner.preconditioner_pallas, eta=eta, d_min=d_min, d_max=d_max,
                           target=target)
    return run_partitioned(fn, args, _LAYOUTS, ("bthk", "bhk"), q=k, B=k.shape[0], H=k.shape[2])


def _osdn_kernels_local(q, k, v, beta, d0, *, log_gamma, log_decay, initial_state, initial_d, segment_ids, precond,
                        scale, chunk_size, precision, target):
    """Phase 1 kernel, then the phase-2 kernels with write key ``d ⊙ k`` (formed inside the Triton
    kernels; in the Mosaic family's per-chunk stage)."""
    d, d_final = pallas_preconditioner.preconditioner_pallas(
        k, d0, eta=precond.eta, d_min=precond.d_min, d_max=precond.d_max, log_gamma=log_gamma,
        beta=beta if precond.beta_aware else None, segment_ids=segment_ids, initial_d=initial_d, target=target)
    o, S = dispatch.delta_rule_kernels(
        q, k, v, beta, write_scale=d, log_decay=log_decay, scale=scale, initial_state=initial_state,
        segment_ids=segment_ids, chunk_size=chunk_size, precision=precision, target=target)
    return o, S, d_final


def _osdn_kernels(q, k, v, beta, d0, *, log_gamma, log_decay, initial_state, initial_d, segment_ids, precond, scale,
                  chunk_size, precision, target):
    args = dict(q=q, k=k, v=v, beta=beta, d0=d0, log_gamma=log_gamma, log_decay=log_decay,
                initial_state=initial_state, initial_d=initial_d, segment_ids=segment_ids)
    fn = functools.partial(_osdn_kernels_local, precond=precond, scale=scale, chunk_size=chunk_size,
                           precision=precision, target=target)
    return run_partitioned(fn, args, _LAYOUTS, ("bthv", "bhkv", "bhk"), q=q, B=k.shape[0], H=k.shape[2])


_KERNEL_STATICS = ("scale", "chunk_size", "precision", "target")
_delta_rule_pallas = jax.jit(_delta_rule_kernels, static_argnames=_KERNEL_STATICS)
_preconditioner_pallas = jax.jit(_preconditioner_kernel, static_argnames=("eta", "d_min", "d_max", "target"))
_osdn_pallas = jax.jit(_osdn_kernels, static_argnames=_KERNEL_STATICS + ("precond",))


def _context_call(fn, args: dict, out_layouts, *, path: str, cp, **statics):
    """``fn`` (a per-device op of ``osdn_jax.ops.context``) over the context mesh ``cp``."""
    mesh, batch = cp
    target = kernel_config.current_target() if path == "pallas" else None
    fn = functools.partial(fn, impl=path, target=target, **statics)
    return context.run_sharded(fn, args, _LAYOUTS, out_layouts, T=args["k"].shape[1], mesh=mesh, batch=batch)


def phase1_in_chunks(impl: str) -> bool:
    """Whether a path without the phase-1 kernel runs phase 1 in chunks (``preconditioner_chunked``)
    or token by token (``preconditioner_scan``): in chunks for ``impl="chunked"``, and for ``"auto"``
    when compiling for a GPU or TPU, where every token of the scan costs kernel launches. A CPU runs
    the scan's steps without launches and its triangular solves slowly, so ``"auto"`` keeps the scan
    there (4–11× faster for T = 4096 on the CI machine: ``benchmarks/phase1.py``)."""
    if impl != "auto":
        return impl == "chunked"
    device = jax.config.jax_default_device  # set when compiling for a device that is not the default
    platform = getattr(device, "platform", device) or jax.default_backend()
    return platform != "cpu"


def _osdn_chunked_fn(q, k, v, beta, d0, *, precond, log_gamma=None, log_decay=None, scale, initial_state=None,
                     initial_d=None, segment_ids=None, chunk_size=64, phase1_chunks=True):
    """Phase 1 (in chunks, or token by token where ``phase1_in_chunks`` says so), then the chunked
    phase 2 with write key d ⊙ k (fp32)."""
    phase1 = preconditioner_chunked if phase1_chunks else preconditioner_scan
    d, d_final = phase1(k, d0, eta=precond.eta, d_min=precond.d_min, d_max=precond.d_max, log_gamma=log_gamma,
                        beta=beta if precond.beta_aware else None, segment_ids=segment_ids, initial_d=initial_d)
    o, S = delta_rule_chunked(q, k, v, beta, write_key=d * k.astype(jnp.float32), log_decay=log_decay, scale=scale,
                              initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size)
    return o, S, d_final


_osdn_chunked = jax.jit(_osdn_chunked_fn, static_argnames=("precond", "scale", "chunk_size", "phase1_chunks"))


# "auto" picks the kernels only for the (family, GPU generation, operand dtype) triples that passed
# the GPU suite (benchmarks/gpu_suite.sh) on a real GPU; until then they are tested in interpret
# mode and compiled to GPU code on CPU (benchmarks/compile_kernels.py, compile_mosaic.py), never
# run natively.
PALLAS_VERIFIED_ON_GPU: frozenset[tuple[str, str, str]] = frozenset()


def _choose_impl(impl: str, kernel_gap: str | None, policy: kernel_config.Policy | None = None,
                 family: str = "triton") -> str:
    """The path to run; ``kernel_gap`` is why the kernels (of ``family``) do not cover these
    arguments (None: they do)."""
    checks.check_impl(impl, IMPLS)
    if impl == "pallas":
        if kernel_gap is not None:
            raise ValueError(f"impl='pallas': the {family} kernels do not cover {kernel_gap}; use impl='chunked' "
                             "or 'auto'")
        return "pallas"
    if impl == "auto":
        target = kernel_config.current_target()
        operand = "float32" if policy is None else policy.operand
        # IEEE products are for accuracy checks: the exact XLA path serves them better on a GPU.
        ieee = policy is not None and policy.operand == "float32" and policy.fp32 == "ieee"
        verified = (not target.interpret and not ieee
                    and (family, target.arch, operand) in PALLAS_VERIFIED_ON_GPU)
        return "pallas" if verified and kernel_gap is None else "chunked"
    return impl


def _phase2_path(impl: str, K: int, V: int, T: int, chunk_size: int, policy: kernel_config.Policy) -> str:
    family, gap = dispatch.family_for(K, V, chunk_size, policy, kernel_config.current_target(), T)
    return _choose_impl(impl, gap, policy, family)


def _scale(scale, K: int) -> float:
    return K**-0.5 if scale is None else checks.static_float("scale", scale)


def _precond_config(eta, d_min, d_max, beta_aware) -> PreconditionerConfig:
    eta = checks.static_float("eta", eta, minimum=0.0)
    d_min = checks.static_float("d_min", d_min, allow_none=True)
    d_max = checks.static_float("d_max", d_max, allow_none=True)
    if d_min is not None and d_max is not None and d_min > d_max:
        raise ValueError(f"d_min, d_max: expected d_min <= d_max, got d_min={d_min}, d_max={d_max}")
    return PreconditionerConfig(eta=eta, d_min=d_min, d_max=d_max, beta_aware=bool(beta_aware))


def _check_common(q, k, v, beta, log_decay, initial_state, segment_ids, chunk_size):
    B, T, H, K, V = checks.check_qkv(q, k, v)
    checks.check_float("beta", beta, (B, T, H), "[B, T, H]")
    checks.check_optional("log_decay", log_decay, (B, T, H), "[B, T, H]")
    checks.check_state("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")
    checks.check_segment_ids(segment_ids, B, T)
    checks.check_chunk_size(chunk_size)
    return B, T, H, K, V


def delta_rule(q, k, v, beta, *, write_key=None, log_decay=None, scale=None, initial_state=None,
               segment_ids=None, output_final_state=False, chunk_size=64, impl="auto", precision=None):
    """DeltaNet; Gated DeltaNet with ``log_decay`` (``S ← exp(g_t) S`` before the write); the
    two-key rule (OSDN phase 2) with ``write_key`` ``k̃ [B, T, H, K]`` (erase with k, write with k̃).

    Returns ``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] fp32 or None)``.
    ``scale`` defaults to ``K ** -0.5``. ``segment_ids`` restart the state wherever the id changes.
    ``precision``: the kernels' multiply policy (see the module docstring).
    """
    B, T, H, K, V = _check_common(q, k, v, beta, log_decay, initial_state, segment_ids, chunk_size)
    checks.check_optional("write_key", write_key, (B, T, H, K), "[B, T, H, K] like k")
    policy = kernel_config.policy_for(k.dtype, precision)
    path = _phase2_path(impl, K, V, T, chunk_size, policy)
    scale = _scale(scale, K)
    kwargs = dict(write_key=write_key, log_decay=log_decay, scale=scale, initial_state=initial_state,
                  segment_ids=segment_ids)
    cp = None if path == "reference" else context.context_mesh(B)
    if cp is not None:
        args = dict(q=q, k=k, v=v, beta=beta, write_key=write_key, log_decay=log_decay, initial_state=initial_state,
                    segment_ids=segment_ids)
        o, S = _context_call(context.delta_rule, args, ("bthv", "pbhkv"), path=path, cp=cp, scale=scale,
                             chunk_size=chunk_size, precision=precision)
    elif path == "reference":
        o, S = _delta_rule_reference(q, k, v, beta, **kwargs)
    elif path == "pallas":
        o, S = _delta_rule_pallas(q, k, v, beta, chunk_size=chunk_size, precision=precision,
                                  target=kernel_config.current_target(), **kwargs)
    else:
        o, S = _delta_rule_chunked(q, k, v, beta, chunk_size=chunk_size, **kwargs)
    return o, (S if output_final_state else None)


def osdn_preconditioner(k, d0, *, eta, d_min, d_max, log_gamma=None, beta=None, segment_ids=None,
                        initial_d=None, impl="auto", chunk_size=PHASE1_CHUNK):
    """Phase 1 of OSDN: the trajectory ``d [B, T, H, K]`` (fp32; ``d[:, t]`` is the value used for
    the write at token t) and the final ``d [B, H, K]`` (after the last token's update).

    ``log_gamma`` turns on APF (γ = exp(log_gamma)); passing ``beta`` selects the β-aware
    hypergradient ``β(1 − β⟨d, k²⟩)k²``, otherwise the code form ``(1 − ⟨d, k²⟩)k²``.
    ``d_min``/``d_max`` may be None (no clip on that side). ``d`` restarts at ``d0`` at each
    document start of ``segment_ids``. ``impl``: ``"reference"`` runs the ``lax.scan`` token by
    token (the oracle), ``"chunked"`` the chunkwise form (``chunk_size`` tokens per serial step; the
    chunks where the clip is active are redone token by token, so both agree to fp32 rounding),
    ``"pallas"`` the phase-1 kernel; ``"auto"`` the kernel where verified on a GPU, else chunks on
    a GPU or TPU and the scan on a CPU (``phase1_in_chunks``).
    """
    if not hasattr(k, "ndim") or k.ndim != 4:
        checks.fail("k", "a rank-4 array [B, T, H, K]", k)
    B, T, H, K = k.shape
    checks.check_float("k", k, (B, T, H, K), "[B, T, H, K]")
    checks.check_float("d0", d0, (H, K), "[H, K] with H, K from k")
    checks.check_optional("log_gamma", log_gamma, (B, T, H), "[B, T, H]")
    checks.check_optional("beta", beta, (B, T, H), "[B, T, H]")
    checks.check_segment_ids(segment_ids, B, T)
    checks.check_state("initial_d", initial_d, (B, H, K), "[B, H, K]")
    checks.check_chunk_size(chunk_size)
    cfg = _precond_config(eta, d_min, d_max, beta is not None)
    path = _choose_impl(impl, pallas_preconditioner.supported(K))
    kwargs = dict(eta=cfg.eta, d_min=cfg.d_min, d_max=cfg.d_max, log_gamma=log_gamma, beta=beta,
                  segment_ids=segment_ids, initial_d=initial_d)
    cp = None if path == "reference" else context.context_mesh(B)
    if cp is not None:
        args = dict(k=k, d0=d0, log_gamma=log_gamma, beta=beta, segment_ids=segment_ids, initial_d=initial_d)
        return _context_call(context.preconditioner, args, ("bthk", "pbhk"), path=path, cp=cp, eta=cfg.eta,
                             d_min=cfg.d_min, d_max=cfg.d_max, phase1_chunk_size=chunk_size,
                             phase1_chunks=phase1_in_chunks(impl))
    if path == "pallas":
        return _preconditioner_pallas(k, d0, target=kernel_config.current_target(), **kwargs)
    if path == "reference" or not phase1_in_chunks(impl):
        return _preconditioner_reference(k, d0, **kwargs)
    return _preconditioner_chunked(k, d0, chunk_size=chunk_size, **kwargs)


def osdn(q, k, v, beta, d0, *, eta, d_min, d_max, log_gamma=None, beta_aware=False, log_decay=None,
         scale=None, initial_state=None, initial_d=None, segment_ids=None, output_final_state=False,
         chunk_size=64, impl="auto", precision=None):
    """OSDN, both phases: the preconditioner trajectory, then the delta rule with write key d ⊙ k.

    ``log_gamma [B, T, H]`` turns on APF; ``beta_aware`` selects the β-aware hypergradient;
    ``log_decay [B, T, H]`` adds the Gated-DeltaNet decay (OS-Gated DeltaNet).
    ``precision``: the kernels' multiply policy (see the module docstring).
    Returns ``(o [B, T, H, V], final_state [B, H, K, V] or None, final_d [B, H, K] or None)``.
    """
    B, T, H, K, V = _check_common(q, k, v, beta, log_decay, initial_state, segment_ids, chunk_size)
    checks.check_float("d0", d0, (H, K), "[H, K] with H, K from k")
    checks.check_optional("log_gamma", log_gamma, (B, T, H), "[B, T, H]")
    checks.check_state("initial_d", initial_d, (B, H, K), "[B, H, K]")
    cfg = _precond_config(eta, d_min, d_max, beta_aware)
    policy = kernel_config.policy_for(k.dtype, precision)
    path = _phase2_path(impl, K, V, T, chunk_size, policy)
    scale = _scale(scale, K)
    kwargs = dict(precond=cfg, log_gamma=log_gamma, log_decay=log_decay, scale=scale,
                  initial_state=initial_state, initial_d=initial_d, segment_ids=segment_ids)
    cp = None if path == "reference" else context.context_mesh(B)
    if cp is not None:
        args = dict(q=q, k=k, v=v, beta=beta, d0=d0, log_gamma=log_gamma, log_decay=log_decay,
                    initial_state=initial_state, initial_d=initial_d, segment_ids=segment_ids)
        o, S, d_final = _context_call(context.osdn, args, ("bthv", "pbhkv", "pbhk"), path=path, cp=cp, eta=cfg.eta,
                                      d_min=cfg.d_min, d_max=cfg.d_max, beta_aware=cfg.beta_aware, scale=scale,
                                      chunk_size=chunk_size, precision=precision,
                                      phase1_chunks=phase1_in_chunks(impl))
    elif path == "reference":
        o, S, d_final, _ = _osdn_reference(q, k, v, beta, d0, **kwargs)
    elif path == "pallas":
        o, S, d_final = _osdn_pallas(q, k, v, beta, d0, chunk_size=chunk_size, precision=precision,
                                     target=kernel_config.current_target(), **kwargs)
    else:
        o, S, d_final = _osdn_chunked(q, k, v, beta, d0, chunk_size=chunk_size, phase1_chunks=phase1_in_chunks(impl),
                                      **kwargs)
    if not output_final_state:
        return o, None, None
    return o, S, d_final


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / sqrt(sum(x²) + eps)`` over the last axis (SPEC §1), computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
