"""Which kernel family runs a call: Mosaic GPU (Hopper) or Triton.

- **Mosaic GPU** (``osdn_jax.kernels.mosaic``): sm_90 only (``wgmma``, TMA), bf16 / fp16 inputs
  multiplied in their dtype with fp32 accumulation, chunk 64, head dims up to 128.
- **Triton** (``osdn_jax.kernels.delta_rule``): sm_80 and sm_90, every policy (bf16 / fp16, fp32
  as TF32 or IEEE), chunks 16 / 32 / 64. JAX has deprecated the Pallas Triton backend; it stays
  for Ampere, fp32 inputs and the other chunk sizes while JAX still carries it.

``target.family`` (``kernel_target(..., family=...)``) forces a family; a call it does not cover
is refused with the reason. Left None: Mosaic on a compiled sm_90 target where it covers the call,
else Triton. Interpret targets default to Triton (the Pallas interpreter); ``family="mosaic"`` runs
the Mosaic kernels in Mosaic GPU's interpreter.
"""

from __future__ import annotations

from osdn_jax.kernels import delta_rule as triton_delta_rule
from osdn_jax.kernels.config import Policy, Target, current_target, policy_for
from osdn_jax.kernels.mosaic import delta_rule as mosaic_delta_rule


def _mosaic_gap(K, V, C, policy: Policy, target: Target, T) -> str | None:
    return mosaic_delta_rule.supported(K, V, C, policy.operand, target.arch, T)


def family_for(K: int, V: int, C: int, policy: Policy, target: Target, T: int | None = None) -> tuple[str, str | None]:
    """``(family, gap)``: the family that would run, and why it cannot (None: it can)."""
    if target.family == "mosaic":
        return "mosaic", _mosaic_gap(K, V, C, policy, target, T)
    if target.family is None and not target.interpret and _mosaic_gap(K, V, C, policy, target, T) is None:
        return "mosaic", None
    return "triton", triton_delta_rule.supported(K, V, C)


def delta_rule_kernels(q, k, v, beta, *, write_key=None, write_scale=None, log_decay=None, scale, initial_state=None,
                       segment_ids=None, chunk_size=64, precision: str | None = None, target: Target | None = None):
    """The delta rule on the kernel family chosen for these arguments; same contract as
    ``delta_rule_pallas``."""
    target = current_target() if target is None else target
    B, T, H, K = k.shape
    family, gap = family_for(K, v.shape[-1], chunk_size, policy_for(k.dtype, precision), target, T)
    if gap is not None:
        raise ValueError(f"impl='pallas' ({family} kernels): unsupported {gap}")
    kwargs = dict(write_key=write_key, write_scale=write_scale, log_decay=log_decay, scale=scale,
                  initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size, target=target)
    if family == "mosaic":
        return mosaic_delta_rule.delta_rule_mosaic(q, k, v, beta, **kwargs)
    return triton_delta_rule.delta_rule_pallas(q, k, v, beta, precision=precision, **kwargs)
