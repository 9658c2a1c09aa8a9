"""generate(): batched prompts of different lengths, greedy == argmax of the parallel forward,
sampling options, stop token, NaN handling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osdn_jax import CausalLM, generate, model_config
from osdn_jax.generate import sample_logits

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]


@pytest.fixture(scope="module")
def model():
    return CausalLM(model_config("tiny", mixer="os_gdn"), rngs=nnx.Rngs(0))


def _greedy_by_forward(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(model(jnp.array([seq]))[0, -1])))
    return seq[len(prompt):]


def test_batched_greedy_equals_single_prompt_and_parallel_forward(model):
    out = generate(model, PROMPTS, 9, temperature=0.0)
    assert out.tokens.shape == (3, 9) and out.lengths.tolist() == [9, 9, 9]
    for prompt, row in zip(PROMPTS, out.tokens):
        assert row.tolist() == _greedy_by_forward(model, prompt, 9)
        assert row.tolist() == generate(model, [prompt], 9, temperature=0.0).tokens[0].tolist()


def test_stop_token_ends_a_row(model):
    greedy = generate(model, PROMPTS, 9, temperature=0.0).tokens
    stop = int(greedy[0, 3])
    first = [int(np.argmax(r == stop)) if (r == stop).any() else None for r in greedy]
    out = generate(model, PROMPTS, 9, temperature=0.0, stop_token=stop, pad_token=1)
    for row, g, f, n in zip(out.tokens, greedy, first, out.lengths):
        if f is None:
            assert n == 9 and row.tolist() == g.tolist()
        else:
            assert n == f + 1 and row[:n].tolist() == g[:n].tolist() and set(row[n:].tolist()) <= {1}
    assert out.as_lists()[0][-1] == stop


def test_sampling_is_seeded_and_respects_top_k(model):
    a = generate(model, PROMPTS, 12, temperature=1.0, seed=3)
    b = generate(model, PROMPTS, 12, temperature=1.0, seed=3)
    c = generate(model, PROMPTS, 12, temperature=1.0, seed=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    top1 = generate(model, PROMPTS, 6, temperature=0.7, top_k=1, seed=5)
    np.testing.assert_array_equal(top1.tokens, generate(model, PROMPTS, 6, temperature=0.0).tokens)
    tiny_p = generate(model, PROMPTS, 6, temperature=1.3, top_p=1e-6, seed=6)
    np.testing.assert_array_equal(tiny_p.tokens, generate(model, PROMPTS, 6, temperature=0.0).tokens)


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    top2 = set(np.asarray(jax.vmap(lambda k: sample_logits(k, logits, 1.0, 2, None)[0])(keys)).tolist())
    assert top2 == {0, 1}
    top_p = set(np.asarray(jax.vmap(lambda k: sample_logits(k, logits, 1.0, None, 0.7)[0])(keys)).tolist())
    assert top_p == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there


def test_non_finite_logits_raise(model):
    graphdef, state = nnx.split(model)
    broken = nnx.merge(graphdef, state)
    broken.blocks[1].mlp.down_proj.kernel[...] = broken.blocks[1].mlp.down_proj.kernel[...].at[0, 0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match=r"non-finite logits \(NaN or inf\) in rows \[0, 1, 2\] at steps"):
        generate(broken, PROMPTS, 4, temperature=0.0)


def test_errors_name_the_value(model):
    with pytest.raises(ValueError, match="prompts: the longest prompt has 1025 tokens, more than max_seq_len=1024"):
        generate(model, [[1] * 1025], 2)
    with pytest.raises(ValueError, match=r"prompts: token id 512 is out of range"):
        generate(model, [[1, 512]], 2)
    with pytest.raises(ValueError, match="prompts: every prompt needs at least one token"):
        generate(model, [[1], []], 2)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], 2, temperature=float("nan"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], 0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 2, top_p=1.5)
    with pytest.raises(ValueError, match="stop_token"):
        generate(model, [[1]], 2, stop_token=600)
