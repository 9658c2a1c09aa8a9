"""flash-linear-attention (fla) ``config.json`` ⇄ ``ModelConfig``.

fla 0.6.0's ``DeltaNetConfig`` (``model_type`` ``delta_net``) and ``GatedDeltaNetConfig``
(``gated_deltanet``) map field by field onto our model; every field that changes the math is
checked, and a value we cannot reproduce exactly is refused with a ``ValueError`` that names the
field and the value. Our OSDN models export as ``osdn_jax_osdn`` (DeltaNet fields) and
``osdn_jax_os_gdn`` (Gated DeltaNet fields), with the OSDN options under ``osdn_*`` keys; the names
differ from the OSDN authors' fork of fla (``osla_delta_net``, ``os_gated_deltanet``), whose
``osgm_*`` options are a different format (refused, by name).
"""

from __future__ import annotations

import dataclasses
import math

from osdn_jax.attention import AttentionConfig
from osdn_jax.mixers import DeltaNetConfig, GatedDeltaNetConfig, OSDNConfig, OSGatedDeltaNetConfig
from osdn_jax.layers import mlp_width
from osdn_jax.model import ModelConfig
from osdn_jax.presets import get_preset

# model_type → (our mixer config class, the fla architecture name written on export)
MODEL_TYPES = {
    "delta_net": (DeltaNetConfig, "DeltaNetForCausalLM"),
    "gated_deltanet": (GatedDeltaNetConfig, "GatedDeltaNetForCausalLM"),
    "osdn_jax_osdn": (OSDNConfig, "OSDNForCausalLM"),
    "osdn_jax_os_gdn": (OSGatedDeltaNetConfig, "OSGatedDeltaNetForCausalLM"),
}
GATED = ("gated_deltanet", "osdn_jax_os_gdn")
OSDN_TYPES = ("osdn_jax_osdn", "osdn_jax_os_gdn")
# The OSDN authors' fork of fla writes these, with its own ``osgm_*`` options: not mapped here.
AUTHORS_FORK = ("osla_delta_net", "os_gated_deltanet")

# Fields that cannot change the logits: transformers' bookkeeping, token ids, training-only switches
# (fused kernels, the loss, caching) and fla's kernel choice.
HARMLESS = {
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache",
    "fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp", "attn_mode",
    "max_position_embeddings", "initializer_range", "keys_to_ignore_at_inference", "auto_map",
    "output_hidden_states", "output_attentions", "return_dict", "torchscript", "use_return_dict",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "pruned_heads", "cross_attention_hidden_size", "tf_legacy_loss", "use_bfloat16", "output_scores",
    "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id", "quantization_config",
}
# Every field that changes the math, per model type, with the value fla assumes when it is absent.
_COMMON = {
    "hidden_size": 2048, "num_hidden_layers": 24, "vocab_size": 32000, "norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_ratio": 4, "intermediate_size": None, "hidden_act": "swish",
    "use_short_conv": True, "conv_size": 4, "allow_neg_eigval": False, "use_gate": False, "attn": None,
    "attnres_block_size": None,
}
FIELDS = {
    "delta_net": {**_COMMON, "num_heads": 16, "expand_k": 1.0, "expand_v": 1.0, "use_beta": True,
                  "use_output_norm": True, "qk_norm": "l2", "qk_activation": "silu"},
    "gated_deltanet": {**_COMMON, "num_hidden_layers": 21, "num_heads": 6, "head_dim": 256, "expand_v": 2.0,
                       "num_v_heads": None, "use_gate": True, "output_gate_activation": "swish"},
}
FIELDS["osdn_jax_osdn"] = FIELDS["delta_net"]
FIELDS["osdn_jax_os_gdn"] = FIELDS["gated_deltanet"]
OSDN_FIELDS = {"osdn_preset": "apr", "osdn_eta": None, "osdn_d0_init": None, "osdn_d_min": None, "osdn_d_max": None,
               "osdn_apf": False, "osdn_beta_aware": None, "osdn_apf_bias_init": 6.9}


def _refuse(field: str, value, expected: str, where: str) -> None:
    raise ValueError(f"{where}: field {field!r} = {value!r} is not supported; expected {expected}")


def _integer(x: float, field: str, value, where: str) -> int:
    if not math.isclose(x, round(x), rel_tol=0, abs_tol=1e-6) or round(x) < 1:
        _refuse(field, value, "a value giving a positive integer width", where)
    return int(round(x))


def _attention(spec, num_layers: int, hidden: int, where: str) -> tuple[tuple[int, ...], AttentionConfig | None]:
    """fla's ``attn`` (one spec or a list of them) → our hybrid's layers and one AttentionConfig."""
    if spec is None:
        return (), None
    specs = [spec] if isinstance(spec, dict) else spec
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs) or not specs:
        _refuse("attn", spec, "null, a dict or a list of dicts", where)
    layers: list[int] = []
    configs = set()
    for s in specs:
        unknown = sorted(set(s) - {"layers", "num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta"})
        if unknown:
            _refuse(f"attn.{unknown[0]}", s[unknown[0]], "one of fla's attention fields (layers, num_heads, "
                    "num_kv_heads, qkv_bias, window_size, rope_theta)", where)
        if s.get("window_size") is not None:
            _refuse("attn.window_size", s["window_size"], "null (sliding-window attention is not implemented here)",
                    where)
        heads = s.get("num_heads")
        if not isinstance(heads, int) or heads < 1 or hidden % (2 * heads):
            _refuse("attn.num_heads", heads, f"an int dividing hidden_size={hidden} into even head widths", where)
        kv = s.get("num_kv_heads") or heads
        if heads % kv:
            _refuse("attn.num_kv_heads", kv, f"a divisor of attn.num_heads={heads}", where)
        configs.add((heads, kv, bool(s.get("qkv_bias", False)), float(s.get("rope_theta", 10000.0))))
        layers += list(s.get("layers", []))
    if len(configs) > 1:
        _refuse("attn", spec, "one attention setting for all attention layers (a hybrid here has one)", where)
    if sorted(set(layers)) != sorted(layers) or any(not isinstance(i, int) or not 0 <= i < num_layers for i in layers):
        _refuse("attn.layers", layers, f"distinct layer indices in [0, num_hidden_layers={num_layers})", where)
    heads, kv, bias, theta = configs.pop()
    return tuple(sorted(layers)), AttentionConfig(num_heads=heads, num_kv_heads=None if kv == heads else kv,
                                                  qkv_bias=bias, rope_theta=theta)


def model_config_from_fla(fla: dict, *, where: str = "config.json", as_osdn: bool = False,
                          ignore_fields: tuple[str, ...] = (), **overrides) -> ModelConfig:
    """The ``ModelConfig`` of an fla ``config.json`` (a dict). ``as_osdn`` upcycles: DeltaNet → OSDN, Gated
    DeltaNet → OS-Gated DeltaNet, with ``d0 = 1``, the ``may`` preset and the plain (not β-aware)
    hypergradient: exactly the source model at the start (SPEC §3). ``overrides`` set ModelConfig fields
    (``compute_dtype``, ``param_dtype``, ``max_seq_len``, ...). ``ignore_fields`` names unknown fields the
    caller vouches for (e.g. one an older fla version wrote that does not change the math); a known field
    cannot be ignored."""
    model_type = fla.get("model_type")
    if model_type in AUTHORS_FORK:
        raise ValueError(f"{where}: field 'model_type' = {model_type!r} is the OSDN authors' fork of fla, whose "
                         "osgm_* options and layer code are not mapped here (only our own export, model_type "
                         "'osdn_jax_osdn' / 'osdn_jax_os_gdn', and fla's delta_net / gated_deltanet load)")
    if model_type not in MODEL_TYPES:
        _refuse("model_type", model_type, f"one of {sorted(MODEL_TYPES)}", where)
    defaults = FIELDS[model_type]
    osdn_fields = OSDN_FIELDS if model_type in OSDN_TYPES else {}
    known = set(defaults) | set(osdn_fields) | HARMLESS
    if set(ignore_fields) & known:
        raise ValueError(f"ignore_fields: {sorted(set(ignore_fields) & known)} are known fields (they are read, not "
                         "ignorable)")
    unknown = sorted(set(fla) - known - set(ignore_fields))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} = {fla[unknown[0]]!r} for model_type "
                         f"{model_type!r}: it may change the math, so it is refused (known fields: "
                         f"{sorted(defaults)}; if you know it does not, name it in ignore_fields / "
                         f"--ignore-field)")
    f = {**defaults, **osdn_fields, **{k: v for k, v in fla.items() if k in defaults or k in osdn_fields}}
    hidden, heads, layers = f["hidden_size"], f["num_heads"], f["num_hidden_layers"]
    for name in ("hidden_size", "num_heads", "num_hidden_layers", "vocab_size"):
        if not isinstance(f[name], int) or f[name] < 1:
            _refuse(name, f[name], "an int >= 1", where)
    if f["attnres_block_size"] is not None:
        _refuse("attnres_block_size", f["attnres_block_size"], "null (attention residuals are not implemented here)",
                where)
    if f["hidden_act"] != "swish":
        _refuse("hidden_act", f["hidden_act"], "'swish' (SwiGLU MLP)", where)
    if f["use_gate"] not in (True, False):
        _refuse("use_gate", f["use_gate"], "true or false", where)
    if f["use_short_conv"] and (not isinstance(f["conv_size"], int) or f["conv_size"] < 1):
        _refuse("conv_size", f["conv_size"], "an int >= 1", where)
    intermediate = f["intermediate_size"]
    if intermediate is None:  # fla's GatedMLP rule
        ratio = 4 if f["hidden_ratio"] is None else f["hidden_ratio"]
        intermediate = int(hidden * ratio * 2 / 3)
        intermediate = 256 * ((intermediate + 256 - 1) // 256)
    mixer: dict = dict(norm_eps=float(f["norm_eps"]), short_conv=bool(f["use_short_conv"]),
                       allow_neg_eigval=bool(f["allow_neg_eigval"]))
    if f["use_short_conv"]:
        mixer["conv_size"] = f["conv_size"]
    if model_type in GATED:
        if f["num_v_heads"] not in (None, heads):
            _refuse("num_v_heads", f["num_v_heads"], f"null or num_heads={heads} (grouped value heads are not "
                    "implemented here)", where)
        if not isinstance(f["head_dim"], int) or f["head_dim"] < 1:
            _refuse("head_dim", f["head_dim"], "an int >= 1", where)
        mixer["head_k_dim"] = f["head_dim"]
        mixer["head_v_dim"] = _integer(f["head_dim"] * f["expand_v"], "expand_v", f["expand_v"], where)
        gate = f["output_gate_activation"]
        if gate not in ("swish", "silu", "sigmoid"):
            _refuse("output_gate_activation", gate, "'swish', 'silu' or 'sigmoid'", where)
        mixer["output_gate"] = ("sigmoid" if gate == "sigmoid" else "swish") if f["use_gate"] else None
    else:
        key_dim = _integer(hidden * f["expand_k"], "expand_k", f["expand_k"], where)
        value_dim = _integer(hidden * f["expand_v"], "expand_v", f["expand_v"], where)
        if key_dim % heads:
            _refuse("expand_k", f["expand_k"], f"a key width hidden_size·expand_k divisible by num_heads={heads}",
                    where)
        if value_dim % heads:
            _refuse("expand_v", f["expand_v"], f"a value width hidden_size·expand_v divisible by num_heads={heads}",
                    where)
        mixer["head_k_dim"], mixer["head_v_dim"] = key_dim // heads, value_dim // heads
        if f["qk_activation"] not in ("silu", "relu", "elu", "identity"):
            _refuse("qk_activation", f["qk_activation"], "'silu', 'relu', 'elu' or 'identity'", where)
        if f["qk_norm"] not in ("l2", "sum"):
            _refuse("qk_norm", f["qk_norm"], "'l2' or 'sum'", where)
        mixer.update(qk_activation=f["qk_activation"], qk_norm=f["qk_norm"], use_beta=bool(f["use_beta"]),
                     output_gate="swish" if f["use_gate"] else None)
    cls = MODEL_TYPES[model_type][0]
    if model_type in OSDN_TYPES:
        mixer.update(preset=f["osdn_preset"], eta=f["osdn_eta"], d0_init=f["osdn_d0_init"], d_min=f["osdn_d_min"],
                     d_max=f["osdn_d_max"], apf=bool(f["osdn_apf"]), apf_bias_init=float(f["osdn_apf_bias_init"]))
        if f["osdn_beta_aware"] is not None:
            mixer["beta_aware"] = bool(f["osdn_beta_aware"])
    if as_osdn:
        if model_type in OSDN_TYPES:
            raise ValueError(f"{where}: --as osdn upcycles DeltaNet / Gated DeltaNet; this is already {model_type!r}")
        if mixer.get("qk_norm", "l2") != "l2":
            _refuse("qk_norm", mixer["qk_norm"], "'l2' to upcycle to OSDN (d stays 1 only for unit keys)", where)
        cls = OSGatedDeltaNetConfig if model_type in GATED else OSDNConfig
        # d ≡ 1 is the fixed point of the plain rule only (the β-aware one moves d towards ⟨d,k²⟩ = 1/β)
        mixer.update(preset="may", d0_init=1.0, beta_aware=False)
    attention_layers, attention = _attention(f["attn"], layers, hidden, where)
    try:
        mixer_cfg = cls(**mixer)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    model = dict(vocab_size=f["vocab_size"], hidden_size=hidden, num_layers=layers, num_heads=heads,
                 mixer=mixer_cfg, intermediate_size=intermediate, norm_eps=float(f["norm_eps"]),
                 tie_embeddings=bool(f["tie_word_embeddings"]), init_range=float(fla.get("initializer_range", 0.02)),
                 max_seq_len=int(fla.get("max_position_embeddings", 2048)), compute_dtype="float32")
    if attention is not None:
        if len(attention_layers) == layers:  # every layer is attention: a Transformer
            model["mixer"] = attention
        else:
            model.update(attention_layers=attention_layers, attention=attention)
    model.update(overrides)
    return _canonical(ModelConfig(**model))


def _canonical(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the fields that equal their defaults written as defaults (None), so that an
    exported and re-imported config compares equal to the original."""
    mixer = cfg.mixer
    if isinstance(mixer, DeltaNetConfig):
        changes = {}
        default_k = cfg.hidden_size // cfg.num_heads if cfg.hidden_size % cfg.num_heads == 0 else None
        k = mixer.head_k_dim
        if k == default_k:
            changes["head_k_dim"] = None
        if mixer.head_v_dim == k:
            changes["head_v_dim"] = None
        if isinstance(mixer, OSDNConfig):
            preset = get_preset(mixer.preset)
            for field, value in (("eta", preset.eta), ("d0_init", preset.d0_init), ("d_min", preset.d_min),
                                 ("d_max", preset.d_max)):
                if getattr(mixer, field) == value:
                    changes[field] = None
        mixer = dataclasses.replace(mixer, **changes)
    attention = cfg.attention
    if attention.num_heads == cfg.num_heads:
        attention = dataclasses.replace(attention, num_heads=None)
    if isinstance(mixer, AttentionConfig) and mixer.num_heads == cfg.num_heads:
        mixer = dataclasses.replace(mixer, num_heads=None)
    intermediate = None if cfg.intermediate_size == mlp_width(cfg.hidden_size, cfg.mlp_ratio) else \
        cfg.intermediate_size
    return dataclasses.replace(cfg, mixer=mixer, attention=attention, intermediate_size=intermediate)


def model_type_of(cfg: ModelConfig) -> str:
    """The fla ``model_type`` our export writes for ``cfg``."""
    mixer = cfg.mixer
    if isinstance(mixer, AttentionConfig):
        return "delta_net"  # a Transformer: every layer in ``attn``
    return {DeltaNetConfig: "delta_net", GatedDeltaNetConfig: "gated_deltanet", OSDNConfig: "osdn_jax_osdn",
            OSGatedDeltaNetConfig: "osdn_jax_os_gdn"}[type(mixer)]


def fla_config_from_model(cfg: ModelConfig, *, dtype: str = "float32", as_deltanet: bool = False,
                          token_ids: dict | None = None) -> dict:
    """The fla ``config.json`` dict of ``cfg``. Raises a ``ValueError`` naming the field for what
    fla cannot express (no MLP, a short conv in attention layers, ...). ``as_deltanet`` writes an
    OSDN config as its DeltaNet / Gated DeltaNet source (the caller checks that this is exact)."""
    where = "model config"
    if not cfg.use_mlp:
        _refuse("use_mlp", False, "true (fla blocks always have an MLP)", where)
    for attn in ([cfg.attention] if cfg.attention_layers else []) + \
            ([cfg.mixer] if isinstance(cfg.mixer, AttentionConfig) else []):
        if attn.conv_size:
            _refuse("attention.conv_size", attn.conv_size, "0 (fla's attention has no short conv)", where)
    model_type = model_type_of(cfg)
    if as_deltanet:
        model_type = {"osdn_jax_osdn": "delta_net", "osdn_jax_os_gdn": "gated_deltanet"}.get(model_type, model_type)
    out = {"model_type": model_type, "architectures": [MODEL_TYPES[model_type][1]],
           "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_heads": cfg.num_heads,
           "vocab_size": cfg.vocab_size, "norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
           "intermediate_size": cfg.mlp_width, "hidden_ratio": None, "hidden_act": "swish",
           "initializer_range": cfg.init_range, "max_position_embeddings": cfg.max_seq_len,
           "attnres_block_size": None, "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True,
           "use_cache": True, "torch_dtype": dtype, "dtype": dtype, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": None}
    out.update(token_ids or {})
    attention_layers, attention = cfg.attention_layers, cfg.attention
    mixer = cfg.mixer
    if isinstance(mixer, AttentionConfig):  # a Transformer: DeltaNet's fields at their defaults
        attention_layers, attention, mixer = tuple(range(cfg.num_layers)), mixer, DeltaNetConfig()
    if attention_layers:
        out["attn"] = {"layers": list(attention_layers), "num_heads": attention.num_heads or cfg.num_heads,
                       "num_kv_heads": attention.num_kv_heads or attention.num_heads or cfg.num_heads,
                       "qkv_bias": attention.qkv_bias, "window_size": None, "rope_theta": attention.rope_theta}
    else:
        out["attn"] = None
    if mixer.norm_eps != cfg.norm_eps and not isinstance(cfg.mixer, AttentionConfig):
        _refuse("mixer.norm_eps", mixer.norm_eps, f"norm_eps={cfg.norm_eps} (fla has one norm_eps)", where)
    k = mixer.head_k_dim or cfg.hidden_size // cfg.num_heads
    v = mixer.head_v_dim or k
    out.update(use_short_conv=mixer.short_conv, conv_size=mixer.conv_size, allow_neg_eigval=mixer.allow_neg_eigval,
               use_gate=mixer.output_gate is not None)
    if model_type in GATED:
        for field, value, fixed in (("qk_activation", mixer.qk_activation, "silu"), ("qk_norm", mixer.qk_norm, "l2"),
                                    ("use_beta", mixer.use_beta, True)):
            if value != fixed:
                _refuse(f"mixer.{field}", value, f"{fixed!r} (fla's Gated DeltaNet has no such option)", where)
        out.update(head_dim=k, expand_v=v / k, num_v_heads=None,
                   output_gate_activation=mixer.output_gate or "swish")
    else:
        out.update(expand_k=cfg.num_heads * k / cfg.hidden_size, expand_v=cfg.num_heads * v / cfg.hidden_size,
                   qk_activation=mixer.qk_activation, qk_norm=mixer.qk_norm, use_beta=mixer.use_beta,
                   use_output_norm=True)
        if mixer.output_gate not in (None, "swish"):
            _refuse("mixer.output_gate", mixer.output_gate, "None or 'swish' (fla's DeltaNet gate is SiLU)", where)
    if model_type in OSDN_TYPES:
        lo, hi = mixer.clip_range
        out.update(osdn_preset=mixer.preset, osdn_eta=mixer.step_size, osdn_d0_init=mixer.initial_d, osdn_d_min=lo,
                   osdn_d_max=hi, osdn_apf=mixer.apf, osdn_beta_aware=mixer.beta_aware,
                   osdn_apf_bias_init=mixer.apf_bias_init)
    return out


def osdn_is_deltanet(cfg: ModelConfig, d0) -> str | None:
    """Why an OSDN model is *not* exactly its DeltaNet / Gated DeltaNet source (None if it is):
    d stays 1 when d0 ≡ 1, there is no APF, the hypergradient is the plain one and 1 lies in the
    clip range, for unit (L2) keys."""
    mixer = cfg.mixer
    if not isinstance(mixer, OSDNConfig):
        return f"the mixer is {mixer.name!r}, not an OSDN mixer"
    lo, hi = mixer.clip_range
    if mixer.apf:
        return "APF is on (γ < 1 moves d away from 1)"
    if mixer.beta_aware:
        return "the β-aware hypergradient moves d away from 1 (its fixed point is ⟨d, k²⟩ = 1/β)"
    if not lo <= 1.0 <= hi:
        return f"the clip range [{lo}, {hi}] excludes 1"
    if mixer.qk_norm != "l2":
        return f"qk_norm is {mixer.qk_norm!r} (keys are not unit vectors)"
    for i, d in enumerate(d0):
        if d is not None and not bool((d == 1.0).all()):
            return f"layer {i}: d0 is not all ones"
    return None
