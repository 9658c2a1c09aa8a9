"""Softmax attention as a token mixer: the baseline of the recall studies.

``Attention(hidden_size, num_heads, config, *, rngs)`` has the DeltaNet mixers' API
(``__call__(x, segment_ids)``, ``prefill``, ``step``, ``init_cache``) and registers as
``"attention"`` in ``osdn_jax.mixers.MIXERS``.

Path: q = Linear(hidden, H·K), k, v = Linear(hidden, H_kv·K) (bias with ``qkv_bias``; H_kv < H
is grouped-query attention, each key/value head serving H / H_kv query heads) → optional causal
depthwise short conv + SiLU (``conv_size > 0``, as in the delta-rule mixers) → RoPE on q and k →
causal multi-head attention
(``jax.nn.dot_product_attention``, scale 1/sqrt(K), fp32 softmax) → o_proj. With ``segment_ids``
a token attends only to earlier tokens of its own document, and its RoPE position is its position
inside that document.

Decoding keeps a KV cache of a fixed length ``max_len`` (``init_cache(batch_size, max_len)``):
keys (after RoPE) and values ``[B, max_len, H, K]``, the number of slots filled, and per row the
slot where its current document began, so a continuation stays inside the document the prompt
ended in (``generate``'s left padding is a document of its own and is never attended to).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from osdn_jax.layers import Dtype, ShortConv, dense
from osdn_jax.ops import checks, segments
from osdn_jax.ops.checks import require

IMPLEMENTATIONS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Options of the attention mixer (sizes come from the model: hidden size and heads)."""

    name: ClassVar[str] = "attention"
    num_heads: int | None = None  # query heads; None: the model's num_heads (head dim hidden / heads)
    num_kv_heads: int | None = None  # key/value heads (a divisor of the query heads); None: as many
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    conv_size: int = 0  # 0: no short conv; W > 0: causal depthwise conv (kernel W) + SiLU on q, k, v
    # jax.nn.dot_product_attention's backend: None (cuDNN flash attention where available: a GPU,
    # bf16/fp16 and a configuration cuDNN takes; XLA otherwise) | 'xla' | 'cudnn' (forced)
    implementation: str | None = None

    def __post_init__(self):
        for field in ("num_heads", "num_kv_heads"):
            v = getattr(self, field)
            require(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), field,
                    "None or an int >= 1", v)
        require(self.rope_theta > 0, "rope_theta", "> 0", self.rope_theta)
        require(isinstance(self.conv_size, int) and not isinstance(self.conv_size, bool) and self.conv_size >= 0,
                "conv_size", "an int >= 0 (0: no short conv)", self.conv_size)
        require(self.implementation in IMPLEMENTATIONS, "implementation", f"one of {IMPLEMENTATIONS}",
                self.implementation)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionCache:
    """Decode state of one attention mixer.

    ``keys`` (RoPE applied) and ``values [B, L, H_kv, K]`` in the compute dtype; ``length []`` int32,
    the slots filled (every row advances together); ``start [B]`` int32, the slot where each row's
    current document began (the next token's RoPE position is ``length - start``); ``conv``, the
    short-conv histories ``(q, k, v) [B, W-1, H·K]`` when ``conv_size > 0``, else None.
    """

    keys: jax.Array
    values: jax.Array
    length: jax.Array
    start: jax.Array
    conv: tuple[jax.Array, jax.Array, jax.Array] | None = None


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of ``x [B, T, H, K]`` at ``positions [B, T]`` (rotate-half: feature i pairs
    with i + K/2, frequency ``theta^(-2i/K)``), computed in fp32; returns x's dtype."""
    K = x.shape[-1]
    inv_freq = jnp.asarray(1.0 / theta ** (np.arange(0, K, 2) / K), jnp.float32)  # [K/2]
    angle = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, K/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attend(q, k, v, *, mask=None, is_causal=False, scale: float, implementation: str | None = None):
    """``jax.nn.dot_product_attention`` of ``q [B, T, H, K]`` over ``k, v [B, S, H, K]``.

    ``implementation=None`` takes cuDNN's flash attention where it is available (a GPU backend,
    bf16 / fp16 inputs, and a configuration cuDNN accepts when the call is traced) and XLA
    otherwise; ``"xla"`` / ``"cudnn"`` force one (``"cudnn"`` fails where cuDNN cannot run).
    """
    kw = dict(mask=mask, is_causal=is_causal, scale=scale)
    if implementation is None and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw)
        except (ValueError, NotImplementedError, RuntimeError):
            pass  # no cuDNN, or a shape / dtype / mask it does not take: XLA below
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation or "xla", **kw)


class Attention(nnx.Module):
    """Causal multi-head softmax attention with RoPE; head dim ``hidden_size // num_heads`` (even);
    ``config.num_heads`` (when set) replaces the ``num_heads`` argument.

    ``dtype`` is the compute dtype (also the KV cache's), ``param_dtype`` the parameters' (fp32 by
    default); linear weights are N(0, ``init_range``).
    """

    config_class: ClassVar[type] = AttentionConfig
    kv_cache: ClassVar[bool] = True  # the decode cache stores every token (init_cache needs max_len)

    def __init__(self, hidden_size: int, num_heads: int, config: AttentionConfig | None = None, *,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 init_range: float = 0.02):
        config = AttentionConfig() if config is None else config
        require(isinstance(config, AttentionConfig), "config", "an AttentionConfig", type(config).__name__)
        num_heads = config.num_heads or num_heads
        require(isinstance(num_heads, int) and num_heads >= 1, "num_heads", "an int >= 1", num_heads)
        num_kv_heads = config.num_kv_heads or num_heads
        require(num_heads % num_kv_heads == 0, "num_kv_heads", f"a divisor of num_heads={num_heads}", num_kv_heads)
        require(isinstance(hidden_size, int) and hidden_size >= 1 and hidden_size % (2 * num_heads) == 0,
                "hidden_size", f"a positive multiple of 2 * num_heads={2 * num_heads} (RoPE needs an even "
                "head dim)", hidden_size)
        self.config = config
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.dtype = dtype
        kw = {"rngs": rngs, "init_range": init_range, "dtype": dtype, "param_dtype": param_dtype}
        D, Dkv = hidden_size, num_kv_heads * self.head_dim
        self.q_proj = dense(hidden_size, D, ("embed", "heads"), use_bias=config.qkv_bias, **kw)
        self.k_proj = dense(hidden_size, Dkv, ("embed", "heads"), use_bias=config.qkv_bias, **kw)
        self.v_proj = dense(hidden_size, Dkv, ("embed", "heads"), use_bias=config.qkv_bias, **kw)
        if config.conv_size:
            self.q_conv = ShortConv(D, config.conv_size, rngs=rngs, param_dtype=param_dtype)
            self.k_conv = ShortConv(Dkv, config.conv_size, rngs=rngs, param_dtype=param_dtype)
            self.v_conv = ShortConv(Dkv, config.conv_size, rngs=rngs, param_dtype=param_dtype)
        self.o_proj = dense(D, hidden_size, ("heads", "embed"), **kw)

    # -- public API ------------------------------------------------------------------------------

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """``x [B, T, hidden]`` → ``[B, T, hidden]``; tokens attend within their document of
        ``segment_ids [B, T]`` (integers; a change of id starts a document)."""
        return self._forward(x, segment_ids, None)[0]

    def prefill(self, x: jax.Array, segment_ids: jax.Array | None = None,
                cache: AttentionCache | None = None) -> tuple[jax.Array, AttentionCache]:
        """Like ``__call__`` but also returns the cache after the last token. From ``cache`` (which
        then belongs to the first document of ``segment_ids``) the tokens are written after the
        cached ones; without one, the returned cache holds exactly these T tokens (to decode further,
        start from ``init_cache(B, max_len)``)."""
        return self._forward(x, segment_ids, cache)

    def step(self, x: jax.Array, cache: AttentionCache) -> tuple[jax.Array, AttentionCache]:
        """One token ``x [B, hidden]`` → ``(y [B, hidden], cache)``. Past the cache's length the
        output is NaN (a ValueError when ``cache.length`` is concrete)."""
        if not hasattr(x, "ndim") or x.ndim != 2:
            checks.fail("x", f"a rank-2 array [B, hidden={self.hidden_size}] (one token per row)", x)
        y, cache = self._forward(x[:, None], None, cache)
        return y[:, 0], cache

    def init_cache(self, batch_size: int, max_len: int | None = None) -> AttentionCache:
        """The empty cache for ``batch_size`` rows holding up to ``max_len`` tokens (required)."""
        require(isinstance(max_len, int) and max_len >= 1, "max_len",
                "an int >= 1 (the attention KV cache holds max_len tokens)", max_len)
        B, Hkv, K, W = batch_size, self.num_kv_heads, self.head_dim, self.config.conv_size
        kv = jnp.zeros((B, max_len, Hkv, K), self.dtype)
        conv = None
        if W:
            hist = jnp.zeros((B, W - 1, self.hidden_size), self.dtype)
            hist_kv = jnp.zeros((B, W - 1, Hkv * K), self.dtype)
            conv = (hist, hist_kv, hist_kv)
        return AttentionCache(keys=kv, values=kv, length=jnp.zeros((), jnp.int32),
                              start=jnp.zeros((B,), jnp.int32), conv=conv)

    # -- internals -------------------------------------------------------------------------------

    def _check_input(self, x, segment_ids, cache):
        checks.check_mixer_input(x, self.hidden_size, segment_ids)
        B, T, _ = x.shape
        if T < 1:
            checks.fail("x", "at least one token, [B, T >= 1, hidden]", x)
        if cache is None:
            return
        if not isinstance(cache, AttentionCache):
            checks.fail("cache", "an AttentionCache (from init_cache or prefill)", cache)
        shape = (B, cache.keys.shape[1], self.num_kv_heads, self.head_dim)
        checks.check_float("cache.keys", cache.keys, shape, "[B, L, H_kv, K]")
        if (cache.conv is None) != (self.config.conv_size == 0):
            raise ValueError(f"cache.conv: expected {'None' if self.config.conv_size == 0 else 'conv histories'} "
                             f"for conv_size={self.config.conv_size} (a cache from this mixer's init_cache)")
        L = shape[1]
        if T > L:
            raise ValueError(f"x: {T} tokens do not fit the attention KV cache of {L} (init_cache max_len)")
        if not isinstance(cache.length, jax.core.Tracer) and int(cache.length) + T > L:
            raise ValueError(f"cache: {T} more tokens after {int(cache.length)} overflow the attention KV cache "
                             f"of {L} (init_cache max_len)")

    def _forward(self, x, segment_ids, cache):
        self._check_input(x, segment_ids, cache)
        B, T, _ = x.shape
        H, Hkv, K = self.num_heads, self.num_kv_heads, self.head_dim
        x = x.astype(self.dtype)
        pre = (self.q_proj(x), self.k_proj(x), self.v_proj(x))  # [B, T, H·K], [B, T, H_kv·K] x 2
        new_hist = None
        if self.config.conv_size:
            convs = (self.q_conv, self.k_conv, self.v_conv)
            hist = (None, None, None) if cache is None else cache.conv
            new_hist = tuple(c.final_history(p, segment_ids, history=h) for c, p, h in zip(convs, pre, hist))
            pre = tuple(jax.nn.silu(c(p, segment_ids, history=h)) for c, p, h in zip(convs, pre, hist))
        q, k, v = pre[0].reshape(B, T, H, K), pre[1].reshape(B, T, Hkv, K), pre[2].reshape(B, T, Hkv, K)

        # Slots: token t of x goes to slot length + t; each token's document began at slot start_slot.
        length = jnp.zeros((), jnp.int32) if cache is None else cache.length
        carried_start = jnp.zeros((B,), jnp.int32) if cache is None else cache.start
        idx = jnp.arange(T, dtype=jnp.int32)
        slot = length + idx  # [T]
        if segment_ids is None:
            start_slot = jnp.broadcast_to(carried_start[:, None], (B, T))
        else:  # index in x of each token's document start, -1 for the document carried in
            first = jax.lax.cummax(jnp.where(segments.document_starts(segment_ids), idx, -1), axis=1)
            start_slot = jnp.where(first >= 0, length + first, carried_start[:, None])
        positions = slot[None, :] - start_slot  # [B, T], position inside the document
        theta = self.config.rope_theta
        q, k = rope(q, positions, theta), rope(k, positions, theta)

        options = {"scale": float(1.0 / np.sqrt(K)), "implementation": self.config.implementation}
        if cache is None:
            mask = None if segment_ids is None else (idx[None, None, None, :] >= start_slot[:, None, :, None])
            o = attend(q, k, v, mask=mask, is_causal=True, **options)
            keys, values = k, v
        else:
            zero = jnp.zeros((), jnp.int32)
            keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), (zero, length, zero, zero))
            values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype),
                                                  (zero, length, zero, zero))
            L = keys.shape[1]
            kslot = jnp.arange(L, dtype=jnp.int32)
            mask = (kslot[None, None, :] <= slot[None, :, None]) & (kslot[None, None, :] >= start_slot[:, :, None])
            o = attend(q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask[:, None], **options)
            o = jnp.where(length + T <= L, o, jnp.nan)  # overflowed: the slots were clamped, poison the output
        y = self.o_proj(o.reshape(B, T, H * K))
        new_cache = AttentionCache(keys=keys, values=values, length=length + T, start=start_slot[:, -1],
                                   conv=new_hist)
        return y, new_cache


__all__ = ["Attention", "AttentionCache", "AttentionConfig", "attend", "rope"]
