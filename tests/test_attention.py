"""Softmax attention as a mixer: the parallel forward against a naive per-document attention (RoPE
included), no leakage across packed documents, KV-cache decoding == the parallel forward (mixer and
model, packed prompts and continuations), generate with left padding, errors.

jit and gradients (with vmap) run in tests/test_mixers.py, plain decoding of the model in
tests/test_model.py; both parametrize over attention too."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osdn_jax import (Attention, AttentionConfig, CausalLM, DeltaNetConfig, count_params, generate,
                      mixer_config, model_config)
from osdn_jax.train.config import ModelSettings
from tolerances import assert_close

HIDDEN, HEADS = 32, 2
SEG = np.array([[3] * 5 + [1] * 9 + [3] * 6, [0] * 20])  # three documents in row 0, one in row 1


def _mixer(**options):
    return Attention(HIDDEN, HEADS, AttentionConfig(**options), rngs=nnx.Rngs(0))


def _x(B=2, T=20, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, T, HIDDEN))


def _naive(mixer, x, segment_ids, theta=10000.0):
    """Per row and document: RoPE at positions 0.. inside the document, causal softmax attention
    (float64 numpy), then o_proj."""
    weight = {name: np.asarray(getattr(mixer, name).kernel[...], np.float64)
              for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    H, K = HEADS, HIDDEN // HEADS
    q, k, v = ((x @ weight[n]).reshape(B, T, H, K) for n in ("q_proj", "k_proj", "v_proj"))
    inv_freq = 1.0 / theta ** (np.arange(0, K, 2) / K)

    def rotate(z):  # z [n, H, K] at positions 0..n-1
        angle = np.arange(len(z))[:, None, None] * inv_freq
        z1, z2 = z[..., :K // 2], z[..., K // 2:]
        cos, sin = np.cos(angle), np.sin(angle)
        return np.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

    out = np.zeros((B, T, H, K))
    for b in range(B):
        cuts = [0] + [t for t in range(1, T) if segment_ids[b, t] != segment_ids[b, t - 1]] + [T]
        for s, e in itertools.pairwise(cuts):
            logits = np.einsum("thk,shk->hts", rotate(q[b, s:e]), rotate(k[b, s:e])) / np.sqrt(K)
            logits = np.where(np.tril(np.ones((e - s, e - s), bool)), logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, s:e] = np.einsum("hts,shk->thk", p / p.sum(-1, keepdims=True), v[b, s:e])
    return out.reshape(B, T, HIDDEN) @ weight["o_proj"]


def test_forward_equals_naive_per_document_attention():
    mixer, x = _mixer(rope_theta=500.0), _x()
    assert_close(mixer(x, jnp.asarray(SEG)), _naive(mixer, x, SEG, 500.0), what="packed")
    assert_close(mixer(x), _naive(mixer, x, np.zeros((2, 20), int), 500.0), what="one document")


@pytest.mark.parametrize("conv_size", [0, 4])
def test_no_leakage_across_documents(conv_size):
    mixer, x = _mixer(conv_size=conv_size), _x()
    seg = jnp.asarray(SEG)
    changed = x.at[0, :5].set(_x(1, 5, seed=9)[0])  # document 0 of row 0 only
    y, y_changed = mixer(x, seg), mixer(changed, seg)
    np.testing.assert_array_equal(np.asarray(y_changed[:, 5:]), np.asarray(y[:, 5:]))
    assert float(jnp.max(jnp.abs(y_changed[0, :5] - y[0, :5]))) > 1e-3


@pytest.mark.parametrize("conv_size", [0, 4])
def test_prefill_and_steps_reproduce_the_parallel_forward(conv_size):
    """Prefill a packed prompt, prefill a continuation that carries on inside the last document and
    then starts a new one, then step token by token: equal to one parallel pass."""
    mixer, x = _mixer(conv_size=conv_size), _x()
    seg = jnp.asarray(SEG)
    full = mixer(x, seg)
    prefill = nnx.jit(lambda m, x, s, c: m.prefill(x, s, c))
    step = nnx.jit(lambda m, x, c: m.step(x, c))
    cache = mixer.init_cache(2, 24)
    shapes = jax.tree.map(jnp.shape, cache)
    y1, cache = prefill(mixer, x[:, :7], seg[:, :7], cache)
    y2, cache = prefill(mixer, x[:, 7:16], seg[:, 7:16], cache)
    ys = [y1, y2]
    for t in range(16, 20):
        y, cache = step(mixer, x[:, t], cache)
        ys.append(y[:, None])
    assert_close(jnp.concatenate(ys, axis=1), full, what="prefill + steps")
    assert jax.tree.map(jnp.shape, cache) == shapes and int(cache.length) == 20
    np.testing.assert_array_equal(np.asarray(cache.start), [14, 0])  # row 0's last document began at 14
    # from an empty cache, one token at a time (no segment ids: one document)
    cache = mixer.init_cache(2, 3)
    ys = []
    for t in range(3):
        y, cache = step(mixer, x[:, t], cache)
        ys.append(y)
    assert_close(jnp.stack(ys, axis=1), mixer(x[:, :3]), what="steps from init_cache")
    # without a cache, prefill returns one that holds exactly its tokens
    _, cache = mixer.prefill(x[:, :5], seg[:, :5])
    assert cache.keys.shape == (2, 5, HEADS, HIDDEN // HEADS) and int(cache.length) == 5


def test_model_decodes_a_packed_prompt_and_continuation():
    config = model_config("tiny", mixer=AttentionConfig(conv_size=4), max_seq_len=64, num_layers=1)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 24), 0, 512)
    seg = jnp.asarray(np.array([[0] * 6 + [1] * 10 + [2] * 8, [5] * 24]))
    full = nnx.jit(lambda m, t, s: m(t, s))(model, tokens, seg)
    logits, cache = nnx.jit(lambda m, t, s: m.prefill(t, s))(model, tokens[:, :11], seg[:, :11])
    assert cache.layers[0].keys.shape[1] == 64  # no cache given: max_seq_len slots
    parts = [logits]
    logits, cache = nnx.jit(lambda m, t, s, c: m.prefill(t, s, c))(model, tokens[:, 11:19], seg[:, 11:19], cache)
    parts.append(logits)
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    for t in range(19, 24):
        lg, cache = step(model, tokens[:, t], cache)
        parts.append(lg[:, None])
    assert_close(jnp.concatenate(parts, axis=1), full, what="packed prefill + continuation + steps")


def test_generate_with_left_padding_equals_each_prompt_alone():
    config = model_config("tiny", mixer=AttentionConfig(conv_size=4), max_seq_len=20, num_layers=1)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [300], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
    out = generate(model, prompts, 9, temperature=0.0)  # 11 + 9 = 20 = max_seq_len slots
    for prompt, row in zip(prompts[:2], out.tokens):  # the left-padded rows
        assert row.tolist() == generate(model, [prompt], 9, temperature=0.0).tokens[0].tolist()
    # greedy: each token is the argmax of the parallel forward over its prompt and the tokens before
    # it (one left-padded batch, the padding a document of its own)
    seqs = [p + row.tolist() for p, row in zip(prompts, out.tokens)]
    tokens = np.array([[0] * (20 - len(s)) + s for s in seqs])
    seg = np.array([[0] * (20 - len(s)) + [1] * len(s) for s in seqs])
    logits = np.asarray(nnx.jit(lambda m, t, s: m(t, s))(model, jnp.asarray(tokens), jnp.asarray(seg)))
    np.testing.assert_array_equal(np.argmax(logits[:, 10:19], axis=-1), out.tokens)
    with pytest.raises(ValueError, match=r"max_new_tokens: the longest prompt \(11 tokens\) plus max_new_tokens=10 "
                                         r"is more than max_seq_len=20"):
        generate(model, prompts, 10)


def test_presets_and_registry():
    assert isinstance(mixer_config("attention", conv_size=4), AttentionConfig)
    n_attn, n_delta = count_params(model_config("attention-340m")), count_params(model_config("deltanet-340m"))
    assert n_attn < n_delta  # no conv, β, output norm
    assert model_config("attention-1.3b").mixer_name == "attention"
    assert model_config("attention-340m").kv_cache and not model_config("osdn-340m").kv_cache


def test_overflow_poisons_the_output_under_jit():
    mixer, x = _mixer(), _x(T=3)
    _, cache = mixer.prefill(x, None, mixer.init_cache(2, 3))  # full
    y, _ = nnx.jit(lambda m, x, c: m.step(x, c))(mixer, x[:, 0], cache)
    assert bool(jnp.all(jnp.isnan(y)))


def test_errors_name_the_argument():
    mixer = _mixer()
    with pytest.raises(ValueError, match=r"x: expected an array \[B, T, hidden=32\]"):
        mixer(jnp.ones((2, 5, 16)))
    with pytest.raises(ValueError, match=r"segment_ids: expected shape \[B, T\] = \[2, 5\]"):
        mixer(_x(T=5), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"x: expected a rank-2 array \[B, hidden=32\]"):
        mixer.step(_x(T=1), mixer.init_cache(2, 4))
    with pytest.raises(ValueError, match="max_len: expected an int >= 1"):
        mixer.init_cache(2)
    with pytest.raises(ValueError, match="x: 9 tokens do not fit the attention KV cache of 8"):
        mixer.prefill(_x(T=9), None, mixer.init_cache(2, 8))
    _, cache = mixer.prefill(_x(T=6), None, mixer.init_cache(2, 8))
    with pytest.raises(ValueError, match="cache: 3 more tokens after 6 overflow the attention KV cache of 8"):
        mixer.prefill(_x(T=3), None, cache)
    with pytest.raises(ValueError, match=r"cache.keys: expected shape \[B, L, H_kv, K\] = \[3, 8, 2, 16\]"):
        mixer.prefill(_x(B=3, T=2), None, cache)
    with pytest.raises(ValueError, match="cache.conv: expected conv histories for conv_size=4"):
        _mixer(conv_size=4).step(_x(T=1)[:, 0], mixer.init_cache(2, 4))
    with pytest.raises(ValueError, match="hidden_size: expected a positive multiple of 2 \\* num_heads=4"):
        Attention(30, 2, rngs=nnx.Rngs(0))  # head dim 15: RoPE needs it even
    with pytest.raises(ValueError, match="config: expected an AttentionConfig"):
        Attention(HIDDEN, HEADS, DeltaNetConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="conv_size: expected an int >= 0"):
        AttentionConfig(conv_size=-1)
    with pytest.raises(ValueError, match="implementation: expected one of"):
        AttentionConfig(implementation="flash")
    with pytest.raises(ValueError, match="rope_theta"):
        AttentionConfig(rope_theta=0.0)
    with pytest.raises(ValueError, match=r"model: \['chunk_size', 'impl'\] only apply to the delta-rule mixers"):
        ModelSettings(mixer="attention", impl="chunked", chunk_size=32).build(512, 256)
    with pytest.raises(ValueError, match=r"model: \['apf'\] only apply to OSDN mixers, not 'attention'"):
        ModelSettings(mixer="attention", apf=True).build(512, 256)
    assert ModelSettings(mixer="attention").build(512, 256).mixer == AttentionConfig()
    model = CausalLM(model_config("tiny", mixer="attention", num_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"max_len: expected 1 <= max_len <= max_seq_len=1024"):
        model.init_cache(1, 1025)


def test_attend_takes_cudnn_on_gpu_half_precision_and_falls_back_to_xla(monkeypatch):
    """implementation=None: cuDNN is asked first on a GPU for bf16/fp16; where it refuses (here: no
    cuDNN on this CPU host), XLA runs. fp32 and CPU go straight to XLA."""
    from osdn_jax import attention

    calls = []
    real = jax.nn.dot_product_attention

    def spy(*a, implementation=None, **kw):
        calls.append(implementation)
        if implementation == "cudnn":
            raise RuntimeError("cuDNN is not available")
        return real(*a, implementation=implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 2, 16), jnp.bfloat16)
    ref = real(q, q, q, is_causal=True, scale=0.25, implementation="xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    out = attention.attend(q, q, q, is_causal=True, scale=0.25)
    assert calls == ["cudnn", "xla"] and (out == ref).all()
    calls.clear()
    attention.attend(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32), scale=0.25)
    assert calls == ["xla"]
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    calls.clear()
    attention.attend(q, q, q, scale=0.25)
    assert calls == ["xla"]
