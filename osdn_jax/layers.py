"""Building blocks of the delta-rule models (SPEC §5): RMSNorm, gated RMSNorm, the causal depthwise
short convolution and the SwiGLU MLP.

Parameters carry logical axis names (``embed``, ``heads``, ``mlp``, ``vocab``) for sharding with
logical-axis rules; they are never sharded at creation (``eager_sharding=False``), so a model builds
with or without a mesh, and the trainer places it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from osdn_jax.ops import context, segments

Dtype = jnp.dtype | type


def annotated(init, names: tuple[str | None, ...]):
    """``init`` tagged with logical axis ``names`` (one per parameter dimension)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
    """A parameter holding ``value`` with logical axis ``names``."""
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
          init_range: float = 0.02, use_bias: bool = False, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, kernel_init=None, bias_init=None) -> nnx.Linear:
    """A ``Linear`` with N(0, init_range) weights (SPEC §5) and logical axis names ``(in, out)``."""
    kernel_init = kernel_init or nnx.initializers.normal(init_range)
    bias_init = bias_init or nnx.initializers.zeros_init()
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=annotated(kernel_init, names), bias_init=annotated(bias_init, names[1:]),
                      rngs=rngs)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x) * weight`` over the last axis, in fp32; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learnable weight (initialised to 1)."""

    def __init__(self, features: int, *, eps: float = 1e-6, param_dtype: Dtype = jnp.float32,
                 axis_name: str | None = "embed"):
        self.eps = eps
        self.weight = param(jnp.ones((features,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class GatedRMSNorm(RMSNorm):
    """Per-head RMSNorm followed by an output gate: ``rms_norm(o) · act(gate)``, ``act`` SiLU
    (``swish``, Gated DeltaNet's) or ``sigmoid``."""

    def __init__(self, features: int, *, eps: float = 1e-6, param_dtype: Dtype = jnp.float32,
                 axis_name: str | None = "embed", activation: str = "swish"):
        super().__init__(features, eps=eps, param_dtype=param_dtype, axis_name=axis_name)
        if activation not in ("swish", "sigmoid"):
            raise ValueError(f"activation: expected 'swish' or 'sigmoid', got {activation!r}")
        self.activation = activation

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        y = rms_norm(x, self.weight[...], self.eps).astype(jnp.float32)
        act = jax.nn.silu if self.activation == "swish" else jax.nn.sigmoid
        return (y * act(gate.astype(jnp.float32))).astype(x.dtype)


def short_conv(x: jax.Array, weight: jax.Array, doc: jax.Array | None = None,
               history: jax.Array | None = None) -> jax.Array:
    """Causal depthwise convolution ``y_t = Σ_j w_j x_{t-W+1+j}`` (no bias).

    ``x [B, T, D]``, ``weight [W, D]`` (``weight[-1]`` multiplies the current token).
    ``history [B, W-1, D]``: the inputs before ``x`` (decode state; zeros when None).
    ``doc [B, T]``: document indices (``segments.document_index``); a tap only reads a token of the
    same document, and the history belongs to document 0.
    """
    W = weight.shape[0]
    B, T, D = x.shape
    if history is None:
        history = jnp.zeros((B, W - 1, D), x.dtype)
    x_pad = jnp.concatenate([history.astype(x.dtype), x], axis=1).astype(jnp.float32)
    if doc is not None:
        doc_pad = jnp.concatenate([jnp.zeros((B, W - 1), doc.dtype), doc], axis=1)
    w = weight.astype(jnp.float32)
    y = jnp.zeros((B, T, D), jnp.float32)
    for j in range(W):
        tap = x_pad[:, j:j + T]
        if doc is not None and j < W - 1:
            tap = jnp.where((doc_pad[:, j:j + T] == doc)[..., None], tap, 0.0)
        y = y + w[j] * tap
    return y.astype(x.dtype)


def short_conv_slice(x: jax.Array, weight: jax.Array, segment_ids: jax.Array | None = None,
                     history: jax.Array | None = None, *, axis_name: str = context.CONTEXT_AXIS) -> jax.Array:
    """``short_conv`` on this device's slice ``x [B, L, D]`` of a sequence split over ``axis_name``
    (inside ``jax.shard_map``; ``L >= W - 1``): the taps before the slice read the previous device's
    last ``W - 1`` inputs (a halo exchange; device 0 reads ``history``), and stay inside documents of
    ``segment_ids [B, L]`` across the device edge."""
    W = weight.shape[0]
    x_halo = context.halo(x, W - 1, axis_name, history)
    doc = None
    if segment_ids is not None:  # the history belongs to device 0's first document
        first = jnp.broadcast_to(segment_ids[:, :1], (segment_ids.shape[0], W - 1))
        ids = jnp.concatenate([context.halo(segment_ids, W - 1, axis_name, first), segment_ids], axis=1)
        doc = segments.document_index(ids)
    return short_conv(jnp.concatenate([x_halo, x], axis=1), weight, doc)[:, W - 1:]


_CONV_LAYOUTS = dict(x="btd", weight="wd", segment_ids="bt", history="bwd")  # for context.run_sharded


class ShortConv(nnx.Module):
    """Causal depthwise short convolution (kernel ``width``, no bias) with a decode state.

    Weight ``[width, features]``, initialised like PyTorch's ``Conv1d`` (uniform ±1/sqrt(width)).
    """

    def __init__(self, features: int, width: int = 4, *, rngs: nnx.Rngs, param_dtype: Dtype = jnp.float32):
        self.width = width
        bound = 1.0 / math.sqrt(width)
        init = annotated(lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
                         (None, "heads"))
        self.weight = nnx.Param(init(rngs.params(), (width, features), param_dtype))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None,
                 history: jax.Array | None = None) -> jax.Array:
        """``x [B, T, D]`` → ``[B, T, D]``, continuing after ``history [B, W-1, D]`` when given; taps
        stay inside each document of ``segment_ids [B, T]``. Under a mesh with a ``context`` axis the
        time axis stays split: each device exchanges a ``W - 1`` token halo (``short_conv_slice``)."""
        B, T, _ = x.shape
        cp = context.context_mesh(B)
        if cp is not None and -(-T // cp[0].shape[context.CONTEXT_AXIS]) >= self.width - 1:
            args = dict(x=x, weight=self.weight[...], segment_ids=segment_ids, history=history)
            return context.run_sharded(short_conv_slice, args, _CONV_LAYOUTS, "btd", T=T, mesh=cp[0], batch=cp[1])
        doc = None if segment_ids is None else segments.document_index(segment_ids)
        return short_conv(x, self.weight[...], doc, history)

    def final_history(self, x: jax.Array, segment_ids: jax.Array | None = None,
                      history: jax.Array | None = None) -> jax.Array:
        """The decode state after ``x [B, T, D]``: the last ``W - 1`` inputs ``[B, W-1, D]``, zero
        where they lie before the last document of ``segment_ids``."""
        B, T, D = x.shape
        W = self.width
        if history is None:
            history = jnp.zeros((B, W - 1, D), x.dtype)
        hist = jnp.concatenate([history.astype(x.dtype), x], axis=1)[:, T:]
        if segment_ids is not None:
            doc = segments.document_index(segment_ids)
            doc = jnp.concatenate([jnp.zeros((B, W - 1), doc.dtype), doc], axis=1)[:, T:]
            hist = jnp.where((doc == doc[:, -1:])[..., None], hist, 0)
        return hist


def mlp_width(hidden_size: int, ratio: float = 4.0, multiple_of: int = 256) -> int:
    """SwiGLU width (SPEC §5): ``multiple_of · ceil(int(hidden · ratio · 2/3) / multiple_of)``."""
    return multiple_of * math.ceil(int(hidden_size * ratio * 2 / 3) / multiple_of)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) · up(x))``, no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, rngs: nnx.Rngs, init_range: float = 0.02,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(rngs=rngs, init_range=init_range, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = dense(hidden_size, intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = dense(hidden_size, intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = dense(intermediate_size, hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
