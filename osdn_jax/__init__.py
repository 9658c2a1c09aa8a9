"""osdn-jax: OSDN (Online Scaled DeltaNet) and the delta-rule family in JAX.

- ``osdn_jax.ops``: the ops front door (reference / chunked / Pallas paths);
- ``osdn_jax.layers``, ``osdn_jax.mixers``: NNX building blocks and token mixers;
- ``osdn_jax.attention``: softmax attention as a mixer (the baseline);
- ``osdn_jax.model``: the causal LM and its presets; ``osdn_jax.generate``: sampling.
"""

from osdn_jax import ops
from osdn_jax.attention import Attention, AttentionCache, AttentionConfig
from osdn_jax.generate import Generation, generate
from osdn_jax.mixers import (DeltaNet, DeltaNetConfig, GatedDeltaNet, GatedDeltaNetConfig, MixerCache, OSDN,
                             OSDNConfig, OSGatedDeltaNet, OSGatedDeltaNetConfig, mixer_config)
from osdn_jax.model import CausalLM, ModelCache, ModelConfig, count_params, model_config
from osdn_jax.presets import PRESETS, OSDNPreset, get_preset

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "OSDNPreset", "get_preset", "ops",
    "DeltaNet", "DeltaNetConfig", "GatedDeltaNet", "GatedDeltaNetConfig", "OSDN", "OSDNConfig",
    "OSGatedDeltaNet", "OSGatedDeltaNetConfig", "MixerCache", "mixer_config",
    "Attention", "AttentionCache", "AttentionConfig",
    "CausalLM", "ModelCache", "ModelConfig", "count_params", "model_config",
    "Generation", "generate",
]
