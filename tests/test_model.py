"""The causal LM: presets and parameter counts, recurrent decoding == parallel forward, packed
documents, dtype policy, remat, sharding annotations, errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osdn_jax import CausalLM, OSDNConfig, OSGatedDeltaNetConfig, count_params, mixer_config, model_config
from osdn_jax.model import PRESETS, ModelConfig

MIXER_CASES = {
    "deltanet": mixer_config("deltanet"),
    "gdn": mixer_config("gdn"),
    "osdn": OSDNConfig(),
    "osdn_apf_may": OSDNConfig(preset="may", apf=True),
    "os_gdn": OSGatedDeltaNetConfig(apf=True),
    "attention": mixer_config("attention"),  # a KV cache of max_seq_len slots
}
LOGICAL_AXES = {None, "embed", "heads", "mlp", "vocab"}


def _tiny(mixer, **overrides):
    return CausalLM(model_config("tiny", mixer=mixer, **overrides), rngs=nnx.Rngs(0))


def _tokens(B, T, vocab=512, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, vocab)


@pytest.mark.parametrize("name, expected", [("osdn-340m", 374e6), ("deltanet-1.3b", 1.366e9)])
def test_parameter_counts_match_the_authors(name, expected):
    n = count_params(model_config(name))
    assert abs(n - expected) / expected < 2e-3, n


def test_every_preset_builds_abstractly():
    counts = {name: count_params(cfg) for name, cfg in PRESETS.items()}
    assert counts["gdn-340m"] > counts["osdn-340m"] > counts["deltanet-340m"]
    assert counts["osdn-340m"] - counts["deltanet-340m"] == 24 * 8 * 128  # only d0 [H, K] per layer
    assert counts["tiny"] < 1e6


def test_paper_presets_carry_the_paper_clip_and_apf():
    assert model_config("osdn-340m").mixer.clip_range == (0.0, 2.0)  # the 340M run without APF
    assert not model_config("osdn-340m").mixer.apf
    for name in ("osdn-1.3b", "osdn-apf-340m", "osdn-apf-1.3b"):
        mixer = model_config(name).mixer
        assert mixer.clip_range == (0.0, 1e9) and mixer.step_size == 1.0 and mixer.initial_d == 0.0
        assert mixer.apf == ("apf" in name)


def test_the_short_document_preset_is_one_flag_of_a_training_run():
    """``--model.osdn-preset apr-d1``: apr's step size and clip, d0 = 1 in every layer's parameter."""
    from osdn_jax.train.config import ModelSettings

    cfg = ModelSettings(mixer="osdn", osdn_preset="apr-d1", hidden_size=32, num_heads=2).build(64, 32)
    assert (cfg.mixer.step_size, cfg.mixer.initial_d, cfg.mixer.clip_range) == (1.0, 1.0, (0.0, 1e9))
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    assert all(float(model.layer(i).mixer.d0[...].min()) == 1.0 for i in range(cfg.num_layers))


def test_features_feed_the_head_and_use_mlp_false_drops_the_mlp():
    model = _tiny("osdn")
    tokens = _tokens(2, 16)
    np.testing.assert_allclose(model.head(model.features(tokens)), model(tokens), rtol=1e-6, atol=1e-6)
    bare = _tiny("deltanet", use_mlp=False)
    assert not hasattr(bare.layer(0), "mlp")
    assert count_params(model_config("tiny", mixer="deltanet", use_mlp=False)) < count_params(
        model_config("tiny", mixer="deltanet"))
    assert bare(tokens).shape == (2, 16, 512)


@pytest.mark.parametrize("name", sorted(MIXER_CASES))
def test_decoding_reproduces_the_parallel_forward(name):
    """SPEC §7.6: prefill of odd length, then token-by-token steps == one parallel pass (fp32)."""
    model = _tiny(MIXER_CASES[name])
    tokens = _tokens(2, 29)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    prefill = nnx.jit(lambda m, t: m.prefill(t))
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    logits, cache = prefill(model, tokens[:, :13])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :13]), rtol=1e-5, atol=1e-5)
    steps = []
    for t in range(13, 29):
        lg, cache = step(model, tokens[:, t], cache)
        steps.append(lg)
    np.testing.assert_allclose(np.asarray(jnp.stack(steps, 1)), np.asarray(full[:, 13:]), rtol=1e-5, atol=1e-5)
    # from an empty cache, one token at a time
    cache = model.init_cache(2)
    lg, cache = step(model, tokens[:, 0], cache)
    lg2, _ = step(model, tokens[:, 1], cache)
    np.testing.assert_allclose(np.asarray(jnp.stack([lg, lg2], 1)), np.asarray(full[:, :2]), rtol=1e-5, atol=1e-5)


def test_cache_size_is_constant():
    model = _tiny("osdn")
    cache = model.init_cache(3)
    _, after = nnx.jit(lambda m, t, c: m.decode_step(t, c))(model, jnp.zeros((3,), jnp.int32), cache)
    shapes = jax.tree.map(lambda a: a.shape, cache)
    assert jax.tree.map(lambda a: a.shape, after) == shapes
    _, prefilled = model.prefill(_tokens(3, 40))
    assert jax.tree.map(lambda a: a.shape, prefilled) == shapes


def test_packed_documents_reset_every_state():
    model = _tiny("os_gdn")
    tokens = _tokens(1, 40)
    seg = jnp.concatenate([jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 23), jnp.int32)], axis=1)
    packed = model(tokens, seg)
    np.testing.assert_allclose(np.asarray(packed[:, 17:]), np.asarray(model(tokens[:, 17:])), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed[:, :17]), np.asarray(model(tokens[:, :17])), rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_logits():
    model = _tiny("osdn", compute_dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tokens = _tokens(2, 33)
    logits = model(tokens)
    assert logits.dtype == jnp.float32
    ref = _tiny("osdn")(tokens)
    rel = float(jnp.sqrt(jnp.mean((logits - ref) ** 2) / jnp.mean(ref**2)))
    assert rel < 3e-2, rel
    grads = nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_remat_gives_the_same_gradients():
    tokens = _tokens(2, 20)

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(tokens)) ** 2)

    g_plain = nnx.grad(loss)(_tiny("osdn"))
    g_remat = nnx.jit(nnx.grad(loss))(_tiny("osdn", remat=True))
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_parameters_carry_logical_axis_names_and_shard_on_a_mesh():
    model = _tiny("os_gdn")
    params = nnx.state(model, nnx.Param)
    for path, var in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, jax.tree_util.keystr(path)
        assert set(names) <= LOGICAL_AXES, (jax.tree_util.keystr(path), names)
    assert model.embed.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
    assert model.lm_head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")

    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    rules = (("embed", "fsdp"), ("heads", None), ("mlp", None), ("vocab", None))
    with jax.sharding.use_mesh(mesh) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(mesh), \
            nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(params)
        shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
        placed = jax.device_put(nnx.to_pure_dict(params), nnx.to_pure_dict(shardings))
    graphdef, _ = nnx.split(model)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, {**nnx.to_pure_dict(state), **placed})
    logits = nnx.merge(graphdef, state)(_tokens(1, 8))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(_tokens(1, 8))), rtol=1e-6)


def test_errors_name_the_value():
    model = _tiny("osdn")
    with pytest.raises(ValueError, match=r"tokens: token id 512 is out of range \[0, vocab_size=512\)"):
        model(jnp.array([[1, 512]]))
    with pytest.raises(ValueError, match="tokens: token id -1"):
        model(jnp.array([[-1, 2]]))
    with pytest.raises(ValueError, match=r"tokens: expected an integer array \[B, T\]"):
        model(jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="more than max_seq_len=1024"):
        model.prefill(jnp.zeros((1, 1025), jnp.int32))
    with pytest.raises(ValueError, match="preset: unknown model preset 'osdn-7b'"):
        model_config("osdn-7b")
    with pytest.raises(ValueError, match="mixer: unknown mixer 'mamba'"):
        model_config("tiny", mixer="mamba")
    with pytest.raises(ValueError, match=r"overrides: unknown ModelConfig fields \['hidden'\]"):
        model_config("tiny", hidden=3)
    with pytest.raises(ValueError, match="hidden_size: expected a multiple of num_heads=3"):
        model_config("tiny", num_heads=3)
    with pytest.raises(ValueError, match="compute_dtype"):
        model_config("tiny", compute_dtype="fp8")
    with pytest.raises(ValueError, match="mixer: expected a mixer config"):
        dataclasses.replace(model_config("tiny"), mixer="osdn")


def test_config_dict_round_trip_and_errors():
    from osdn_jax.attention import AttentionConfig
    from osdn_jax.mixers import GatedDeltaNetConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, tie_embeddings=True,
                      mixer=GatedDeltaNetConfig(head_k_dim=8, head_v_dim=24, output_gate="sigmoid", short_conv=False),
                      attention_layers=(2, 0), attention=AttentionConfig(num_heads=4, num_kv_heads=2, qkv_bias=True))
    assert cfg.attention_layers == (0, 2) and cfg.layer_mixer(0) == cfg.attention and cfg.layer_mixer(1) == cfg.mixer
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(model, "lm_head") and model.config.kv_cache
    assert model.layer(0).mixer.k_proj.kernel.shape == (32, 16)  # 2 KV heads of width 8
    with pytest.raises(ValueError, match=r"model config: unknown fields \['heads'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "heads": 3})
    with pytest.raises(ValueError, match=r"mixer: unknown gdn fields \['width'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "mixer": {"name": "gdn", "width": 3}})
    with pytest.raises(ValueError, match=r"attention_layers: expected distinct layer indices in \[0, num_layers=3\)"):
        ModelConfig(num_layers=3, attention_layers=(3,))
    with pytest.raises(ValueError, match="qk_activation: expected one of"):
        GatedDeltaNetConfig(qk_activation="tanh")
