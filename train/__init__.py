"""Training, data, checkpoints and evaluation (installed as ``osdn_jax.train``).

Empty until the training issue lands.
"""
