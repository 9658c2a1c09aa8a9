"""``osdn_jax.ops``: the delta-rule family behind one front door (see ``api``)."""

from osdn_jax.ops.api import IMPLS, delta_rule, l2_normalize, osdn, osdn_preconditioner

__all__ = ["IMPLS", "delta_rule", "l2_normalize", "osdn", "osdn_preconditioner"]
