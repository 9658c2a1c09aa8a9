"""Pallas Mosaic GPU kernels (Hopper, sm_90), installed as ``osdn_jax.kernels.mosaic``.

- ``state_pass``: the serial state passes of the chunkwise delta rule (TMA, wgmma), forward with
  the output fused in, and the reverse pass of the backward.
- ``delta_rule.delta_rule_mosaic``: the op around them (per-chunk factors and gradients in XLA,
  ``jax.custom_vjp``), same contract as the Triton kernels' ``delta_rule_pallas``.

See ``docs/kernels.md`` for which family runs where.
"""
