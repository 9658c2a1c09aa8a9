"""Building blocks: the short convolution (causal, document-bounded, resumable), norms, MLP width."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osdn_jax.layers import GatedRMSNorm, RMSNorm, ShortConv, SwiGLU, mlp_width


def _naive_conv(x, w, segment_ids, history):
    """Token-by-token numpy conv: tap j reads x[t - (W-1-j)] if it is in t's document."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    B, T, D = x.shape
    W = w.shape[0]
    full = np.concatenate([np.asarray(history, np.float64), x], axis=1)
    doc = np.zeros((B, W - 1 + T), np.int64)
    for b in range(B):
        for t in range(1, T):
            doc[b, W - 1 + t] = doc[b, W - 2 + t] + (segment_ids[b, t] != segment_ids[b, t - 1])
    y = np.zeros((B, T, D))
    for b in range(B):
        for t in range(T):
            for j in range(W):
                src = t + j  # index into `full`
                if doc[b, src] == doc[b, W - 1 + t]:
                    y[b, t] += w[j] * full[b, src]
    return y


def test_mlp_width_matches_spec():
    assert mlp_width(1024) == 2816
    assert mlp_width(2048) == 5632
    assert mlp_width(128) == 512


@pytest.mark.parametrize("with_history", [False, True])
def test_short_conv_matches_naive_with_documents(with_history):
    conv = ShortConv(6, 4, rngs=nnx.Rngs(0))
    B, T, D = 2, 11, 6
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
    seg = jnp.array([[0] * 4 + [1] * 2 + [0] * 5, [3] * 1 + [4] * 10])
    hist = jax.random.normal(jax.random.PRNGKey(2), (B, 3, D)) if with_history else jnp.zeros((B, 3, D))
    y = conv(x, seg, history=hist if with_history else None)
    ref = _naive_conv(x, conv.weight[...], np.asarray(seg), hist)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)


def test_short_conv_is_causal_and_resumable():
    conv = ShortConv(5, 4, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 9, 5))
    y = conv(x)
    x2 = x.at[:, 6].add(1.0)
    np.testing.assert_array_equal(np.asarray(conv(x2)[:, :6]), np.asarray(y[:, :6]))
    for split in (1, 2, 5):  # a prefix, then the rest from the prefix's final history
        hist = conv.final_history(x[:, :split])
        np.testing.assert_allclose(np.asarray(conv(x[:, split:], history=hist)), np.asarray(y[:, split:]),
                                   rtol=1e-6, atol=1e-6)


def test_final_history_drops_earlier_documents():
    conv = ShortConv(3, 4, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 5, 3))
    seg = jnp.array([[0, 0, 0, 1, 1]])
    hist = conv.final_history(x, seg)
    np.testing.assert_array_equal(np.asarray(hist[0, :, 0]), [0.0, 1.0, 1.0])


def test_rms_norms():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    norm = RMSNorm(8, eps=1e-6)
    norm.weight[...] = jnp.arange(8.0)
    ref = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * jnp.arange(8.0)
    np.testing.assert_allclose(np.asarray(norm(x)), np.asarray(ref), rtol=1e-5, atol=1e-6)
    gate = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 8))
    gated = GatedRMSNorm(8, eps=1e-6)(x, gate)
    ref = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * jax.nn.silu(gate)
    np.testing.assert_allclose(np.asarray(gated), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_swiglu_shape_and_annotations():
    mlp = SwiGLU(16, 48, rngs=nnx.Rngs(0))
    assert mlp(jnp.ones((2, 3, 16))).shape == (2, 3, 16)
    assert mlp.gate_proj.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert mlp.down_proj.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
