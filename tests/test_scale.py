"""Training at scale: the chunked LM-head loss (``osdn_jax.loss``) and the scanned layer layout
(``osdn_jax.layer_stacks``) against the dense loss and the unrolled model, and old layouts loading."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from osdn_jax.layer_stacks import convert_layout, layout_of
from osdn_jax.loss import head_cross_entropy, num_loss_chunks
from osdn_jax.model import CausalLM, model_config
from osdn_jax.train.checkpoint import restore_params, save_params
from osdn_jax.train.evaluate import load_run
from osdn_jax.train.loop import train
from osdn_jax.train.optim import decay_mask
from osdn_jax.train.step import loss_sums, make_train_step
from tests.test_train import _cfg, _losses
from tests.tolerances import assert_close



def close(actual, expected, what="value"):
    """The suite's fp32 rule (``tests/tolerances.py``): error relative to the largest entry."""
    assert_close(np.asarray(actual), np.asarray(expected), what=what)


def close_trees(actual, expected, what):
    for (path, e), a in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)):
        close(a, e, f"{what}{jax.tree_util.keystr(path)}")


def _batch(B, T, vocab, seed=0, masked=True):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
    seg = np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
    mask = (rng.random((B, T)) > 0.3).astype(np.float32) if masked else np.ones((B, T), np.float32)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(mask)}


def _params(model):
    return nnx.split(model, nnx.Param)


# -- the chunked loss --------------------------------------------------------------------------

def test_chunk_count_divides_the_row():
    assert [num_loss_chunks(T, c) for T, c in [(256, 0), (256, 256), (256, 300), (256, 64), (100, 64), (97, 10)]] \
        == [1, 1, 1, 4, 2, 97]
    assert all(T % num_loss_chunks(T, c) == 0 and T // num_loss_chunks(T, c) <= max(c, 1)
               for T in (48, 60, 4096, 1000) for c in (1, 7, 16, 100))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_loss_and_gradients_equal_the_dense(tied, chunk):
    """Every chunk size (T = 48: 1, 5 → 6 chunks of 8, 16), the LM head or the tied embedding, a
    loss_mask with zeros: the loss and every parameter's gradient equal the whole-logits loss's."""
    model = CausalLM(model_config("tiny", tie_embeddings=tied, compute_dtype="float32"), rngs=nnx.Rngs(1))
    graphdef, params = _params(model)
    params = nnx.to_pure_dict(params)
    batch = _batch(3, 48, model.config.vocab_size)
    dense = jax.value_and_grad(lambda p: loss_sums(graphdef, p, batch, 0)[0])(params)
    chunked = jax.value_and_grad(lambda p: loss_sums(graphdef, p, batch, chunk)[0])(params)
    close(chunked[0], dense[0], "loss")
    close_trees(chunked[1], dense[1], "gradient")
    assert ("lm_head" in params) != tied


def test_chunked_loss_keeps_one_chunk_of_logits():
    """XLA's buffer assignment of the compiled gradient: beyond what the model alone needs, the
    dense loss holds the whole logits and their gradient (2 × B·T·vocab floats), the chunked loss
    at most one chunk's logits and their gradient."""
    B, T, D, V = 4, 512, 32, 8192
    model = CausalLM(model_config("tiny", vocab_size=V, hidden_size=D, num_layers=1, compute_dtype="float32",
                                  max_seq_len=T), rngs=nnx.Rngs(0))
    graphdef, params = _params(model)
    params = nnx.to_pure_dict(params)
    batch = _batch(B, T, V, masked=False)

    def temp_bytes(loss):
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    model_only = temp_bytes(lambda p: nnx.merge(graphdef, p).features(batch["inputs"]).sum())
    extra = {chunk: temp_bytes(lambda p: loss_sums(graphdef, p, batch, chunk)[0]) - model_only for chunk in (0, 32)}
    logits = lambda positions: B * positions * V * 4  # noqa: E731
    assert extra[0] >= 1.5 * logits(T)
    assert extra[32] <= 2 * logits(32) < logits(T) / 4


def test_head_cross_entropy_matches_optax():
    model = CausalLM(model_config("tiny", compute_dtype="float32"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 30, model.config.hidden_size))
    y = jax.random.randint(jax.random.PRNGKey(1), (2, 30), 0, model.config.vocab_size)
    want = optax.softmax_cross_entropy_with_integer_labels(model.head(x), y)
    close(head_cross_entropy(model, x, y, 4), want)  # 10 chunks of 3


# -- scanned layers ----------------------------------------------------------------------------

CONFIGS = {
    "osdn": dict(num_layers=3),
    "osdn-remat": dict(remat=True),
    "gdn": dict(mixer="gdn"),
    "hybrid": dict(num_layers=4, attention_layers=(1, 2)),
    "deltanet-tied": dict(mixer="deltanet", tie_embeddings=True),
    "os-gdn": dict(mixer="os_gdn"),
    "attention": dict(mixer="attention"),
}


def _pair(name):
    kw = dict(CONFIGS[name])
    cfg = model_config("tiny", mixer=kw.pop("mixer", None), scan_layers=True, **kw)
    scanned = CausalLM(cfg, rngs=nnx.Rngs(3))
    unrolled = CausalLM(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(3))
    return scanned, unrolled


@pytest.mark.parametrize("name", CONFIGS)
def test_scanned_model_equals_the_unrolled(name):
    """Same seed, same numbers in the other layout; equal logits, gradients (compared in one
    layout) and training steps; prefill and decoding equal too."""
    scanned, unrolled = _pair(name)
    gs, ps = _params(scanned)
    gu, pu = _params(unrolled)
    ps, pu = nnx.to_pure_dict(ps), nnx.to_pure_dict(pu)
    assert layout_of(ps) == "stacks" and layout_of(pu) == "blocks"
    assert len(ps["stacks"]) == len(scanned.config.layer_groups())
    jax.tree.map(np.testing.assert_array_equal, ps, convert_layout(pu, scanned.config))
    jax.tree.map(np.testing.assert_array_equal, pu, convert_layout(ps, unrolled.config))
    batch = _batch(2, 40, scanned.config.vocab_size)
    close(scanned(batch["inputs"], batch["segment_ids"]), unrolled(batch["inputs"], batch["segment_ids"]), "logits")
    # jitted, as in training (op-by-op execution of the unrolled model rounds differently from the
    # fused scan: os_gdn's A_log gradient, a sum over every token with cancellation, moves by 1e-5)
    g_s = jax.jit(jax.grad(lambda p: loss_sums(gs, p, batch)[0]))(ps)
    g_u = jax.jit(jax.grad(lambda p: loss_sums(gu, p, batch)[0]))(pu)
    close_trees(g_s, convert_layout(g_u, scanned.config), "gradient")
    tokens = batch["inputs"][:, :20]
    (ls, cs), (lu, cu) = scanned.prefill(tokens), unrolled.prefill(tokens)
    close(ls, lu, "prefill logits")
    step_s, _ = scanned.decode_step(tokens[:, 0], cs)
    step_u, _ = unrolled.decode_step(tokens[:, 0], cu)
    close(step_s, step_u, "decode logits")


def test_train_step_equal_in_both_layouts():
    scanned, unrolled = _pair("osdn")
    tx = optax.adamw(1e-2, weight_decay=0.1, mask=decay_mask)
    batch = _batch(4, 32, scanned.config.vocab_size)
    out = []
    for model in (scanned, unrolled):
        graphdef, params = _params(model)
        params = nnx.to_pure_dict(params)
        new, opt, m = jax.jit(make_train_step(graphdef, tx, 2))(params, tx.init(params), batch)
        out.append((convert_layout(new, scanned.config), convert_layout(opt, scanned.config), m))
    (p1, o1, m1), (p2, o2, m2) = out
    close(m1["loss"], m2["loss"], "loss")
    close_trees((p1, o1), (p2, o2), "state")


def test_layer_views_and_groups():
    cfg = model_config("tiny", num_layers=5, attention_layers=(2,), scan_layers=True)
    assert cfg.layer_groups() == ((0, 2), (2, 3), (3, 5))
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    assert model.stacks[2].mixer.q_proj.kernel.shape[0] == 2
    assert type(model.layer(2).mixer).__name__ == "Attention" and model.layer(4).mixer.q_proj.kernel.shape[0] == 128
    with pytest.raises(IndexError):
        model.layer(5)


# -- old layouts keep loading ------------------------------------------------------------------

def test_an_unrolled_run_resumes_scanned_and_equals_going_on_unrolled(tmp_path):
    """A run saved in the unrolled layout (every run before scanning existed; the CPU presets'
    default) resumes scanned: its checkpoint (parameters and Adam moments) is converted on load, and
    the losses equal those of resuming it unrolled. Checkpoints of both layouts load in evaluate."""
    for name in ("a", "b"):
        train(_cfg(tmp_path / name, "--steps", "4", "--run-steps", "2"))
    train(_cfg(tmp_path / "a", "--steps", "4"))
    train(_cfg(tmp_path / "b", "--steps", "4", "--model.scan-layers", "True"))
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in (3, 4)], [a[s] for s in (3, 4)], rtol=1e-5)
    for step in (2, 4):  # step 2 unrolled, step 4 scanned, both read by the run's (scanned) model
        model, *_ = load_run(tmp_path / "b", step)
        assert model.config.scan_layers and "stacks" in nnx.to_pure_dict(nnx.state(model, nnx.Param))
    model_a, *_ = load_run(tmp_path / "a")
    model_b, *_ = load_run(tmp_path / "b")
    assert not model_a.config.scan_layers
    tokens = jnp.asarray(np.arange(40).reshape(2, 20) % 200)
    close(model_b(tokens), model_a(tokens), "logits")


def test_parameters_saved_in_one_layout_restore_into_the_other(tmp_path):
    """``model.init_from`` (e.g. an import's ``init``) saved unrolled, read by a scanned model and
    back; without the model config the other layout is an error naming the folder."""
    cfg = model_config("tiny", num_layers=3, scan_layers=True)
    scanned = nnx.to_pure_dict(nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
    unrolled = nnx.to_pure_dict(nnx.state(CausalLM(unrolled_cfg, rngs=nnx.Rngs(1)), nnx.Param))
    save_params(tmp_path / "unrolled", unrolled)
    restored = restore_params(tmp_path / "unrolled", scanned, cfg)
    jax.tree.map(np.testing.assert_array_equal, restored, convert_layout(unrolled, cfg))
    save_params(tmp_path / "scanned", restored)
    jax.tree.map(np.testing.assert_array_equal, restore_params(tmp_path / "scanned", unrolled, unrolled_cfg), unrolled)
    with pytest.raises(ValueError, match="model.init_from: .*unrolled does not hold this model's parameters"):
        restore_params(tmp_path / "unrolled", scanned)


def _fsdp_step(*args):
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parent / "fsdp_check.py"
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
                         cwd=script.parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fsdp_step_keeps_activations_sharded_by_rows():
    """On a (data=1, fsdp=8, context=1) mesh the step gathers parameters, never whole-batch
    activations (``osdn_jax.activations``). Without the constraints XLA's partitioner all-reduces
    ``[B, T, ...]`` activations of the whole batch on every device and plans more temporaries."""
    pinned, plain = _fsdp_step(), _fsdp_step("plain")
    assert pinned["whole_batch_collectives"] == [], pinned
    assert plain["whole_batch_collectives"], plain  # the check has teeth
    assert pinned["temp"] < 0.6 * plain["temp"], (pinned["temp"], plain["temp"])
