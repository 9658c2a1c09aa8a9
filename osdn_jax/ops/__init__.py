"""``osdn_jax.ops``: the delta-rule family behind one front door (see ``api``).

``kernel_target`` and ``kernel_partition`` (from ``osdn_jax.kernels``) steer the Pallas path:
where its kernels run or are traced for, and how they split over a mesh.
"""

from osdn_jax.kernels.config import kernel_target
from osdn_jax.kernels.partition import kernel_partition
from osdn_jax.ops.api import IMPLS, delta_rule, l2_normalize, osdn, osdn_preconditioner

__all__ = ["IMPLS", "delta_rule", "kernel_partition", "kernel_target", "l2_normalize", "osdn", "osdn_preconditioner"]
