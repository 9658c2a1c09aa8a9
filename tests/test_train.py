"""The training stack: configuration and CLI, optimizer pieces, the step, a whole run, exact resume,
SIGTERM, non-finite steps, 8 fake devices, restore onto another mesh, context parallelism (time
split over a ``context`` mesh axis), and 2 processes."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from osdn_jax import CausalLM, OSGatedDeltaNetConfig, model_config
from osdn_jax.train import data as data_lib
from osdn_jax.train.config import DataConfig, MeshConfig, TrainConfig, load_config_file, parse_args
from osdn_jax.train.evaluate import held_out_loss, load_run
from osdn_jax.train.loop import StopTraining, _check_context, train
from osdn_jax.train.metrics import read_metrics
from osdn_jax.train.optim import decay_mask, learning_rate
from osdn_jax.train.sharding import batch_sharding, check_batch, make_mesh
from osdn_jax.train.step import make_train_step

# A very small run: 1 layer, hidden 64, rows of 64 tokens.
SMALL = ["--model.hidden-size", "64", "--model.num-heads", "2", "--model.num-layers", "1",
         "--data.seq-len", "64", "--data.batch-size", "8", "--eval-batches", "2", "--log.every", "1",
         "--log.progress", "False", "--log.plot", "False", "--sample-tokens", "0", "--optim.warmup-steps", "2",
         "--eval-every", "0"]


def _cfg(tmp_path, *extra) -> TrainConfig:
    return parse_args(["--run-dir", str(tmp_path), *SMALL, *extra])


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def _cli(run_dir, *extra, env=None, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "osdn_jax.train", "--run-dir", str(run_dir), *SMALL, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
                          **kwargs)


# -- configuration -----------------------------------------------------------------------------

def test_help_lists_every_field_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--model.preset", "--data.source", "--optim.lr", "--mesh.fsdp", "--checkpoint.keep",
                 "--dist.coordinator", "--log.every", "--config FILE"):
        assert flag in out, flag
    assert "default: 600" in out


def test_defaults_are_the_readme_main_job():
    """`python -m osdn_jax.train` with no arguments: tiny OSDN on the embedded corpus, byte-level."""
    cfg = parse_args([])
    assert (cfg.model.preset, cfg.data.source, cfg.data.tokenizer) == ("tiny", "embedded", "byte")
    model = cfg.model.build(vocab_size=257, max_seq_len=cfg.data.seq_len)
    assert model.mixer_name == "osdn" and model.compute_dtype == "float32"
    assert cfg.sample_tokens > 0 and cfg.log.plot and cfg.checkpoint.resume


def _cli_error(capsys, *args) -> str:
    """parse_args exits with status 2 and a message naming the problem (tyro's error box)."""
    with pytest.raises(SystemExit) as e:
        parse_args(list(args))
    assert e.value.code == 2
    return " ".join(capsys.readouterr().err.split())


def test_unknown_keys_and_bad_values_fail_early(tmp_path, capsys):
    assert "Unrecognized options: --optim.lrr" in _cli_error(capsys, "--optim.lrr", "1")
    assert "steps: expected >= 1, got 0" in _cli_error(capsys, "--steps", "0")
    assert "DataConfig.source must be one of" in _cli_error(capsys, "--data.source", "web")
    assert "data.batch_size: expected a multiple of optim.grad_accum=3" in _cli_error(
        capsys, "--data.batch-size", "8", "--optim.grad-accum", "3")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim": {"learning_rate": 1.0}}))
    with pytest.raises(ValueError, match=r"optim: unknown keys \['learning_rate'\]"):
        load_config_file(bad)
    with pytest.raises(ValueError, match="only apply to OSDN mixers"):
        parse_args(["--model.mixer", "gdn", "--model.apf", "True"]).model.build(257, 64)
    with pytest.raises(ValueError, match="data.path: no such file"):
        train(parse_args(["--run-dir", str(tmp_path), "--data.source", "text", "--data.path", "/nonexistent"]))
    assert not (tmp_path / "config.json").exists()  # failed before any work


def test_config_file_then_command_line(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"steps": 7, "model": {"preset": "small", "mixer": "gdn"}, "optim": {"lr": 0.01}}))
    cfg = parse_args(["--config", str(f), "--optim.lr", "0.02"])
    assert (cfg.steps, cfg.model.preset, cfg.model.mixer, cfg.optim.lr) == (7, "small", "gdn", 0.02)
    model = cfg.model.build(vocab_size=300, max_seq_len=64)
    assert (model.vocab_size, model.hidden_size, model.mixer_name) == (300, 512, "gdn")


def test_context_mesh_settings_fail_early():
    """``mesh.context`` splits the time axis: it divides ``data.seq_len`` with 4 or more positions
    per device; rows go over ``data`` × ``fsdp`` only."""
    data = DataConfig(batch_size=8, seq_len=64)
    with pytest.raises(ValueError, match="mesh.context: expected >= 1, got 0"):
        MeshConfig(context=0)
    with pytest.raises(ValueError, match="mesh.context: expected a divisor of data.seq_len=64, got 3"):
        TrainConfig(data=data, mesh=MeshConfig(context=3))
    with pytest.raises(ValueError, match=r"mesh.context: expected at most data.seq_len / 4 = 16 .*, got 32"):
        TrainConfig(data=data, mesh=MeshConfig(context=32))
    with pytest.raises(ValueError, match=r"data.batch_size: expected a multiple of mesh.data · mesh.fsdp = 6 "
                                         r"\(rows are split over data × fsdp\), got 8"):
        TrainConfig(data=data, mesh=MeshConfig(data=3, fsdp=2, context=4))
    TrainConfig(data=data, mesh=MeshConfig(data=8, context=16))  # 4 positions per device; rows over data only
    assert parse_args(["--mesh.context", "4"]).mesh.context == 4
    # a short convolution wider than the config's 4 taps needs conv_size - 1 positions per device
    cfg = TrainConfig(data=data, mesh=MeshConfig(context=16))
    model = cfg.model.build(vocab_size=257, max_seq_len=64)
    _check_context(cfg, model)
    wide = dataclasses.replace(model, mixer=dataclasses.replace(model.mixer, conv_size=8))
    with pytest.raises(ValueError, match=r"mesh.context: expected at most data.seq_len / 7 = 9 \(the short "
                                         r"convolution of 8 taps .*got 16"):
        _check_context(cfg, wide)


def test_mesh_has_data_fsdp_context_axes():
    """One device here (8 in ``test_context_mesh_layout_on_eight_devices``): the mesh always has
    the three axes; batches put rows on (data, fsdp) and time on context."""
    mesh = make_mesh(MeshConfig())
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "context": 1}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    assert batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"), "context")
    with pytest.raises(ValueError, match="mesh.fsdp, mesh.context: expected fsdp · context to divide the device "
                                         "count 1, got 1 · 2"):
        make_mesh(MeshConfig(context=2))
    with pytest.raises(ValueError, match=r"mesh.data, mesh.fsdp, mesh.context: expected data · fsdp · context = 1 "
                                         r"devices, got 2 · 1 · 1"):
        make_mesh(MeshConfig(data=2))
    check_batch(3, mesh)


def test_paper_recipes_carry_the_paper_settings():
    from osdn_jax.train.recipes import RECIPES

    assert sorted(RECIPES) == sorted(f"{m}-{s}" for m in ("osdn", "osdn-apf", "deltanet", "gdn")
                                     for s in ("340m", "1.3b"))
    cfg = parse_args(["--recipe", "osdn-340m", "--steps", "5"])
    assert cfg.steps == 5 and cfg.model.preset == "osdn-340m" and cfg.seed == 42
    o = cfg.optim
    assert (o.lr, o.warmup_steps, o.min_lr_ratio, o.grad_clip, o.weight_decay) == (1e-3, 1024, 0.1, 1.0, 0.1)
    assert (cfg.model.compute_dtype, cfg.data.seq_len) == ("bfloat16", 4096)
    big = parse_args(["--recipe=gdn-1.3b"])
    assert big.optim.warmup_steps == 2048 and big.steps * big.data.batch_size * 4096 <= 100e9
    model = big.model.build(vocab_size=32000, max_seq_len=4096)
    assert (model.hidden_size, model.num_layers, model.mixer_name) == (2048, 24, "gdn")
    with pytest.raises(ValueError, match="--recipe"):
        parse_args(["--recipe", "osdn-7b"])
    with pytest.raises(ValueError, match="--config, --recipe"):
        parse_args(["--recipe", "osdn-340m", "--config", "x.json"])


# -- optimizer and step ------------------------------------------------------------------------

@pytest.mark.parametrize("layers", ["stacks", "blocks"])
def test_weight_decay_mask_and_schedule(layers):
    cfg = model_config("tiny", mixer=OSGatedDeltaNetConfig(apf=True), scan_layers=layers == "stacks")
    params = nnx.to_pure_dict(nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    mixer = f"['{layers}'][0]['mixer']"
    assert flat[mixer + "['q_proj']['kernel']"] and flat["['embed']['embedding']"]
    for name in ("['d0']", "['A_log']", "['dt_bias']", "['o_norm']['weight']", "['apf_proj']['bias']"):
        assert not flat[mixer + name], name
    assert not flat["['norm']['weight']"] and not flat[f"['{layers}'][0]['mlp_norm']['weight']"]
    cfg = parse_args(["--optim.lr", "1.0", "--optim.warmup-steps", "10", "--optim.min-lr-ratio", "0.1"]).optim
    lr = learning_rate(cfg, 100)
    assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 1.0) < 1e-6 and abs(float(lr(100)) - 0.1) < 1e-6
    assert 0.1 < float(lr(55)) < 1.0


def _step_inputs():
    model = CausalLM(model_config("tiny", hidden_size=64, num_layers=1), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 512, (4, 17)).astype(np.int32)
    seg = np.repeat(np.array([[1, 2]]), [9, 8], axis=1).repeat(4, 0).astype(np.int32)
    mask = (seg[:, 1:] == seg[:, :-1]).astype(np.float32)
    mask[1, :5] = 0.0  # unequal counts per row: the mean must be over counted targets
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg[:, :-1], "loss_mask": mask}
    return graphdef, params, jax.tree.map(jnp.asarray, batch)


def test_gradient_accumulation_equals_the_full_batch():
    graphdef, params, batch = _step_inputs()
    tx = optax.sgd(1.0)  # the update is the gradient itself
    full = jax.jit(make_train_step(graphdef, tx, 1))(params, tx.init(params), batch)
    accum = jax.jit(make_train_step(graphdef, tx, 2))(params, tx.init(params), batch)
    np.testing.assert_allclose(float(accum[2]["loss"]), float(full[2]["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(accum[0]), jax.tree.leaves(full[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_non_finite_step_is_skipped():
    graphdef, params, batch = _step_inputs()
    params["embed"]["embedding"] = params["embed"]["embedding"].at[batch["inputs"][0, 0]].set(jnp.inf)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    new_params, new_opt, m = jax.jit(make_train_step(graphdef, tx, 1))(params, opt_state, batch)
    assert not bool(m["ok"])
    for a, b in zip(jax.tree.leaves((new_params, new_opt)), jax.tree.leaves((params, opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- whole runs (in process) -------------------------------------------------------------------

def test_a_run_trains_evaluates_checkpoints_and_samples(tmp_path):
    cfg = _cfg(tmp_path, "--steps", "12", "--eval-every", "6", "--log.plot", "True", "--sample-tokens", "8",
               "--optim.lr", "1e-2", "--checkpoint.every", "4", "--checkpoint.keep", "2")
    summary = train(cfg)
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 13))
    assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.5  # the loss falls
    evals = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert summary["eval_ppl"] == pytest.approx(np.exp(evals[-1]["eval_loss"]))
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "8"]
    assert summary["sample"].startswith(cfg.sample_prompt)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["vocab_size"] == 257
    assert (tmp_path / "tokenizer.json").exists()

    # the run directory alone is enough to evaluate and sample later
    model, tokenizer, saved_cfg, step = load_run(tmp_path)
    assert step == 12 and saved_cfg == cfg and tokenizer.vocab_size == model.config.vocab_size
    assert held_out_loss(model, saved_cfg, tokenizer, cfg.eval_batches) == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    with pytest.raises(ValueError, match=r"step: no checkpoint for step 5 .* saved steps are \[8, 12\]"):
        load_run(tmp_path, step=5)


def test_resume_continues_exactly(tmp_path):
    common = ("--steps", "6", "--checkpoint.every", "0", "--optim.lr", "1e-2")
    train(_cfg(tmp_path / "straight", *common))
    first = train(_cfg(tmp_path / "resumed", *common, "--run-steps", "3"))
    assert first["stopped"] == "run_steps" and first["steps"] == 3
    train(_cfg(tmp_path / "resumed", *common))
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7))
    assert [straight[s] for s in range(1, 7)] == [resumed[s] for s in range(1, 7)]  # bitwise


def test_resume_with_per_process_data_state(tmp_path):
    """data_split='documents' keeps each process's iterator state through grain's orbax handler."""
    common = ("--steps", "4", "--checkpoint.every", "0", "--data-split", "documents")
    train(_cfg(tmp_path / "straight", *common))
    train(_cfg(tmp_path / "resumed", *common, "--run-steps", "2"))
    assert any((tmp_path / "resumed" / "checkpoints" / "2").glob("data*"))
    train(_cfg(tmp_path / "resumed", *common))
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")


def test_too_many_non_finite_steps_stop_with_a_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "--steps", "30", "--optim.lr", "1e30", "--optim.warmup-steps", "0",
               "--optim.grad-clip", "0", "--max-bad-steps", "3")
    with pytest.raises(StopTraining, match="3 non-finite steps in a row"):
        train(cfg)
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] <= 30


def test_sigterm_saves_and_exits(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "osdn_jax.train", "--run-dir", str(tmp_path), *SMALL,
                             "--steps", "100000", "--checkpoint.every", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not _losses(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in out
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and saved[0] >= max(_losses(tmp_path))


# -- many devices, other meshes, many processes (subprocesses: the device count is fixed per process) --

def test_eight_devices_and_restore_onto_another_mesh(tmp_path):
    common = ("--steps", "4", "--checkpoint.every", "0", "--optim.lr", "1e-2")
    one = _cli(tmp_path / "one", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    eight = _cli(tmp_path / "eight", *common, "--mesh.cpu-devices", "8", "--mesh.fsdp", "4")
    assert eight.returncode == 0, eight.stderr[-3000:]
    assert "{'data': 2, 'fsdp': 4, 'context': 1}" in eight.stdout
    ref, sharded = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    np.testing.assert_allclose([sharded[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)], rtol=2e-5)

    # 2 steps on a (4, 2) mesh, then the rest restored onto (1, 8) and onto one device
    part = _cli(tmp_path / "moved", *common, "--mesh.cpu-devices", "8", "--mesh.fsdp", "2", "--run-steps", "2")
    assert part.returncode == 0 and "run_steps: saved step 2" in part.stdout, part.stderr[-3000:]
    rest = _cli(tmp_path / "moved", *common, "--mesh.cpu-devices", "8", "--mesh.fsdp", "8", "--run-steps", "1")
    assert rest.returncode == 0 and "resumed from" in rest.stdout, rest.stderr[-3000:]
    last = _cli(tmp_path / "moved", *common)
    assert last.returncode == 0, last.stderr[-3000:]
    moved = _losses(tmp_path / "moved")
    np.testing.assert_allclose([moved[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)], rtol=2e-5)


def test_pallas_kernels_train_on_eight_devices(tmp_path):
    """The kernels (interpret mode, IEEE policy) split over a (data 2 × fsdp 4) mesh inside the
    training step: the same losses as the chunked path on one device."""
    common = ("--steps", "2", "--checkpoint.every", "0", "--optim.lr", "1e-2", "--model.chunk-size", "16")
    one = _cli(tmp_path / "one", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    eight = _cli(tmp_path / "eight", *common, "--model.impl", "pallas", "--model.precision", "ieee",
                 "--mesh.cpu-devices", "8", "--mesh.fsdp", "4")
    assert eight.returncode == 0, eight.stderr[-3000:]
    ref, sharded = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    np.testing.assert_allclose([sharded[s] for s in (1, 2)], [ref[s] for s in (1, 2)], rtol=2e-5)


# -- context parallelism: the time axis of every row split over the `context` mesh axis --------

_LAYOUT_CHECK = """
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from osdn_jax.train.config import MeshConfig
from osdn_jax.train.sharding import check_batch, global_batch, make_mesh
mesh = make_mesh(MeshConfig(fsdp=2, context=2))
assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 2}, mesh.shape
assert [[d.id for d in g] for g in mesh.devices.reshape(-1, 2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
rows = np.arange(8 * 64, dtype=np.int32).reshape(8, 64)
x = global_batch({"inputs": rows}, mesh)["inputs"]
assert x.shape == (8, 64) and x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "context")
np.testing.assert_array_equal(np.asarray(x), rows)
shards = {s.device.id: (s.index[0].start, s.index[1].start, s.data.shape) for s in x.addressable_shards}
assert shards[0] == (0, 0, (2, 32)) and shards[1] == (0, 32, (2, 32)) and shards[7] == (6, 32, (2, 32)), shards
try:
    check_batch(6, mesh)
    raise AssertionError("6 rows over data x fsdp = 4")
except ValueError as e:
    assert "data.batch_size: expected a multiple of mesh.data · mesh.fsdp = 2 · 2 = 4" in str(e), e
print("ok")
"""


def test_context_mesh_layout_on_eight_devices():
    """(data 2, fsdp 2, context 2) on 8 devices: context groups are consecutive devices, each
    shard of a batch is a block of rows × positions, the global array is the batch."""
    out = subprocess.run([sys.executable, "-c", _LAYOUT_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def _short_documents(path):
    """A text corpus of 600 documents of 1-6 words (~20 bytes): rows of 64 byte tokens pack
    several, and documents start anywhere in a row, so across the context devices' blocks."""
    rng = np.random.default_rng(0)
    words = "in the beginning god created heaven and earth light darkness day night water".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(1, 7))) for _ in range(600)) + "\n")
    return path


def _packed_run_args(tmp_path) -> tuple[str, ...]:
    """SMALL on the short-document corpus (after checking that its batches pack documents whose
    boundaries fall inside the blocks of 16 positions that context=4 gives each device)."""
    corpus = _short_documents(tmp_path / "docs.txt")
    args = ("--steps", "4", "--checkpoint.every", "0", "--optim.lr", "1e-2", "--data.source", "text",
            "--data.path", str(corpus))
    data = _cfg(tmp_path, *args).data
    seg = next(data_lib.make_train_iterator(data, data_lib.build_tokenizer(data)))["segment_ids"]
    starts = np.nonzero(np.diff(seg, axis=1) > 0)[1] + 1
    assert seg.max() >= 3 and len(set(starts % 16)) > 4, seg
    return args


def _check_same_losses(run_dir, ref, rtol=2e-5):
    got = _losses(run_dir)
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)], rtol=rtol)


def test_context_parallel_training_matches_one_device(tmp_path):
    """4 steps of packed rows with time split over 4 devices (data 2 × context 4): the losses, the
    final held-out loss of the in-training eval and ``evaluate``'s are one device's; the sample
    at the end runs."""
    args = _packed_run_args(tmp_path)
    one = _cli(tmp_path / "one", *args)
    assert one.returncode == 0, one.stderr[-3000:]
    ctx = _cli(tmp_path / "ctx", *args, "--mesh.cpu-devices", "8", "--mesh.fsdp", "1", "--mesh.context", "4",
               "--sample-tokens", "8")
    assert ctx.returncode == 0, ctx.stderr[-3000:]
    assert "{'data': 2, 'fsdp': 1, 'context': 4}" in ctx.stdout
    ref = _losses(tmp_path / "one")
    _check_same_losses(tmp_path / "ctx", ref)
    summary, ref_summary = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("ctx", "one"))
    np.testing.assert_allclose(summary["eval_loss"], ref_summary["eval_loss"], rtol=2e-5)
    assert summary["sample"].startswith("And God said")
    model, tokenizer, cfg, step = load_run(tmp_path / "ctx")  # python -m osdn_jax.train.evaluate's loader
    assert step == 4 and cfg.mesh.context == 4
    assert held_out_loss(model, cfg, tokenizer, cfg.eval_batches) == pytest.approx(summary["eval_loss"], rel=1e-5)


def test_context_parallel_resume_onto_another_context_size(tmp_path):
    """OS-GDN (gated): 2 steps on (data 2 × context 4), then the rest restored onto (data 2 × fsdp
    2 × context 2): the losses of one device."""
    args = (*_packed_run_args(tmp_path), "--model.mixer", "os_gdn")
    one = _cli(tmp_path / "one", *args)
    assert one.returncode == 0, one.stderr[-3000:]
    part = _cli(tmp_path / "moved", *args, "--mesh.cpu-devices", "8", "--mesh.context", "4", "--run-steps", "2")
    assert part.returncode == 0 and "run_steps: saved step 2" in part.stdout, part.stderr[-3000:]
    assert "os_gdn model" in part.stdout and "{'data': 2, 'fsdp': 1, 'context': 4}" in part.stdout
    rest = _cli(tmp_path / "moved", *args, "--mesh.cpu-devices", "8", "--mesh.fsdp", "2", "--mesh.context", "2")
    assert rest.returncode == 0 and "resumed from" in rest.stdout, rest.stderr[-3000:]
    assert "{'data': 2, 'fsdp': 2, 'context': 2}" in rest.stdout
    _check_same_losses(tmp_path / "moved", _losses(tmp_path / "one"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    common = ("--steps", "3", "--checkpoint.every", "0", "--optim.lr", "1e-2", "--sample-tokens", "4")
    one = _cli(tmp_path / "one", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "osdn_jax.train", "--run-dir", str(tmp_path / "two"), *SMALL,
                               *common, "--dist.enabled", "True", "--dist.coordinator", f"127.0.0.1:{port}",
                               "--dist.num-processes", "2", "--dist.process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outs[0][0]
    ref, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    np.testing.assert_allclose([two[s] for s in range(1, 4)], [ref[s] for s in range(1, 4)], rtol=2e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["sample"] == \
        json.loads((tmp_path / "one" / "summary.json").read_text())["sample"]
