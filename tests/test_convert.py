"""osdn_jax.convert: fla checkpoints in and out, exact to fla's own logits; upcycling; run dirs.

The golden fixtures in tests/fixtures/fla were written by flash-linear-attention 0.6.0's real
PyTorch models (``tests/fixtures/fla/make_fixtures.py``, not run here): config.json, safetensors and
the logits fla computed for a fixed token batch.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osdn_jax.attention import AttentionConfig
from osdn_jax.convert import fla_config_from_model, load_fla, model_config_from_fla, save_fla
from osdn_jax.mixers import DeltaNetConfig, GatedDeltaNetConfig, OSDNConfig, OSGatedDeltaNetConfig
from osdn_jax.model import CausalLM, ModelConfig

FIXTURES = Path(__file__).parent / "fixtures" / "fla"
GOLDEN = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.npz").is_file())


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_same_params(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(params_of(a))[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(params_of(b))[0])
    assert len(flat_a) == len(flat_b)
    for path, x in flat_a:
        y = flat_b[path]
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_fixtures_present():
    assert {"delta_net", "gated_deltanet", "delta_net_bf16_sharded", "delta_net_hybrid"} <= set(GOLDEN)


@pytest.mark.parametrize("name", GOLDEN)
def test_logits_match_fla(name):
    """Forward, and prefill + token-by-token decode, equal the logits fla computed (fp32)."""
    model, cfg = load_fla(FIXTURES / name)
    want = np.load(FIXTURES / name / "expected.npz")
    tokens, logits = want["tokens"], want["logits"]
    assert relative_error(model(jnp.asarray(tokens)), logits) <= 1e-4
    P = 48
    prompt_logits, cache = model.prefill(jnp.asarray(tokens[:, :P]))
    steps = []
    for t in range(P, tokens.shape[1]):
        step_logits, cache = model.decode_step(jnp.asarray(tokens[:, t]), cache)
        steps.append(step_logits)
    assert relative_error(prompt_logits, logits[:, :P]) <= 1e-4
    # decode_step(token t) gives the logits at position t
    assert relative_error(jnp.stack(steps, axis=1), logits[:, P:]) <= 1e-4
    if "decode_logits" in want:  # fla's own cached decoding agrees with its forward too
        assert relative_error(want["decode_logits"], logits[:, P:]) <= 1e-4


def test_fixture_configs_map_every_field():
    """Spot checks of the field mapping on fla's own config.json files."""
    cfg = load_config("gated_deltanet")
    assert (cfg.mixer.head_k_dim, cfg.mixer.head_v_dim, cfg.mixer.output_gate) == (16, 32, "swish")
    cfg = load_config("gated_deltanet_variants")
    assert (cfg.mixer.head_v_dim, cfg.mixer.output_gate, cfg.mixer.allow_neg_eigval, cfg.mixer.conv_size,
            cfg.tie_embeddings) == (24, "sigmoid", True, 3, True)
    cfg = load_config("delta_net_variants")
    assert (cfg.mixer.qk_activation, cfg.mixer.qk_norm, cfg.mixer.output_gate, cfg.mixer.head_v_dim,
            cfg.tie_embeddings, cfg.mlp_width) == ("relu", "sum", "swish", 64, True, 256)
    cfg = load_config("delta_net_hybrid")
    assert cfg.attention_layers == (1,)
    assert cfg.attention == AttentionConfig(num_heads=4, num_kv_heads=2, qkv_bias=True, rope_theta=500.0)
    assert (cfg.mixer.short_conv, cfg.mixer.qk_activation, cfg.mixer.use_beta, cfg.intermediate_size) == \
        (False, "elu", False, 96)


def load_config(name: str) -> ModelConfig:
    return model_config_from_fla(json.loads((FIXTURES / name / "config.json").read_text()))


@pytest.mark.parametrize("name", ["delta_net_bf16_sharded", "gated_deltanet"])
def test_upcycle_to_osdn_keeps_the_logits(name):
    """--as osdn: d0 = 1 and the 'may' preset reproduce the source model; d0 then learns."""
    source, _ = load_fla(FIXTURES / name)
    model, cfg = load_fla(FIXTURES / name, as_osdn=True)
    assert isinstance(cfg.mixer, OSGatedDeltaNetConfig if name.startswith("gated") else OSDNConfig)
    assert (cfg.mixer.preset, cfg.mixer.initial_d, cfg.mixer.apf, cfg.mixer.beta_aware) == ("may", 1.0, False, False)
    tokens = jnp.asarray(np.load(FIXTURES / name / "expected.npz")["tokens"])
    want = source(tokens)
    assert relative_error(model(tokens), want) <= 2e-6
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["stacks"][0]["mixer"]["d0"][...]).max()) > 0


MIXERS = {
    "deltanet": DeltaNetConfig(),
    "gdn": GatedDeltaNetConfig(head_k_dim=8, head_v_dim=24),
    "osdn": OSDNConfig(apf=True, preset="may"),
    "os_gdn": OSGatedDeltaNetConfig(),
    "attention": AttentionConfig(num_kv_heads=1, qkv_bias=True),
    "deltanet_hybrid": DeltaNetConfig(output_gate="swish", qk_activation="relu"),
}


def random_model(mixer, *, param_dtype="float32", **overrides) -> CausalLM:
    """A small model whose every parameter is random (norms, d0, A_log included)."""
    hybrid = dict(attention_layers=(1,), attention=AttentionConfig(num_heads=4, num_kv_heads=2, qkv_bias=True)) \
        if mixer == MIXERS["deltanet_hybrid"] else {}
    cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=2, mixer=mixer, compute_dtype="float32",
                      param_dtype=param_dtype, max_seq_len=256, **hybrid, **overrides)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [(x + 0.1 * jax.random.normal(k, x.shape)).astype(x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("dtype,shard", [("float32", None), ("bfloat16", "8KB")])
def test_round_trip_is_bit_identical(tmp_path, mixer, dtype, shard):
    model = random_model(MIXERS[mixer], param_dtype=dtype)
    save_fla(model, tmp_path / "fla", max_shard_size=shard)
    assert (tmp_path / "fla" / "model.safetensors.index.json").is_file() == (shard is not None)
    again, cfg = load_fla(tmp_path / "fla", param_dtype=dtype)
    assert cfg == model.config
    assert_same_params(model, again)


def test_osdn_exports_as_deltanet_where_exact(tmp_path):
    model = random_model(OSDNConfig(preset="may"))
    with pytest.raises(ValueError, match="d0 is not all ones; nothing was written"):
        save_fla(model, tmp_path / "bad", as_deltanet=True)
    assert not (tmp_path / "bad").exists()
    model.stacks[0].mixer.d0[...] = jnp.ones_like(model.stacks[0].mixer.d0[...])  # every layer
    save_fla(model, tmp_path / "dn", as_deltanet=True)
    assert json.loads((tmp_path / "dn" / "config.json").read_text())["model_type"] == "delta_net"
    deltanet, cfg = load_fla(tmp_path / "dn")
    assert isinstance(cfg.mixer, DeltaNetConfig) and type(cfg.mixer) is DeltaNetConfig
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 40), 0, 96)
    assert relative_error(deltanet(tokens), model(tokens)) <= 2e-6
    with pytest.raises(ValueError, match="APF is on"):
        save_fla(random_model(OSDNConfig(preset="may", apf=True, d0_init=1.0)), tmp_path / "apf", as_deltanet=True)
    gated = random_model(OSGatedDeltaNetConfig(preset="may"))
    gated.stacks[0].mixer.d0[...] = jnp.ones_like(gated.stacks[0].mixer.d0[...])
    with pytest.raises(ValueError, match="the β-aware hypergradient moves d away from 1"):
        save_fla(gated, tmp_path / "gated", as_deltanet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dn"]


# -- bad input --------------------------------------------------------------------------------


def copy_fixture(tmp_path, name="delta_net_bf16_sharded") -> Path:
    dest = tmp_path / name
    shutil.copytree(FIXTURES / name, dest)
    return dest


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="mamba2"), r"field 'model_type' = 'mamba2' is not supported"),
    (dict(model_type="os_gated_deltanet", use_osgm=True), r"'os_gated_deltanet' is the OSDN authors' fork of fla"),
    (dict(qk_activation="tanh"), r"field 'qk_activation' = 'tanh' is not supported"),
    (dict(hidden_act="powlu"), r"field 'hidden_act' = 'powlu' is not supported"),
    (dict(attnres_block_size=2), r"field 'attnres_block_size' = 2 is not supported"),
    (dict(attn={"layers": [0], "num_heads": 2, "window_size": 16}), r"field 'attn.window_size' = 16"),
    (dict(expand_k=0.3), r"field 'expand_k' = 0.3 is not supported"),
    (dict(rope_scaling={"type": "linear"}), r"unknown field 'rope_scaling'"),
    (dict(num_heads=4), r"tensor 'model.layers.0.attn.b_proj.weight' has shape \[2, 64\]; config.json implies "
                        r"\[4, 64\]"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, changes, message):
    folder = copy_fixture(tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message) as info:
        load_fla(folder)
    assert str(folder) in str(info.value)


def test_ignore_fields_names_unknown_fields_only(tmp_path):
    folder = copy_fixture(tmp_path)
    edit_config(folder, norm_first=True)
    with pytest.raises(ValueError, match="unknown field 'norm_first' = True"):
        load_fla(folder)
    model, cfg = load_fla(folder, ignore_fields=("norm_first",))
    assert cfg.num_layers == 2
    with pytest.raises(ValueError, match=r"ignore_fields: \['qk_norm'\] are known fields"):
        load_fla(folder, ignore_fields=("qk_norm",))


def test_gdn_grouped_value_heads_are_refused(tmp_path):
    folder = copy_fixture(tmp_path, "gated_deltanet")
    edit_config(folder, num_v_heads=4)
    with pytest.raises(ValueError, match=r"config.json: field 'num_v_heads' = 4 is not supported; expected null or "
                                         r"num_heads=2 \(grouped value heads"):
        load_fla(folder)


def test_missing_and_unexpected_files_and_tensors(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_fla(tmp_path / "nowhere")
    folder = copy_fixture(tmp_path, "gated_deltanet")
    (folder / "config.json").rename(folder / "config.bak")
    with pytest.raises(ValueError, match=r"config.json: missing"):
        load_fla(folder)
    (folder / "config.bak").rename(folder / "config.json")
    weights = folder / "model.safetensors"
    weights.rename(folder / "weights.bak")
    with pytest.raises(ValueError, match="holds neither model.safetensors nor model.safetensors.index.json"):
        load_fla(folder)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "weights.bak")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.attn.A_log"}, weights)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.attn.A_log' is missing"):
        load_fla(folder)
    save_file({**tensors, "model.layers.0.attn.extra.weight": np.zeros(3, np.float32)}, weights)
    with pytest.raises(ValueError, match=r"model.safetensors: unexpected tensor 'model.layers.0.attn.extra.weight'"):
        load_fla(folder)
    save_file({**tensors, "model.norm.weight": tensors["model.norm.weight"].astype(np.int32)}, weights)
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' has dtype int32"):
        load_fla(folder)
    sharded = copy_fixture(tmp_path)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"lists shard {shard.name}, which is missing"):
        load_fla(sharded)


def test_save_never_leaves_partial_output(tmp_path, monkeypatch):
    model = random_model(DeltaNetConfig())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty folder; nothing was written"):
        save_fla(model, tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="field 'use_mlp' = False is not supported"):
        save_fla(random_model(DeltaNetConfig(), use_mlp=False), tmp_path / "nomlp")
    import safetensors.numpy

    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(tensors, path, metadata=metadata)

    real_save = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_fla(model, tmp_path / "out", max_shard_size="8KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no destination, no temporary folder


def test_fla_config_refuses_what_fla_cannot_express():
    cfg = random_model(GatedDeltaNetConfig(qk_activation="relu")).config
    with pytest.raises(ValueError, match=r"field 'mixer.qk_activation' = 'relu' is not supported"):
        fla_config_from_model(cfg)
    cfg = dataclasses.replace(cfg, mixer=GatedDeltaNetConfig(norm_eps=1e-5))
    with pytest.raises(ValueError, match=r"field 'mixer.norm_eps' = 1e-05 is not supported"):
        fla_config_from_model(cfg)


@pytest.mark.parametrize("fla,params", [
    # parameter counts of fla 0.6.0's own models for these configs (torch, on the meta device)
    ({"model_type": "delta_net"}, 1365677056),
    ({"model_type": "delta_net", "hidden_size": 1024, "num_heads": 8,
      "attn": {"layers": [3, 9], "num_heads": 16, "num_kv_heads": 4}}, 371175168),
    ({"model_type": "gated_deltanet"}, 1387348732),  # head_dim 256, 6 heads, expand_v 2: K ≠ V ≠ hidden / H
    ({"model_type": "gated_deltanet", "hidden_size": 1024, "num_heads": 4, "head_dim": 256, "expand_v": 1,
      "num_hidden_layers": 21}, 357781928),
])
def test_fla_default_configs_have_fla_parameter_counts(fla, params):
    from osdn_jax.model import count_params

    assert count_params(model_config_from_fla(fla)) == params
