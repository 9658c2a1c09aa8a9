"""osdn-jax: OSDN (Online Scaled DeltaNet) and the delta-rule family in JAX."""

from osdn_jax import ops
from osdn_jax.presets import PRESETS, OSDNPreset, get_preset

__version__ = "0.1.0"
__all__ = ["PRESETS", "OSDNPreset", "get_preset", "ops"]
