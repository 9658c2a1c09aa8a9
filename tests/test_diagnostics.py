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
