"""Pallas (Triton) kernels, installed as ``osdn_jax.kernels``; see ``docs/kernels.md``.

- ``delta_rule.delta_rule_pallas``: the chunkwise delta rule (OSDN phase 2), forward and backward.
- ``preconditioner.preconditioner_pallas``: OSDN phase 1 (the ``d`` trajectory), forward and backward.
- ``config``: the precision policy, the target (``kernel_target``) and the tile table.
- ``partition``: per-device execution under a mesh (``kernel_partition``).

Reached through ``osdn_jax.ops`` with ``impl="pallas"`` (or ``"auto"`` once verified on a GPU).
"""

from osdn_jax.kernels.config import kernel_target
from osdn_jax.kernels.partition import kernel_partition

__all__ = ["kernel_target", "kernel_partition"]
