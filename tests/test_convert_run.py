"""``python -m osdn_jax.convert``: import an fla folder into a run directory, fine-tune it with the
trainer, evaluate it, export it back; the command line and its errors."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from osdn_jax.convert import load_fla, save_fla
from osdn_jax.convert.run import export_run, import_run
from osdn_jax.mixers import DeltaNetConfig
from osdn_jax.model import CausalLM, ModelConfig
from osdn_jax.train.config import load_config_file, parse_args
from osdn_jax.train.evaluate import load_run
from osdn_jax.train.loop import train
from osdn_jax.train.metrics import read_metrics

QUIET = ["--log.progress", "False", "--log.plot", "False", "--sample-tokens", "4", "--eval-every", "0",
         "--eval-batches", "1", "--data.batch-size", "2", "--optim.warmup-steps", "1", "--log.every", "1"]


@pytest.fixture(scope="module")
def fla_folder(tmp_path_factory):
    """An fla checkpoint of a small DeltaNet (vocab 300: the byte tokenizer fits, ids 257.. unused)."""
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, mixer=DeltaNetConfig(),
                      compute_dtype="float32")
    folder = tmp_path_factory.mktemp("fla") / "deltanet"
    save_fla(CausalLM(cfg, rngs=nnx.Rngs(3)), folder, dtype="bfloat16")
    return folder


def test_import_finetune_evaluate_export(tmp_path, fla_folder):
    run_dir = import_run(fla_folder, tmp_path / "run", as_osdn=True, tokenizer="byte", compute_dtype="float32",
                         seq_len=32)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "fla_config.json", "init", "model.json",
                                                         "tokenizer.json"]
    imported, _ = load_fla(fla_folder, as_osdn=True)
    model, tok, _, step = load_run(run_dir)  # no checkpoint yet: the imported parameters
    assert step == 0 and tok.kind == "byte" and model.config.mixer.name == "osdn"
    tokens = jnp.arange(40).reshape(2, 20)
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(imported(tokens)))

    # Fine-tune: starts from the imported parameters (the first loss is theirs), then resumes normally.
    cfg = parse_args(["--config", str(run_dir / "config.json"), "--steps", "2", *QUIET])
    assert cfg.model.config_path == "model.json" and cfg.model.init_from == "init"
    summary = train(cfg)
    first = [r for r in read_metrics(run_dir) if r["kind"] == "train"][0]
    batch = next(iter(_first_batch(cfg, tok)))
    want = _loss(imported, batch)
    assert abs(first["loss"] - want) < 1e-4
    assert summary["steps"] == 2
    train(parse_args(["--config", str(run_dir / "config.json"), "--steps", "3", *QUIET]))
    tuned, _, _, step = load_run(run_dir)
    assert step == 3

    dest, step = export_run(run_dir, tmp_path / "out", dtype="float32")
    assert step == 3
    config = json.loads((dest / "config.json").read_text())
    assert config["model_type"] == "osdn_jax_osdn" and config["osdn_preset"] == "may" and config["osdn_d0_init"] == 1.0
    again, _ = load_fla(dest)
    for a, b in zip(jax.tree.leaves(nnx.state(tuned, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _first_batch(cfg, tok):
    from osdn_jax.train import data as data_lib

    it = data_lib.make_train_iterator(cfg.data, tok, 0, 1)
    yield next(it)


def _loss(model, batch) -> float:
    from osdn_jax.train.step import loss_sums

    graphdef, params = nnx.split(model, nnx.Param)
    total, count = loss_sums(graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()})
    return float(total / count)


def test_run_config_file_is_a_config(tmp_path, fla_folder):
    run_dir = import_run(fla_folder, tmp_path / "run", tokenizer="byte")
    cfg = load_config_file(run_dir / "config.json")
    assert cfg.model.config_path == "model.json" and cfg.data.tokenizer == "byte"
    with pytest.raises(ValueError, match=r"model: \['hidden_size'\] cannot change the model of config_path"):
        parse_args(["--config", str(run_dir / "config.json"), "--model.hidden-size", "64"]).model.build(
            257, 32, run_dir)


def test_cli_import_errors_and_nothing_written(tmp_path, fla_folder):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "osdn_jax.convert", *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    out = cli("import", fla_folder, tmp_path / "run")  # the folder has no tokenizer.json
    assert out.returncode == 2 and "has no tokenizer.json; pass --tokenizer" in out.stderr
    assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == []
    out = cli("import", tmp_path / "missing", tmp_path / "run", "--tokenizer", "byte")
    assert out.returncode == 2 and "is not a folder" in out.stderr
    out = cli("inspect", fla_folder, "--as", "osdn")
    assert out.returncode == 0 and json.loads(out.stdout)["mixer"]["preset"] == "may"
    out = cli("import", fla_folder, tmp_path / "run", "--tokenizer", "byte")
    assert out.returncode == 0, out.stderr
    out = cli("import", fla_folder, tmp_path / "run", "--tokenizer", "byte")
    assert out.returncode == 2 and "already exists and is not an empty folder" in out.stderr
    out = cli("export", tmp_path / "run", tmp_path / "dn", "--as", "deltanet")
    assert out.returncode == 2 and "OSDN mixer" in out.stderr
    out = cli("export", tmp_path / "run", tmp_path / "fla", "--max-shard-size", "30KB")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "fla" / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fla", "run"]
