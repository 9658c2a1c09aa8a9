"""Pallas GPU kernels (installed as ``osdn_jax.kernels``).

Empty until the kernel issue lands; ``osdn_jax.ops`` refuses ``impl="pallas"`` until then.
"""
