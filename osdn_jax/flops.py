"""Training FLOPs per token of a ``ModelConfig``, and the devices' peak FLOP/s: what model FLOP
utilisation (MFU) divides.

    MFU = flops_per_token(cfg, T) · tokens/s / (peak FLOP/s of one device · devices)

``flops_per_token(cfg, T)`` counts one training step (forward + backward; the backward pass costs
about twice the forward, hence the factors 3 and 6) for rows of ``T`` tokens. An estimate, stated
so it can be checked:

    6 · N
  + Σ over delta-rule layers:  H · 3 · (6·K·V + 4·C·K + 4·C·V)
  + Σ over attention layers:   H_q · 3 · 2 · 2 · (T / 2) · D

- ``N``: the matmul parameters, i.e. every parameter but the embedding table (whose lookup is no
  matmul). With ``tie_embeddings`` the LM head multiplies by the embedding matrix, so its
  vocab × hidden entries count once. The few norm weights, convolution taps, biases and per-head
  gates are counted with them (a few per mille of N).
- Delta-rule layers (``cfg.mixer``, or every layer not in ``cfg.attention_layers``): ``H`` =
  ``cfg.num_heads``, ``K`` = the mixer's ``head_k_dim`` (default ``hidden_size / H``), ``V`` = its
  ``head_v_dim`` (default ``K``), ``C`` = its ``chunk_size``, at most ``T``. Per chunk of C tokens
  and head the chunkwise form multiplies with the state three times (``Q·S``, ``W·S``, ``Kᵀ·U``:
  6·C·K·V), builds two C × C Gram matrices (``Q·Kᵀ``, ``K·Kᵀ``: 4·C²·K) and applies two C × C
  matrices to C × V values (the WY solve and the intra-chunk output: 4·C²·V); divided by C tokens.
  OSDN's preconditioner pass and the gates (elementwise, O(K) per token) are not counted.
- Softmax-attention layers (the hybrid's ``cfg.attention_layers``, or an ``attention`` mixer):
  ``Q·Kᵀ`` and ``A·V``, 2 FLOPs per multiply-add, over the causal context, ``T / 2`` tokens on
  average, for ``H_q`` query heads (the mixer's ``num_heads`` or ``cfg.num_heads``) of width
  ``D = hidden_size / H_q``.

``device_peak_flops(device_kind, compute_dtype)`` is the nominal dense peak of one device from
``PEAK_TFLOPS``, read off the chip table ``osdn_jax.hardware.CHIPS`` (vendors' datasheets, without
sparsity): bf16 / fp16 tensor cores (TPU: the MXU) for a bfloat16 / float16 compute dtype; for
float32, XLA's default fp32 product precision (TF32 tensor cores on NVIDIA GPUs, one bf16 pass on
TPUs). ``None`` for a device it does not know (CPUs among them).
"""

from __future__ import annotations

from osdn_jax import hardware
from osdn_jax.attention import AttentionConfig
from osdn_jax.model import ModelConfig, count_params

# (chip, {compute dtype: dense TFLOP/s}) from the chip table (osdn_jax.hardware): bf16 / fp16 compute
# runs on the bf16 tensor cores (MXU), fp32 compute at XLA's default fp32 product precision (TF32 on
# NVIDIA GPUs, one bf16 pass on TPUs).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = tuple(
    (c.name, {"bfloat16": c.peak("bf16") / 1e12, "float32": c.peak("tf32" if c.platform == "gpu" else "bf16") / 1e12})
    for c in hardware.CHIPS.values())
# compute dtypes (and names of the peaks) -> the PEAK_TFLOPS column
_DTYPE_COLUMN = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "bfloat16", "fp16": "bfloat16",
                 "float32": "float32", "fp32": "float32", "tf32": "float32"}


def delta_rule_flops_per_token(K: int, V: int, C: int) -> float:
    """Training FLOPs per token and head of the chunkwise delta rule: ``3 · (6KV + 4CK + 4CV)``."""
    return 3.0 * (6 * K * V + 4 * C * K + 4 * C * V)


def attention_flops_per_token(D: int, seq_len: int) -> float:
    """Training FLOPs per token and query head of causal softmax attention: ``3 · 2 · 2 · (T/2) · D``."""
    return 3.0 * 2 * 2 * (seq_len / 2) * D


def _mixer_flops(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    mixer = cfg.layer_mixer(layer)
    if isinstance(mixer, AttentionConfig):
        heads = mixer.num_heads or cfg.num_heads
        return heads * attention_flops_per_token(cfg.hidden_size // heads, seq_len)
    K = mixer.head_k_dim or cfg.hidden_size // cfg.num_heads
    V = mixer.head_v_dim or K
    return cfg.num_heads * delta_rule_flops_per_token(K, V, min(mixer.chunk_size, seq_len))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of ``CausalLM(cfg)`` on rows of ``seq_len``
    tokens; the formula is in this module's docstring."""
    if seq_len < 1:
        raise ValueError(f"seq_len: expected >= 1, got {seq_len!r}")
    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
    matmul_params = count_params(cfg) - embedding
    return 6.0 * matmul_params + sum(_mixer_flops(cfg, i, seq_len) for i in range(cfg.num_layers))


def device_peak_flops(device_kind: str, compute_dtype: str) -> float | None:
    """The nominal dense peak FLOP/s of one device of ``device_kind`` (``jax.Device.device_kind``)
    computing in ``compute_dtype`` (``bfloat16``, ``float16``, ``float32``; also ``bf16``, ``tf32``),
    from ``PEAK_TFLOPS``; None when the device or the dtype is not in the table (e.g. ``cpu``)."""
    column = _DTYPE_COLUMN.get(compute_dtype.lower())
    found = hardware.chip_for_kind(device_kind)
    if found is None or column is None:
        return None
    return dict(PEAK_TFLOPS)[found.name][column] * 1e12


def mfu(flops_per_token_: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOP utilisation: achieved training FLOP/s over ``peak_flops`` (of all devices)."""
    return flops_per_token_ * tokens_per_s / peak_flops


__all__ = ["PEAK_TFLOPS", "attention_flops_per_token", "delta_rule_flops_per_token", "device_peak_flops",
           "flops_per_token", "mfu"]
