"""Token mixers (SPEC §5): ``DeltaNet``, ``GatedDeltaNet``, ``OSDN`` and ``OSGatedDeltaNet``.

Each is an NNX module usable alone in any model: ``mixer(x [B, T, hidden], segment_ids=[B, T]) ->
[B, T, hidden]``. The math lives in ``osdn_jax.ops``; a mixer holds parameters and calls it.

Common path: q, k = Linear(hidden, H·K), v = Linear(hidden, H·V) → causal depthwise short conv
(kernel 4) → SiLU; q and k L2-normalised per head; β = sigmoid(Linear(hidden, H)); the op; per-head
RMSNorm (Gated DeltaNet: a gated RMSNorm with an output gate); o_proj. The head widths K and V
default to ``hidden / H``; the options of ``DeltaNetConfig`` cover the variants that
flash-linear-attention's checkpoints use (other activations, L1 key norm, no conv, no β, β ∈ (0, 2),
an output gate), so those checkpoints load exactly (``osdn_jax.convert``).

Recurrent use: ``prefill(x, segment_ids, cache)`` returns the output and a ``MixerCache`` (conv
histories, the fp32 state S and, for OSDN, the preconditioner d); ``step(x [B, hidden], cache)``
advances one token. Both are exact continuations of the parallel forward.

Softmax attention (``osdn_jax.attention.Attention``, a KV cache instead of a state) has the same
API and is registered in ``MIXERS`` as ``attention``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from osdn_jax import ops
from osdn_jax.attention import Attention, AttentionCache, AttentionConfig
from osdn_jax.kernels.config import PRECISIONS
from osdn_jax.layers import Dtype, GatedRMSNorm, RMSNorm, ShortConv, dense, param
from osdn_jax.ops import checks
from osdn_jax.ops.checks import require
from osdn_jax.presets import get_preset


QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")
QK_NORMS = ("l2", "sum")
OUTPUT_GATES = (None, "swish", "sigmoid")


@dataclasses.dataclass(frozen=True)
class DeltaNetConfig:
    """Options of the DeltaNet mixer (sizes come from the model: hidden size and heads)."""

    name: ClassVar[str] = "deltanet"
    conv_size: int = 4  # short convolution kernel
    norm_eps: float = 1e-6  # per-head output RMSNorm
    impl: str = "auto"  # ops path: auto | reference | chunked | pallas
    chunk_size: int = 64
    precision: str | None = None  # kernels' multiply policy: None (by dtype) | tf32 | ieee
    head_k_dim: int | None = None  # query/key head width K; None: hidden_size // num_heads
    head_v_dim: int | None = None  # value head width V; None: K
    short_conv: bool = True  # False: no short conv (the activations act on the projections)
    qk_activation: str = "silu"  # on q and k: silu | relu | elu (elu(x) + 1) | identity; v always SiLU
    qk_norm: str = "l2"  # per-head norm of q and k: l2 (x / sqrt(Σx² + 1e-6)) | sum (x / max(Σ|x|, 1e-6))
    use_beta: bool = True  # False: β ≡ 1 (no b_proj)
    allow_neg_eigval: bool = False  # β = 2·sigmoid(·) ∈ (0, 2): the transition may have negative eigenvalues
    output_gate: str | None = None  # None | swish | sigmoid: o = rms_norm(o) · act(g_proj(x)) per head

    def __post_init__(self):
        require(isinstance(self.conv_size, int) and self.conv_size >= 1, "conv_size", "an int >= 1",
                 self.conv_size)
        for field in ("head_k_dim", "head_v_dim"):
            v = getattr(self, field)
            require(v is None or (isinstance(v, int) and v >= 1), field, "None or an int >= 1", v)
        require(self.qk_activation in QK_ACTIVATIONS, "qk_activation", f"one of {QK_ACTIVATIONS}",
                self.qk_activation)
        require(self.qk_norm in QK_NORMS, "qk_norm", f"one of {QK_NORMS}", self.qk_norm)
        require(self.output_gate in OUTPUT_GATES, "output_gate", f"one of {OUTPUT_GATES}", self.output_gate)
        require(self.norm_eps > 0, "norm_eps", "> 0", self.norm_eps)
        require(self.impl in ops.IMPLS, "impl", f"one of {ops.IMPLS}", self.impl)
        require(self.precision is None or self.precision in PRECISIONS, "precision", f"None or one of {PRECISIONS}",
                self.precision)
        checks.check_chunk_size(self.chunk_size)


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig(DeltaNetConfig):
    """Gated DeltaNet: log decay ``g = -exp(A_log) · softplus(a(x) + dt_bias)``, output gate."""

    name: ClassVar[str] = "gdn"
    output_gate: str | None = "swish"
    a_init_range: tuple[float, float] = (1.0, 16.0)  # A ~ U(range), A_log = log A
    dt_min: float = 0.001  # dt ~ log-uniform [dt_min, dt_max], dt_bias = softplus⁻¹(dt)
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        lo, hi = self.a_init_range
        require(0 < lo <= hi, "a_init_range", "0 < low <= high", self.a_init_range)
        require(0 < self.dt_min <= self.dt_max, "dt_min, dt_max", "0 < dt_min <= dt_max",
                 (self.dt_min, self.dt_max))


@dataclasses.dataclass(frozen=True)
class OSDNConfig(DeltaNetConfig):
    """OSDN: the write key is ``d ⊙ k`` with d learned online (SPEC §2–3).

    ``preset`` ('apr' or 'may', the paper's; 'apr-d1', ours, for short documents) gives η, d0's
    initial value and the clip range; the ``eta``, ``d0_init``, ``d_min``, ``d_max`` fields override
    it when set. ``apf`` adds the forgetting gate
    γ = sigmoid(W_a x + b_a) (W_a = 0, b_a = ``apf_bias_init`` at init); ``beta_aware`` selects the
    β-aware hypergradient.
    """

    name: ClassVar[str] = "osdn"
    preset: str = "apr"
    apf: bool = False
    beta_aware: bool = False
    eta: float | None = None
    d0_init: float | None = None
    d_min: float | None = None
    d_max: float | None = None
    apf_bias_init: float = 6.9

    def __post_init__(self):
        super().__post_init__()
        get_preset(self.preset)  # names the preset on error
        lo, hi = self.clip_range
        require(lo is None or hi is None or lo <= hi, "d_min, d_max", "d_min <= d_max", (lo, hi))
        require(self.step_size >= 0, "eta", ">= 0", self.step_size)

    @property
    def step_size(self) -> float:
        return get_preset(self.preset).eta if self.eta is None else self.eta

    @property
    def initial_d(self) -> float:
        return get_preset(self.preset).d0_init if self.d0_init is None else self.d0_init

    @property
    def clip_range(self) -> tuple[float, float]:
        p = get_preset(self.preset)
        return (p.d_min if self.d_min is None else self.d_min, p.d_max if self.d_max is None else self.d_max)


@dataclasses.dataclass(frozen=True)
class OSGatedDeltaNetConfig(GatedDeltaNetConfig, OSDNConfig):
    """OS-Gated DeltaNet: Gated DeltaNet with the OSDN write key; the β-aware rule by default."""

    name: ClassVar[str] = "os_gdn"
    beta_aware: bool = True


MixerConfig = DeltaNetConfig | AttentionConfig  # every mixer config


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MixerCache:
    """Recurrent state of one mixer: conv histories ``(q, k, v)`` ``[B, W-1, H·K]`` / ``[B, W-1, H·V]``
    (compute dtype; None without a short conv), the state ``S [B, H, K, V]`` (fp32) and, for OSDN
    mixers, ``d [B, H, K]`` (fp32, the value the next token writes with)."""

    conv: tuple[jax.Array, jax.Array, jax.Array] | None
    state: jax.Array
    d: jax.Array | None = None


class DeltaNet(nnx.Module):
    """DeltaNet token mixer; the base of the other three.

    ``DeltaNet(hidden_size, num_heads, config, *, rngs)``; head widths ``config.head_k_dim`` /
    ``head_v_dim`` (default ``hidden_size // num_heads``).
    ``dtype`` is the compute dtype, ``param_dtype`` the parameters' (fp32 by default).
    """

    config_class: ClassVar[type] = DeltaNetConfig
    kv_cache: ClassVar[bool] = False  # a fixed-size recurrent state, whatever the number of tokens

    def __init__(self, hidden_size: int, num_heads: int, config: DeltaNetConfig | None = None, *,
                 rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 init_range: float = 0.02):
        config = self.config_class() if config is None else config
        require(isinstance(config, self.config_class), "config", f"a {self.config_class.__name__}",
                 type(config).__name__)
        require(isinstance(num_heads, int) and num_heads >= 1, "num_heads", "an int >= 1", num_heads)
        if config.head_k_dim is None:
            require(isinstance(hidden_size, int) and hidden_size >= 1 and hidden_size % num_heads == 0,
                    "hidden_size", f"a positive multiple of num_heads={num_heads} (or set head_k_dim)", hidden_size)
        require(isinstance(hidden_size, int) and hidden_size >= 1, "hidden_size", "an int >= 1", hidden_size)
        self.config = config
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_k_dim = config.head_k_dim or hidden_size // num_heads
        self.head_v_dim = config.head_v_dim or self.head_k_dim
        self.head_dim = self.head_k_dim
        self.dtype = dtype
        kw = dict(rngs=rngs, init_range=init_range, dtype=dtype, param_dtype=param_dtype)
        Dk, Dv = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.q_proj = dense(hidden_size, Dk, ("embed", "heads"), **kw)
        self.k_proj = dense(hidden_size, Dk, ("embed", "heads"), **kw)
        self.v_proj = dense(hidden_size, Dv, ("embed", "heads"), **kw)
        if config.short_conv:
            self.q_conv = ShortConv(Dk, config.conv_size, rngs=rngs, param_dtype=param_dtype)
            self.k_conv = ShortConv(Dk, config.conv_size, rngs=rngs, param_dtype=param_dtype)
            self.v_conv = ShortConv(Dv, config.conv_size, rngs=rngs, param_dtype=param_dtype)
        if config.use_beta:
            self.b_proj = dense(hidden_size, num_heads, ("embed", None), **kw)
        self.o_norm = self._make_norm(param_dtype)
        self.o_proj = dense(Dv, hidden_size, ("heads", "embed"), **kw)
        if config.output_gate:
            self.g_proj = dense(hidden_size, Dv, ("embed", "heads"), **kw)
        self._init_extra(kw)

    # -- hooks for the variants ------------------------------------------------------------------

    def _make_norm(self, param_dtype) -> RMSNorm:
        if self.config.output_gate:
            return GatedRMSNorm(self.head_v_dim, eps=self.config.norm_eps, param_dtype=param_dtype, axis_name=None,
                                activation=self.config.output_gate)
        return RMSNorm(self.head_v_dim, eps=self.config.norm_eps, param_dtype=param_dtype, axis_name=None)

    def _init_extra(self, kw: dict) -> None:
        """Variant parameters (gates, d0)."""

    def _gates(self, x: jax.Array) -> dict:
        """Per-token gates for the op from the mixer input ``x [B, T, hidden]`` (fp32 ``[B, T, H]``)."""
        return {}

    def _normalize_output(self, o: jax.Array, x: jax.Array) -> jax.Array:
        if self.config.output_gate:
            B, T, H, V = o.shape
            return self.o_norm(o, self.g_proj(x).reshape(B, T, H, V))
        return self.o_norm(o)

    def _op(self, q, k, v, beta, gates, *, segment_ids, cache, impl):
        """Runs the op; returns ``(o [B, T, H, V], S [B, H, K, V], d or None)``."""
        o, S = ops.delta_rule(q, k, v, beta, log_decay=gates.get("log_decay"), segment_ids=segment_ids,
                              initial_state=None if cache is None else cache.state, output_final_state=True,
                              chunk_size=self.config.chunk_size, impl=impl, precision=self.config.precision)
        return o, S, None

    def _initial_d(self, batch_size: int) -> jax.Array | None:
        return None

    # -- public API ------------------------------------------------------------------------------

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """``x [B, T, hidden]`` → ``[B, T, hidden]``; the state restarts at each document of
        ``segment_ids [B, T]`` (integers; a change of id starts a document)."""
        return self._forward(x, segment_ids, None, self.config.impl)[0]

    def prefill(self, x: jax.Array, segment_ids: jax.Array | None = None,
                cache: MixerCache | None = None) -> tuple[jax.Array, MixerCache]:
        """Like ``__call__`` but also returns the cache after the last token; starts from ``cache``
        when given (which then belongs to the first document of ``segment_ids``)."""
        return self._forward(x, segment_ids, cache, self.config.impl)

    def step(self, x: jax.Array, cache: MixerCache) -> tuple[jax.Array, MixerCache]:
        """One token ``x [B, hidden]`` → ``(y [B, hidden], cache)`` (the token-by-token recurrence)."""
        if not hasattr(x, "ndim") or x.ndim != 2:
            checks.fail("x", f"a rank-2 array [B, hidden={self.hidden_size}] (one token per row)", x)
        y, cache = self._forward(x[:, None], None, cache, "reference")
        return y[:, 0], cache

    def init_cache(self, batch_size: int, max_len: int | None = None) -> MixerCache:
        """The cache at a sequence start: zero conv histories and state (d = d0 for OSDN). ``max_len``
        is ignored (the state's size does not depend on it; attention's KV cache needs it)."""
        W, H, K, V = self.config.conv_size, self.num_heads, self.head_k_dim, self.head_v_dim
        conv = None
        if self.config.short_conv:
            hk, hv = (jnp.zeros((batch_size, W - 1, H * n), self.dtype) for n in (K, V))
            conv = (hk, hk, hv)
        return MixerCache(conv=conv, state=jnp.zeros((batch_size, H, K, V), jnp.float32),
                          d=self._initial_d(batch_size))

    def _inputs(self, x, segment_ids, cache):
        """The op's inputs from ``x [B, T, hidden]`` (compute dtype): the pre-conv projections, ``q, k,
        v [B, T, H, K]``, ``beta [B, T, H]`` (fp32) and the gates."""
        cfg = self.config
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        pre = (self.q_proj(x), self.k_proj(x), self.v_proj(x))  # [B, T, H·K | H·V] before the conv
        q, k, v = pre
        if cfg.short_conv:
            hist = (None, None, None) if cache is None else cache.conv
            q, k, v = (conv(p, segment_ids, history=h) for conv, p, h in zip(self._convs, pre, hist))
        act = _QK_ACTIVATION[cfg.qk_activation]
        q, k = act(q).reshape(B, T, H, K), act(k).reshape(B, T, H, K)
        v = jax.nn.silu(v).reshape(B, T, H, V)
        norm = ops.l2_normalize if cfg.qk_norm == "l2" else _sum_normalize
        q, k = norm(q), norm(k)
        if cfg.use_beta:
            beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        else:
            beta = jnp.ones((B, T, H), jnp.float32)
        if cfg.allow_neg_eigval:
            beta = 2.0 * beta
        return pre, q, k, v, beta, self._gates(x)

    @property
    def _convs(self):
        return (self.q_conv, self.k_conv, self.v_conv)

    def _forward(self, x, segment_ids, cache, impl):
        checks.check_mixer_input(x, self.hidden_size, segment_ids)
        B, T, _ = x.shape
        x = x.astype(self.dtype)
        pre, q, k, v, beta, gates = self._inputs(x, segment_ids, cache)
        o, S, d = self._op(q, k, v, beta, gates, segment_ids=segment_ids, cache=cache, impl=impl)
        o = self._normalize_output(o.astype(self.dtype), x).reshape(B, T, -1)
        new_hist = None
        if self.config.short_conv:
            hist = (None, None, None) if cache is None else cache.conv
            new_hist = tuple(conv.final_history(p, segment_ids, history=h)
                             for conv, p, h in zip(self._convs, pre, hist))
        return self.o_proj(o), MixerCache(conv=new_hist, state=S, d=d)

    def _write_scale(self, k, beta, gates, segment_ids) -> jax.Array | None:
        """The per-token write scale ``d [B, T, H, K]`` (fp32); None means d ≡ 1."""
        return None

    def write_strength(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """``w_t = β_t ⟨d_t, k_t ⊙ k_t⟩`` per token and head, ``[B, T, H]`` fp32, for the mixer input
        ``x [B, T, hidden]`` (d ≡ 1 for DeltaNet and Gated DeltaNet).

        The write at token t scales the residual of its own key by ``1 − w_t``: ``v_t − S_tᵀk_t =
        (1 − w_t)(v_t − S'ᵀk_t)`` with S' the state just before the write (after the decay, for gated
        mixers), so ``(1 − w_t)²`` is the recall residual ratio ``f_t(S_t) / f_t(S')`` (SPEC §6–7).
        """
        checks.check_mixer_input(x, self.hidden_size, segment_ids)
        _, _, k, _, beta, gates = self._inputs(x.astype(self.dtype), segment_ids, None)
        k = k.astype(jnp.float32)
        d = self._write_scale(k, beta, gates, segment_ids)
        return beta * jnp.sum(k * k if d is None else d * k * k, axis=-1)


def _elu_plus_one(x: jax.Array) -> jax.Array:
    return (jax.nn.elu(x.astype(jnp.float32)) + 1.0).astype(x.dtype)


_QK_ACTIVATION = {"silu": jax.nn.silu, "relu": jax.nn.relu, "elu": _elu_plus_one, "identity": lambda x: x}


def _sum_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / max(Σ|x|, eps)`` over the last axis (fp32), in x's dtype: the ``qk_norm='sum'`` option."""
    x32 = x.astype(jnp.float32)
    return (x32 / jnp.maximum(jnp.sum(jnp.abs(x32), axis=-1, keepdims=True), eps)).astype(x.dtype)


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: decay ``S ← exp(g) S`` with ``g = -exp(A_log)·softplus(a(x) + dt_bias)`` and (by
    default) an output gate through a per-head gated RMSNorm."""

    config_class: ClassVar[type] = GatedDeltaNetConfig

    def _init_extra(self, kw: dict) -> None:
        super()._init_extra(kw)
        cfg, H = self.config, self.num_heads
        rngs, param_dtype = kw["rngs"], kw["param_dtype"]
        self.a_proj = dense(self.hidden_size, H, ("embed", None), **kw)
        A = jax.random.uniform(rngs.params(), (H,), jnp.float32, *cfg.a_init_range)
        self.A_log = param(jnp.log(A).astype(param_dtype), (None,))
        u = jax.random.uniform(rngs.params(), (H,), jnp.float32)
        dt = jnp.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = jnp.maximum(dt, cfg.dt_init_floor)
        self.dt_bias = param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype), (None,))  # softplus⁻¹(dt)

    def _gates(self, x: jax.Array) -> dict:
        gates = super()._gates(x)
        a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        gates["log_decay"] = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
        return gates


class _OSDNMixin:
    """The OSDN additions: the learnable ``d0 [H, K]`` and, with APF, ``W_a: Linear(hidden, H, bias)``."""

    def _init_extra(self, kw: dict) -> None:
        super()._init_extra(kw)
        cfg = self.config
        self.d0 = param(jnp.full((self.num_heads, self.head_k_dim), cfg.initial_d, kw["param_dtype"]), (None, None))
        if cfg.apf:
            self.apf_proj = dense(self.hidden_size, self.num_heads, ("embed", None), use_bias=True,
                                  kernel_init=nnx.initializers.zeros_init(),
                                  bias_init=nnx.initializers.constant(cfg.apf_bias_init), **kw)

    def _gates(self, x: jax.Array) -> dict:
        gates = super()._gates(x)
        if self.config.apf:
            gates["log_gamma"] = jax.nn.log_sigmoid(self.apf_proj(x).astype(jnp.float32))
        return gates

    def _op(self, q, k, v, beta, gates, *, segment_ids, cache, impl):
        cfg = self.config
        d_min, d_max = cfg.clip_range
        return ops.osdn(q, k, v, beta, self.d0[...].astype(jnp.float32), eta=cfg.step_size, d_min=d_min,
                        d_max=d_max, log_gamma=gates.get("log_gamma"), beta_aware=cfg.beta_aware,
                        log_decay=gates.get("log_decay"), segment_ids=segment_ids,
                        initial_state=None if cache is None else cache.state,
                        initial_d=None if cache is None else cache.d, output_final_state=True,
                        chunk_size=cfg.chunk_size, impl=impl, precision=cfg.precision)

    def _write_scale(self, k, beta, gates, segment_ids) -> jax.Array:
        cfg = self.config
        d_min, d_max = cfg.clip_range
        d, _ = ops.osdn_preconditioner(k, self.d0[...].astype(jnp.float32), eta=cfg.step_size, d_min=d_min,
                                       d_max=d_max, log_gamma=gates.get("log_gamma"),
                                       beta=beta if cfg.beta_aware else None, segment_ids=segment_ids)
        return d

    def _initial_d(self, batch_size: int) -> jax.Array:
        d0 = self.d0[...].astype(jnp.float32)
        return jnp.broadcast_to(d0, (batch_size, *d0.shape))


class OSDN(_OSDNMixin, DeltaNet):
    """OSDN token mixer (SPEC §5): DeltaNet whose write key is ``d ⊙ k``, d learned online."""

    config_class: ClassVar[type] = OSDNConfig


class OSGatedDeltaNet(_OSDNMixin, GatedDeltaNet):
    """OS-Gated DeltaNet: Gated DeltaNet with the OSDN write key (β-aware rule by default)."""

    config_class: ClassVar[type] = OSGatedDeltaNetConfig


MIXERS: dict[str, type[DeltaNet | Attention]] = {
    "deltanet": DeltaNet,
    "gdn": GatedDeltaNet,
    "osdn": OSDN,
    "os_gdn": OSGatedDeltaNet,
    "attention": Attention,
}
AnyMixerCache = MixerCache | AttentionCache  # one layer's decode cache


def mixer_class(config: MixerConfig) -> type[DeltaNet | Attention]:
    """The mixer module built from ``config`` (matched on the config's exact class)."""
    for cls in MIXERS.values():
        if type(config) is cls.config_class:
            return cls
    raise ValueError(f"mixer: expected one of {[c.config_class.__name__ for c in MIXERS.values()]}, "
                     f"got {type(config).__name__}")


def mixer_config(name: str, **options) -> MixerConfig:
    """The config of the mixer called ``name`` (``deltanet``, ``gdn``, ``osdn``, ``os_gdn``,
    ``attention``)."""
    key = name.replace("-", "_").lower()
    if key not in MIXERS:
        raise ValueError(f"mixer: unknown mixer {name!r}; expected one of {sorted(MIXERS)}")
    return MIXERS[key].config_class(**options)
