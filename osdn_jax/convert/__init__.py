"""PyTorch interop: flash-linear-attention (fla) checkpoints in and out, and upcycling.

``load_fla(path) -> (CausalLM, ModelConfig)`` reads an fla Hugging Face checkpoint folder (DeltaNet,
Gated DeltaNet, their hybrids with softmax attention layers, and our OSDN exports);
``save_fla(model, path)`` writes one. ``python -m osdn_jax.convert {import,export}`` moves a
checkpoint between such a folder and one of our run directories. See ``docs/convert.md``.
"""

from osdn_jax.convert.fla import fla_name, load_fla, save_fla
from osdn_jax.convert.fla_config import fla_config_from_model, model_config_from_fla

__all__ = ["fla_config_from_model", "fla_name", "load_fla", "model_config_from_fla", "save_fla"]
