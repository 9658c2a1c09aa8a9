"""A run directory is hard to break (issue 13): a resume that would change the model or the data is
refused with one message and nothing written; a damaged checkpoint falls back to the older kept
one; metrics keep one row per step after a crash; a finished run says so; a failed start leaves the
directory as it was."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from osdn_jax.train.config import load_config_file, parse_args
from osdn_jax.train.evaluate import load_run
from osdn_jax.train.loop import train
from osdn_jax.train.metrics import METRICS_FILE, read_metrics
from osdn_jax.train.optim import learning_rate

# As tests/test_train.py: 1 layer, hidden 64, rows of 64 tokens.
SMALL = ["--model.hidden-size", "64", "--model.num-heads", "2", "--model.num-layers", "1",
         "--data.seq-len", "64", "--data.batch-size", "8", "--eval-batches", "2", "--log.every", "1",
         "--log.progress", "False", "--log.plot", "False", "--sample-tokens", "0", "--optim.warmup-steps", "2",
         "--eval-every", "0", "--checkpoint.every", "0"]


def _cfg(run_dir, *extra):
    return parse_args(["--run-dir", str(run_dir), *SMALL, *extra])


def _cli(run_dir, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "osdn_jax.train", "--run-dir", str(run_dir), *SMALL, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))


def _snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> content hash): equal snapshots, nothing written."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _raw_rows(run_dir) -> list[dict]:
    """``metrics.jsonl`` as written (``read_metrics`` keeps one row per kind and step)."""
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]


def _steps(run_dir) -> list[str]:
    return sorted((p.name for p in (run_dir / "checkpoints").iterdir()), key=lambda n: (len(n), n))


def _damage(run_dir, step: int) -> None:
    """Truncates the largest data file of ``step``'s parameters (OCDBT reads then fail)."""
    files = sorted((run_dir / "checkpoints" / str(step) / "params").rglob("ocdbt.process_0/d/*"),
                   key=lambda p: p.stat().st_size)
    os.truncate(files[-1], 100)


# -- 1. a resume that changes the model or the data ---------------------------------------------------------

def test_changed_model_is_refused_then_allowed_changes_are_recorded_then_start_over(tmp_path):
    run = tmp_path / "g"
    train(_cfg(run, "--model.mixer", "gdn", "--steps", "2"))
    before = _snapshot(run)

    out = _cli(run, "--steps", "3", "--data.seq-len", "32")  # the default mixer: osdn
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    err = out.stderr.strip()
    assert "model.mixer 'gdn' -> not given (the preset's value)" in err and "data.seq_len 64 -> 32" in err, err
    assert "--run-dir" in err and "--checkpoint.resume False" in err and f"--config {run}/config.json" in err
    assert _snapshot(run) == before  # config.json, metrics and checkpoints untouched
    model, _, saved, step = load_run(run)
    assert model.config.mixer_name == "gdn" and saved.steps == 2 and step == 2

    # allowed changes (steps, the learning rate) continue the run and are recorded
    train(_cfg(run, "--model.mixer", "gdn", "--steps", "3", "--optim.lr", "1e-2"))
    config_rows = [r for r in _raw_rows(run) if r["kind"] == "config"]
    assert config_rows == [{"kind": "config", "step": 2, "changes": {"steps": [2, 3], "optim.lr": [0.003, 0.01]}}]
    saved = json.loads((run / "config.json").read_text())
    assert (saved["train"]["steps"], saved["train"]["optim"]["lr"], saved["model"]["mixer"]["name"]) == (3, 0.01, "gdn")

    # --checkpoint.resume False starts over in place; the old run is kept aside
    train(_cfg(run, "--steps", "2", "--checkpoint.resume", "False"))
    previous = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1
    assert sorted(p.name for p in previous[0].iterdir()) == ["checkpoints", "config.json", METRICS_FILE,
                                                              "summary.json", "tensorboard", "tokenizer.json"]
    assert _steps(previous[0]) == ["2", "3"] and _steps(run) == ["2"]
    assert json.loads((previous[0] / "config.json").read_text())["model"]["mixer"]["name"] == "gdn"
    assert [r["step"] for r in _raw_rows(run) if r["kind"] == "train"] == [1, 2]
    model, _, _, step = load_run(run)
    assert model.config.mixer_name == "osdn" and step == 2


# -- 2. a damaged checkpoint --------------------------------------------------------------------------------

def test_damaged_checkpoint_falls_back_to_the_older_one(tmp_path, capsys):
    run = tmp_path / "d"
    train(_cfg(run, "--steps", "4", "--checkpoint.every", "2"))
    first = {r["step"]: r["loss"] for r in _raw_rows(run) if r["kind"] == "train"}
    _damage(run, 4)
    capsys.readouterr()

    # evaluation reads the newest readable checkpoint too, and says which one it skipped
    _, _, _, step = load_run(run)
    err = " ".join(capsys.readouterr().err.split())
    assert step == 2 and "checkpoint step 4 cannot be read" in err and "using step 2 instead" in err, err

    summary = train(_cfg(run, "--steps", "5", "--checkpoint.every", "2"))
    err = " ".join(capsys.readouterr().err.split())
    assert "checkpoint step 4 cannot be read" in err and "resuming from step 2" in err, err
    assert f"moved it to {run / 'checkpoints' / '4.damaged'}" in err, err
    assert summary["steps"] == 5
    assert _steps(run) == ["2", "4", "5", "4.damaged"]  # a new step 4 is saved beside the damaged one
    again = {r["step"]: r["loss"] for r in _raw_rows(run) if r["kind"] == "train"}
    assert [r["step"] for r in _raw_rows(run) if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert [again[s] for s in (1, 2, 3, 4)] == [first[s] for s in (1, 2, 3, 4)]  # step 2 resumed exactly

    # no readable checkpoint at all: one error naming each step, nothing moved
    for step in (2, 4, 5):
        _damage(run, step)
    before = _snapshot(run)
    with pytest.raises(ValueError) as e:
        train(_cfg(run, "--steps", "6", "--checkpoint.every", "2"))
    message = str(e.value)
    assert "no checkpoint in" in message and "can be read" in message, message
    assert all(f"step {s}:" in message for s in (2, 4, 5)) and "--checkpoint.resume False" in message
    assert "\n" not in message
    assert _snapshot(run) == before


def test_runs_recorded_with_an_ignored_data_path_still_load(tmp_path):
    """Before ``data.path`` was checked, a run could record the embedded source with a path (which it
    never read); such a run's config.json still loads, resumes and evaluates."""
    run = tmp_path / "old"
    train(_cfg(run, "--steps", "1"))
    saved = json.loads((run / "config.json").read_text())
    saved["train"]["data"]["path"] = "/nonexistent/corpus"
    (run / "config.json").write_text(json.dumps(saved))
    _, _, cfg, step = load_run(run)
    assert step == 1 and cfg.data.source == "embedded" and cfg.data.path is None
    assert load_config_file(run / "config.json").data.path is None


# -- 3. metrics after a crash -------------------------------------------------------------------------------

def test_metrics_keep_one_row_per_step_after_a_crash(tmp_path):
    run = tmp_path / "m"
    train(_cfg(run, "--steps", "4", "--checkpoint.every", "2"))
    # a crash after step 4's rows were written but before its checkpoint: the newest checkpoint is 2
    for p in sorted((run / "checkpoints" / "4").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (run / "checkpoints" / "4").rmdir()
    train(_cfg(run, "--steps", "4", "--checkpoint.every", "2"))
    rows = _raw_rows(run)
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), keys
    assert [s for k, s in keys if k == "train"] == [1, 2, 3, 4] and [s for k, s in keys if k == "eval"] == [4]


def test_read_metrics_keeps_the_last_row_per_kind_and_step(tmp_path):
    rows = [{"kind": "train", "step": 1, "loss": 5.0}, {"kind": "train", "step": 2, "loss": 4.0},
            {"kind": "eval", "step": 2, "eval_loss": 4.5}, {"kind": "train", "step": 2, "loss": 3.9},
            {"kind": "train", "step": 3, "loss": 3.5}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(tmp_path) == [rows[0], rows[3], rows[2], rows[4]]


# -- 4. rerunning a finished run ----------------------------------------------------------------------------

def test_finished_run_says_so_and_more_steps_continue_it(tmp_path):
    run = tmp_path / "f"
    train(_cfg(run, "--steps", "2"))
    before = _snapshot(run)
    out = _cli(run, "--steps", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"run_dir {run} is finished: its newest checkpoint is step 2 (--steps 2)" in out.stdout, out.stdout
    assert _snapshot(run) == before  # no new rows, checkpoint or summary

    cfg = _cfg(run, "--steps", "3")
    summary = train(cfg)
    assert summary["steps"] == 3 and _steps(run) == ["2", "3"]
    rows = _raw_rows(run)
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("eval", 2), ("config", 2),
                                                     ("train", 3), ("eval", 3)]
    assert rows[3]["changes"] == {"steps": [2, 3]}
    assert rows[4]["lr"] == pytest.approx(float(learning_rate(cfg.optim, 3)(2)))  # the 3-step schedule


# -- 5. failed starts ---------------------------------------------------------------------------------------

def test_failed_starts_leave_the_run_dir_as_it_was(tmp_path):
    run = tmp_path / "x5"
    with pytest.raises(ValueError, match="unknown model preset 'nosuch'"):
        train(_cfg(run, "--model.preset", "nosuch"))
    assert not run.exists()

    empty = tmp_path / "corpus"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="has no documents"):
        train(_cfg(kept, "--data.source", "text", "--data.path", str(empty)))
    assert _snapshot(kept) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}

    # the failed start left no tokenizer behind: another tokenizer is fine
    summary = train(_cfg(run, "--steps", "1", "--data.tokenizer", "bpe", "--data.bpe-vocab-size", "300"))
    assert summary["steps"] == 1 and json.loads((run / "tokenizer.json").read_text())["kind"] == "bpe"
