"""Pallas GPU kernels (installed as ``osdn_jax.kernels``), Triton lowering.

- ``preconditioner.preconditioner_pallas``: OSDN phase 1 (the ``d`` trajectory), forward and
  backward, same contract as ``osdn_jax.ops.preconditioner.preconditioner_scan``.

The chunkwise delta-rule kernels (phase 2) are not built yet, so ``osdn_jax.ops`` still refuses
``impl="pallas"`` and ``"auto"`` never picks a kernel.
"""
