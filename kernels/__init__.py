"""Pallas (Triton) kernels, installed as ``osdn_jax.kernels``; see ``docs/kernels.md``.

- ``delta_rule.delta_rule_pallas``: the chunkwise delta rule (OSDN phase 2), forward and backward.
- ``preconditioner.preconditioner_pallas``: OSDN phase 1 (the ``d`` trajectory), forward and backward.

Reached through ``osdn_jax.ops`` with ``impl="pallas"``; on a CPU backend they run with
``interpret=True``.
"""
