"""The causal language model (SPEC §5) and its named presets.

Block: RMSNorm → mixer → residual; RMSNorm → SwiGLU MLP → residual. Embeddings (untied unless
``tie_embeddings``), a final RMSNorm and an LM head. ``attention_layers`` makes a hybrid: those
layers use softmax attention (``attention``'s config) instead of ``mixer``. Parameters are fp32 by
default; ``compute_dtype`` sets the activations. With ``scan_layers`` the blocks of each run of
identical layers are stacked and run as one ``nnx.scan`` (``osdn_jax.layer_stacks``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from osdn_jax.activations import constrain_rows
from osdn_jax.layer_stacks import convert_layout, layer_view, stack_blocks
from osdn_jax.layers import RMSNorm, SwiGLU, annotated, dense, mlp_width
from osdn_jax.mixers import (MIXERS, AnyMixerCache, AttentionConfig, DeltaNetConfig, GatedDeltaNetConfig,
                             MixerConfig, OSDNConfig, OSGatedDeltaNetConfig, mixer_class, mixer_config)
from osdn_jax.ops.checks import require

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A causal LM. ``mixer`` is the token mixer's config; its class picks the mixer."""

    vocab_size: int = 32000
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 8
    mixer: MixerConfig = OSDNConfig()
    mlp_ratio: float = 4.0  # SwiGLU width: 256 · ceil(int(hidden · ratio · 2/3) / 256)
    intermediate_size: int | None = None  # overrides the width rule
    use_mlp: bool = True  # False: blocks are norm → mixer → residual only (Zoology's MQAR models)
    norm_eps: float = 1e-6
    init_range: float = 0.02  # std of the N(0, σ) init of linear and embedding weights
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    max_seq_len: int = 4096  # longest prompt / training row accepted
    remat: bool = False  # rematerialise each block in the backward pass
    # Stack the blocks' parameters and run each group of identical layers as one scan (compiled once
    # per group, not once per layer); False: one module per layer (``osdn_jax.layer_stacks``)
    scan_layers: bool = True
    tie_embeddings: bool = False  # the LM head is the embedding matrix (transposed); no lm_head
    attention_layers: tuple[int, ...] = ()  # hybrid: these layers are softmax attention ...
    attention: AttentionConfig = AttentionConfig()  # ... with this config

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            v = getattr(self, field)
            require(isinstance(v, int) and v >= 1, field, "an int >= 1", v)
        explicit = getattr(self.mixer, "head_k_dim", None) or getattr(self.mixer, "num_heads", None)
        require(explicit or self.hidden_size % self.num_heads == 0, "hidden_size",
                f"a multiple of num_heads={self.num_heads} (or a mixer with head_k_dim)", self.hidden_size)
        require(isinstance(self.mixer, MixerConfig), "mixer", "a mixer config (e.g. OSDNConfig())",
                 self.mixer)
        mixer_class(self.mixer)
        require(self.param_dtype in DTYPES, "param_dtype", f"one of {sorted(DTYPES)}", self.param_dtype)
        require(self.compute_dtype in DTYPES, "compute_dtype", f"one of {sorted(DTYPES)}", self.compute_dtype)
        require(self.intermediate_size is None or self.intermediate_size >= 1, "intermediate_size",
                 "None or an int >= 1", self.intermediate_size)
        layers = tuple(self.attention_layers)
        distinct = len(set(layers)) == len(layers)
        require(all(isinstance(i, int) and 0 <= i < self.num_layers for i in layers) and distinct,
                "attention_layers", f"distinct layer indices in [0, num_layers={self.num_layers})", layers)
        require(isinstance(self.attention, AttentionConfig), "attention", "an AttentionConfig", self.attention)
        require(not layers or not isinstance(self.mixer, AttentionConfig), "attention_layers",
                "() when the mixer is already attention", layers)
        object.__setattr__(self, "attention_layers", tuple(sorted(layers)))

    def layer_mixer(self, index: int) -> MixerConfig:
        """The mixer config of layer ``index``: ``attention`` for the hybrid's attention layers."""
        return self.attention if index in self.attention_layers else self.mixer

    def layer_groups(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` of each run of consecutive layers with the same mixer config: the groups a
        scanned model stacks (one group unless ``attention_layers`` makes a hybrid)."""
        groups, start = [], 0
        for i in range(1, self.num_layers + 1):
            if i == self.num_layers or self.layer_mixer(i) != self.layer_mixer(start):
                groups.append((start, i))
                start = i
        return tuple(groups)

    def to_dict(self) -> dict:
        """A JSON-ready dict; the mixer configs carry their ``name`` (``from_dict`` inverts it)."""
        d = dataclasses.asdict(self)
        d["mixer"] = {"name": self.mixer.name, **d["mixer"]}
        d["attention"] = {"name": self.attention.name, **d["attention"]}
        d["attention_layers"] = list(self.attention_layers)
        return d

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """The config ``to_dict`` wrote. Unknown fields raise a ``ValueError`` naming them."""
        values = dict(values)
        _check_fields(cls, values, "model config: unknown fields")
        for key in ("mixer", "attention"):
            if isinstance(values.get(key), dict):
                values[key] = _mixer_from_dict(values[key], key)
        if "attention_layers" in values:
            values["attention_layers"] = tuple(values["attention_layers"])
        return cls(**values)

    @property
    def mixer_name(self) -> str:
        return self.mixer.name

    @property
    def kv_cache(self) -> bool:
        """Whether decoding keeps every token in some layer (attention's KV cache, at most
        ``max_seq_len``) rather than only fixed-size recurrent states."""
        return any(mixer_class(self.layer_mixer(i)).kv_cache for i in range(self.num_layers))

    @property
    def head_dim(self) -> int:
        """The key head width of the main mixer."""
        return getattr(self.mixer, "head_k_dim", None) or self.hidden_size // self.num_heads

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or mlp_width(self.hidden_size, self.mlp_ratio)


_SIZES = {
    "340m": dict(hidden_size=1024, num_layers=24, num_heads=8),
    "1.3b": dict(hidden_size=2048, num_layers=24, num_heads=16),
}
_MIXER_PREFIX = {"deltanet": DeltaNetConfig, "gdn": GatedDeltaNetConfig, "osdn": OSDNConfig,
                 "os-gdn": OSGatedDeltaNetConfig, "attention": AttentionConfig}

PRESETS: dict[str, ModelConfig] = {
    # Runs in seconds on a CPU; vocab fits the byte-level tokenizer (256 bytes + specials). The CPU
    # presets keep one module per layer: scanning 2 or 6 layers barely shortens the compile and
    # makes a CPU training step 12-19 % (tiny) or 5 % (small) slower (docs/scale.md).
    "tiny": ModelConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=2, compute_dtype="float32",
                        max_seq_len=1024, scan_layers=False),
    # ~20M parameters (byte-level vocab): CPU experiments and benchmarks.
    "small": ModelConfig(vocab_size=512, hidden_size=512, num_layers=6, num_heads=8, compute_dtype="float32",
                         max_seq_len=2048, scan_layers=False),
    **{f"{prefix}-{size}": ModelConfig(mixer=cls(), **dims) for prefix, cls in _MIXER_PREFIX.items()
       for size, dims in _SIZES.items()},
    # The paper's OSDN runs (SPEC §3, §5): the 'apr' preset; the 340M run without APF clipped d to
    # [0, 2], the APF runs and the 1.3B run to [0, 1e9].
    "osdn-340m": ModelConfig(mixer=OSDNConfig(preset="apr", d_max=2.0), **_SIZES["340m"]),
    **{f"osdn-apf-{size}": ModelConfig(mixer=OSDNConfig(preset="apr", apf=True), **dims)
       for size, dims in _SIZES.items()},
}


def _mixer_from_dict(values: dict, where: str) -> MixerConfig:
    values = dict(values)
    name = values.pop("name", None)
    if name is None:
        raise ValueError(f"model config: {where} has no 'name' (deltanet, gdn, osdn, os_gdn, attention)")
    cls = MIXERS.get(name)
    if cls is None:
        raise ValueError(f"model config: {where}.name: unknown mixer {name!r}; expected one of {sorted(MIXERS)}")
    _check_fields(cls.config_class, values, f"model config: {where}: unknown {name} fields")
    return cls.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _check_fields(cls, values: dict, message: str) -> None:
    """Raises ``ValueError(f"{message} [...]; expected some of [...]")`` for keys that are not fields
    of the dataclass ``cls``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{message} {unknown}; expected some of {sorted(fields)}")


def model_config(name: str, *, mixer: str | MixerConfig | None = None, **overrides) -> ModelConfig:
    """The preset ``name`` (``tiny``, ``osdn-340m``, ``deltanet-1.3b``, ...) with ``overrides``.

    ``mixer`` replaces the preset's mixer: a name (``deltanet``, ``gdn``, ``osdn``, ``os_gdn``,
    ``attention``) for its default config, or a config. Unknown preset or field names raise a ``ValueError``.
    """
    if name not in PRESETS:
        raise ValueError(f"preset: unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"overrides: unknown ModelConfig fields {unknown}; expected some of {sorted(fields)}")
    if mixer is not None:
        overrides["mixer"] = mixer_config(mixer) if isinstance(mixer, str) else mixer
    return dataclasses.replace(PRESETS[name], **overrides)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelCache:
    """Decoding state of the whole model: one ``MixerCache`` (recurrent mixers) or
    ``AttentionCache`` (attention, a KV cache allocated for ``max_len`` tokens) per layer. Its size
    does not grow with the number of tokens decoded."""

    layers: tuple[AnyMixerCache, ...]


class Block(nnx.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` (unless
    ``config.use_mlp`` is False)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, mixer: MixerConfig | None = None):
        dtype, pdtype = DTYPES[config.compute_dtype], DTYPES[config.param_dtype]
        mixer = config.mixer if mixer is None else mixer
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.norm_eps, param_dtype=pdtype)
        self.mixer = mixer_class(mixer)(config.hidden_size, config.num_heads, mixer, rngs=rngs,
                                        dtype=dtype, param_dtype=pdtype, init_range=config.init_range)
        if config.use_mlp:
            self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps, param_dtype=pdtype)
            self.mlp = SwiGLU(config.hidden_size, config.mlp_width, rngs=rngs, init_range=config.init_range,
                              dtype=dtype, param_dtype=pdtype)

    def __call__(self, x, segment_ids=None, cache=None, mode="forward"):
        x = constrain_rows(x)
        h = self.mixer_norm(x)
        if mode == "forward":
            h, new_cache = self.mixer(h, segment_ids), None
        elif mode == "prefill":
            h, new_cache = self.mixer.prefill(h, segment_ids, cache)
        else:
            h, new_cache = self.mixer.step(h, cache)
        x = x + constrain_rows(h)
        if hasattr(self, "mlp"):
            x = x + constrain_rows(self.mlp(self.mlp_norm(x)))
        return constrain_rows(x), new_cache


def check_tokens(name: str, tokens, vocab_size: int, rank: int, layout: str) -> None:
    """``tokens`` is an integer array of ``rank``; concrete arrays are also range-checked."""
    if not hasattr(tokens, "ndim") or tokens.ndim != rank or not jnp.issubdtype(tokens.dtype, jnp.integer):
        shape = getattr(tokens, "shape", type(tokens).__name__)
        dtype = getattr(tokens, "dtype", "")
        raise ValueError(f"{name}: expected an integer array {layout}, got {shape} {dtype}".rstrip())
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        host = np.asarray(tokens)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: token id {bad} is out of range [0, vocab_size={vocab_size})")


class CausalLM(nnx.Module):
    """``CausalLM(config, rngs=...)``: ``model(tokens [B, T], segment_ids) -> logits [B, T, vocab]``
    (fp32), plus ``init_cache`` / ``prefill`` / ``decode_step`` for recurrent decoding."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, pdtype = DTYPES[config.compute_dtype], DTYPES[config.param_dtype]
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=pdtype,
                               embedding_init=annotated(nnx.initializers.normal(config.init_range),
                                                        ("vocab", "embed")), rngs=rngs)
        blocks = [Block(config, rngs=rngs, mixer=config.layer_mixer(i)) for i in range(config.num_layers)]
        if config.scan_layers:
            self.stacks = nnx.List([stack_blocks(blocks[a:b]) for a, b in config.layer_groups()])
        else:
            self.blocks = nnx.List(blocks)
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps, param_dtype=pdtype)
        if not config.tie_embeddings:
            self.lm_head = dense(config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs=rngs,
                                 init_range=config.init_range, dtype=dtype, param_dtype=pdtype)

    @classmethod
    def from_params(cls, config: ModelConfig, params: dict) -> "CausalLM":
        """A model of ``config`` holding ``params``: a pure dict of parameters in either layer layout
        (``osdn_jax.layer_stacks``), e.g. ``nnx.to_pure_dict(nnx.state(other_model, nnx.Param))``."""
        graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))), nnx.Param)
        nnx.replace_by_pure_dict(state, convert_layout(params, config))
        return nnx.merge(graphdef, state)

    def head(self, x: jax.Array) -> jax.Array:
        """Logits ``[..., vocab]`` (fp32) of final-normed hidden states ``x [..., hidden]``: the LM head,
        or the embedding matrix transposed when ``tie_embeddings``."""
        if self.config.tie_embeddings:
            return self.embed.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def head_function(self):
        """``(fn, params)``: ``head`` as a pure function ``fn(params, x) -> logits`` of the head's own
        parameters (the embedding when ``tie_embeddings``), for losses that transform it
        (``osdn_jax.loss``); gradients through ``params`` reach this model's parameters."""
        module = self.embed if self.config.tie_embeddings else self.lm_head
        graphdef, params = nnx.split(module)
        call = (lambda m, x: m.attend(x)) if self.config.tie_embeddings else (lambda m, x: m(x))
        return lambda p, x: call(nnx.merge(graphdef, p), x).astype(jnp.float32), params

    def layer(self, index: int) -> Block:
        """Block ``index``: the module itself (unrolled), or a copy of its slice of the stack (scanned:
        reading it is free inside ``jit``; writing to it changes nothing in the model)."""
        if not self.config.scan_layers:
            return self.blocks[index]
        for stack, (start, stop) in zip(self.stacks, self.config.layer_groups()):
            if start <= index < stop:
                return layer_view(stack, index - start)
        raise IndexError(f"layer {index} of a model with {self.config.num_layers} layers")

    def _run(self, tokens, segment_ids, caches, mode, head=True):
        x = constrain_rows(self.embed(tokens))
        new = []
        if mode == "forward" and self.config.scan_layers:
            scan = _SCAN_REMAT if self.config.remat else _SCAN
            for stack in self.stacks:
                x = scan(x, stack, segment_ids)
        else:
            for i in range(self.config.num_layers):
                block = self.layer(i)
                cache = None if caches is None else caches.layers[i]
                if self.config.remat and mode == "forward":
                    x, c = nnx.remat(lambda b, h, s: b(h, s))(block, x, segment_ids)
                else:
                    x, c = block(x, segment_ids, cache, mode)
                new.append(c)
        x = constrain_rows(self.norm(x))
        logits = self.head(x) if head else x
        return logits, (None if mode == "forward" else ModelCache(tuple(new)))

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """``tokens [B, T]`` (integers) → logits ``[B, T, vocab]`` fp32. ``segment_ids [B, T]``: packed
        documents; every state (S, d, conv) restarts where the id changes."""
        check_tokens("tokens", tokens, self.config.vocab_size, 2, "[B, T]")
        return self._run(tokens, segment_ids, None, "forward")[0]

    def features(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """The final-normed hidden states ``[B, T, hidden]`` (compute dtype) that the LM head reads:
        ``model(tokens) == model.head(model.features(tokens))``. Lets a loss that scores a few
        positions gather them before the vocabulary-sized head."""
        check_tokens("tokens", tokens, self.config.vocab_size, 2, "[B, T]")
        return self._run(tokens, segment_ids, None, "forward", head=False)[0]

    def init_cache(self, batch_size: int, max_len: int | None = None) -> ModelCache:
        """The empty decoding cache for ``batch_size`` rows and up to ``max_len`` tokens (prompt and
        generated; default ``config.max_seq_len``, at most that). Attention layers allocate a KV cache
        ``[B, max_len, H, K]``; recurrent layers ignore ``max_len`` (their state has a fixed size)."""
        require(isinstance(batch_size, int) and batch_size >= 1, "batch_size", "an int >= 1", batch_size)
        max_len = self.config.max_seq_len if max_len is None else max_len
        require(isinstance(max_len, int) and 1 <= max_len <= self.config.max_seq_len, "max_len",
                 f"1 <= max_len <= max_seq_len={self.config.max_seq_len}", max_len)
        return ModelCache(tuple(self.layer(i).mixer.init_cache(batch_size, max_len)
                                for i in range(self.config.num_layers)))

    def prefill(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                cache: ModelCache | None = None) -> tuple[jax.Array, ModelCache]:
        """Parallel (chunked / kernel) pass over a prompt ``tokens [B, T]``: ``(logits [B, T, vocab],
        cache)`` with the final S, d and conv states (attention: the KV cache). Continues from ``cache``
        when given; without one, attention layers start from ``init_cache(B)`` (``max_seq_len`` slots)."""
        check_tokens("tokens", tokens, self.config.vocab_size, 2, "[B, T]")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"tokens: the prompt has {tokens.shape[1]} tokens, more than max_seq_len="
                             f"{self.config.max_seq_len}")
        if cache is None and self.config.kv_cache:
            cache = self.init_cache(tokens.shape[0])
        return self._run(tokens, segment_ids, cache, "prefill")

    def decode_step(self, token: jax.Array, cache: ModelCache) -> tuple[jax.Array, ModelCache]:
        """One token per row ``token [B]`` → ``(logits [B, vocab], cache)``."""
        check_tokens("token", token, self.config.vocab_size, 1, "[B]")
        logits, cache = self._run(token, None, cache, "step")
        return logits, cache


def _apply_block(x, block, segment_ids):
    return block(x, segment_ids)[0]


# x [B, T, hidden] through a stack of blocks: one traced block, scanned over the stacked layer axis
_SCAN = nnx.scan(_apply_block, in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
_SCAN_REMAT = nnx.scan(nnx.remat(_apply_block), in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)


def count_params(config: ModelConfig) -> int:
    """Number of parameters of ``CausalLM(config)``, computed abstractly (nothing is allocated)."""
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = ["PRESETS", "Block", "CausalLM", "ModelCache", "ModelConfig", "MIXERS", "count_params", "model_config"]
