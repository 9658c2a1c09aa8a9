"""The recall residual ratio: the identity on real activations, and its aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osdn_jax import diagnostics
from osdn_jax.mixers import mixer_config
from osdn_jax.model import CausalLM, ModelConfig

MIXERS = {
    "deltanet": mixer_config("deltanet"),
    "gdn": mixer_config("gdn"),
    "osdn-apr": mixer_config("osdn"),
    "osdn-may-apf": mixer_config("osdn", preset="may", apf=True),
    "os_gdn": mixer_config("os_gdn"),
}


def _model(mixer, seed=0):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, mixer=mixer,
                      compute_dtype="float32", max_seq_len=64)
    return CausalLM(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", list(MIXERS))
def test_ratio_is_the_measured_residual_shrink(name):
    """‖v_t − S_tᵀk_t‖² / ‖v_t − S'ᵀk_t‖² == (1 − w_t)², S' the state before the write."""
    mixer = _model(MIXERS[name]).layer(0).mixer
    B, T = 2, 12
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, 32))
    w = np.asarray(mixer.write_strength(x))  # [B, T, H]
    _, _, k, v, _, gates = mixer._inputs(x, None, None)
    for t in (0, 1, 5, T - 1):
        before = mixer.init_cache(B).state if t == 0 else mixer.prefill(x[:, :t])[1].state
        after = mixer.prefill(x[:, :t + 1])[1].state
        if "log_decay" in gates:  # the decay comes before the write
            before = before * jnp.exp(gates["log_decay"][:, t])[..., None, None]
        kt, vt = k[:, t].astype(jnp.float32), v[:, t].astype(jnp.float32)  # [B, H, K]
        e_before = vt - jnp.einsum("bhkv,bhk->bhv", before, kt)
        e_after = vt - jnp.einsum("bhkv,bhk->bhv", after, kt)
        measured = jnp.sum(e_after ** 2, -1) / jnp.sum(e_before ** 2, -1)
        np.testing.assert_allclose(measured, (1 - w[:, t]) ** 2, rtol=2e-4, atol=1e-6)
    if name in ("deltanet", "gdn"):  # d ≡ 1: w = β‖k‖²
        k32 = k.astype(jnp.float32)
        beta = jax.nn.sigmoid(mixer.b_proj(x))
        np.testing.assert_allclose(w, beta * jnp.sum(k32 * k32, -1), rtol=1e-6)


def test_aggregate_is_a_geometric_mean_over_counted_tokens():
    model = _model(MIXERS["osdn-may-apf"])
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 64)
    mask = np.ones((2, 16))
    mask[1, 10:] = 0
    seg = np.zeros((2, 16), np.int32)
    seg[0, 8:] = 1
    result = diagnostics.recall_residual_ratio(model, [{"inputs": tokens, "segment_ids": seg, "loss_mask": mask}])
    w = np.asarray(diagnostics.write_strengths(model, tokens, jnp.asarray(seg)), np.float64)  # [L, B, T, H]
    logs = np.log(np.maximum((1 - w) ** 2, diagnostics.RATIO_FLOOR))[:, mask.astype(bool)]  # [L, tokens, H]
    np.testing.assert_allclose(result["per_head"], np.exp(logs.mean(axis=1)), rtol=1e-6)
    np.testing.assert_allclose(result["per_layer"], np.exp(logs.mean(axis=(1, 2))), rtol=1e-6)
    np.testing.assert_allclose(result["overall"], np.exp(logs.mean()), rtol=1e-6)
    assert result["tokens"] == 26
    assert "layer" in diagnostics.format_ratio_table(result)


def test_attention_models_are_refused():
    model = _model(mixer_config("attention"))
    with pytest.raises(ValueError, match="delta-rule mixers"):
        diagnostics.write_strengths(model, jnp.zeros((1, 4), jnp.int32))


def test_write_strength_by_position_is_the_mean_of_the_measured_strengths():
    """Packed documents: every token counts in the bucket of its position in its own document, the
    mean over heads and layers of ``write_strengths``; at each document start OSDN-apr (d0 = 0)
    writes nothing and DeltaNet writes β‖k‖² > 0; ``d0`` reports the parameters."""
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 24), 0, 64)
    seg = jnp.asarray(np.repeat([[0, 1, 2], [0, 0, 1]], 8, axis=1))
    ranges = [(0, 1), (1, 4), (4, 16)]
    for name in ("osdn-apr", "deltanet"):
        model = _model(MIXERS[name])
        got = diagnostics.write_strength_by_position(model, [{"inputs": tokens, "segment_ids": seg}], ranges)
        w = np.asarray(diagnostics.write_strengths(model, tokens, seg), np.float64)  # [L, B, T, H]
        pos = diagnostics.positions_in_piece(np.asarray(seg))
        assert pos[0].tolist() == [*range(8)] * 3 and pos[1].tolist() == [*range(16), *range(8)]
        for bucket, (lo, hi) in zip(got["buckets"], ranges):
            sel = (pos >= lo) & (pos < hi)
            assert bucket["tokens"] == sel.sum()
            np.testing.assert_allclose(bucket["per_layer"], w[:, sel].mean(axis=(1, 2)), rtol=1e-6)
            np.testing.assert_allclose(bucket["mean"], w[:, sel].mean(), rtol=1e-6)
        first = got["buckets"][0]["mean"]
        if name == "osdn-apr":
            assert first == 0.0 and got["buckets"][2]["mean"] > 0
            d0 = [np.asarray(model.layer(i).mixer.d0[...]) for i in range(2)]
            assert [r["mean"] for r in got["d0"]] == pytest.approx([float(d.mean()) for d in d0])
            assert [r["max"] for r in got["d0"]] == pytest.approx([float(d.max()) for d in d0])
        else:
            assert first > 0 and got["d0"] is None
    table = diagnostics.format_strength_table(got)
    assert "[0, 1)" in table and "[4, 16)" in table


def test_apr_d1_writes_at_deltanets_strength_from_each_documents_first_token():
    """The 'apr-d1' preset (apr with d0 = 1): at a document's first token d = d0 = 1, so the write
    strength is DeltaNet's β‖k‖² with the same weights (apr: 0); later tokens follow OSDN's d."""
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, 64)
    seg = jnp.asarray(np.repeat([[0, 1], [0, 0]], 8, axis=1))
    osdn = _model(mixer_config("osdn", preset="apr-d1"))
    delta = _model(MIXERS["deltanet"])
    nnx.update(osdn, nnx.state(delta, nnx.Param))  # DeltaNet's weights; d0 keeps its init, 1
    assert all(float(osdn.layer(i).mixer.d0[...].min()) == float(osdn.layer(i).mixer.d0[...].max()) == 1.0
               for i in range(2))
    w_osdn = np.asarray(diagnostics.write_strengths(osdn, tokens, seg))
    w_delta = np.asarray(diagnostics.write_strengths(delta, tokens, seg))
    starts = diagnostics.positions_in_piece(np.asarray(seg)) == 0
    np.testing.assert_allclose(w_osdn[:, starts], w_delta[:, starts], rtol=1e-5)
    assert (w_delta[:, starts] > 0).all() and not np.allclose(w_osdn[:, ~starts], w_delta[:, ~starts])
