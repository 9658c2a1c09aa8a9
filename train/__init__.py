"""Training, data, checkpoints and evaluation (installed as ``osdn_jax.train``).

``python -m osdn_jax.train --help`` (or ``osdn-train``) lists the configuration. Modules:
``config`` (the dataclass tree and CLI), ``data`` / ``sources`` / ``tokenizer`` (grain pipeline),
``optim``, ``sharding``, ``step``, ``checkpoint``, ``metrics``, ``loop`` (the run), ``evaluate``.
"""
