"""What a training run logs besides metrics.jsonl: TensorBoard scalars (the same rows, a resumed
run's stale points purged), MFU (``osdn_jax.flops``: FLOPs per token and the device peak table),
and ``--profile.steps`` traces (``jax.profiler``)."""

import dataclasses
import json
import shutil
import struct

import jax
import numpy as np
import pytest

from osdn_jax.flops import PEAK_TFLOPS, device_peak_flops, flops_per_token
from osdn_jax.mixers import DeltaNetConfig
from osdn_jax.model import ModelConfig
from osdn_jax.train.config import LogConfig, ProfileConfig, parse_args
from osdn_jax.train.loop import train
from osdn_jax.train.metrics import MetricsWriter, read_metrics
from osdn_jax.train.run_dir import KEPT_FIELDS

# A very small run (as tests/test_train.py's): 1 layer, hidden 64, rows of 64 tokens.
SMALL = ["--model.hidden-size", "64", "--model.num-heads", "2", "--model.num-layers", "1",
         "--data.seq-len", "64", "--data.batch-size", "8", "--eval-batches", "2", "--log.every", "1",
         "--log.progress", "False", "--log.plot", "False", "--sample-tokens", "0", "--optim.warmup-steps", "2"]


def _train(run_dir, *extra) -> dict:
    return train(parse_args(["--run-dir", str(run_dir), *SMALL, *extra]))


# -- reading TensorBoard event files (TFRecord framing of tensorboardX's Event protos) -----------

def _records(path):
    """The records of a TFRecord file: 8-byte little-endian length, its crc, the data, its crc."""
    data, i = path.read_bytes(), 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        yield data[i + 12:i + 12 + n]
        i += 12 + n + 4
    assert i == len(data), f"{path}: truncated record"


def _events(tb_dir) -> list:
    """Every Event of the run's event files, file by file in the order they were started."""
    from tensorboardX.proto import event_pb2

    files = []
    for path in tb_dir.glob("events.out.tfevents.*"):
        events = [event_pb2.Event.FromString(r) for r in _records(path)]
        files.append((events[0].wall_time, path.name, events))
    return [e for *_, events in sorted(files) for e in events]


def _scalars(tb_dir, purge: bool = True) -> dict[tuple[str, int], float]:
    """``{(tag, step): value}`` as TensorBoard shows them: a ``SessionLog.START`` at step s (a
    ``purge_step``) hides the points read before it at steps >= s; a later point replaces one of
    the same tag and step (``purge=False``: every point, a duplicate step raises)."""
    from tensorboardX.proto.event_pb2 import SessionLog

    points: dict[tuple[str, int], float] = {}
    for e in _events(tb_dir):
        if e.HasField("session_log") and e.session_log.status == SessionLog.START and purge:
            points = {k: v for k, v in points.items() if k[1] < e.step}
        for value in e.summary.value:
            key = (value.tag, e.step)
            assert purge or key not in points, f"{key} written twice"
            points[key] = value.simple_value
    return points


def _rows_as_scalars(run_dir) -> dict[tuple[str, int], float]:
    """The ``train`` / ``eval`` rows of metrics.jsonl as ``{(kind/field, step): value}``."""
    out = {}
    for row in read_metrics(run_dir):
        if row["kind"] in ("train", "eval"):
            out.update({(f"{row['kind']}/{k}", row["step"]): v for k, v in row.items() if k not in ("kind", "step")})
    return out


def _same_to_float32(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.float32(a[k]) == np.float32(b[k]) for k in a)


# -- one run: TensorBoard, MFU, a profile ------------------------------------------------------

PEAK_TFLOPS_FLAG = 0.5


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """4 steps, evaluated at 2 and 4, a metrics row each step, a peak given (so MFU on a CPU),
    steps 2 to 3 profiled."""
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    summary = _train(run_dir, "--steps", "4", "--eval-every", "2", "--log.peak-tflops", str(PEAK_TFLOPS_FLAG),
                     "--profile.steps", "2:3")
    return run_dir, summary


def test_tensorboard_holds_the_metrics_rows(logged_run):
    """Every numeric field of every train / eval row, tagged ``<kind>/<field>`` at the row's step,
    and nothing else; the file is closed at the end of the run."""
    run_dir, _ = logged_run
    rows = _rows_as_scalars(run_dir)
    assert {k for k, _ in rows} >= {"train/loss", "train/grad_norm", "train/lr", "train/tokens", "train/tokens_per_s",
                                    "train/skipped_steps", "train/mfu", "train/elapsed_s", "eval/eval_loss",
                                    "eval/eval_ppl", "eval/eval_targets"}
    assert sorted({s for (t, s) in rows if t == "eval/eval_loss"}) == [2, 4]
    assert _same_to_float32(_scalars(run_dir / "tensorboard", purge=False), rows)


def test_mfu_rows_are_flops_times_throughput_over_the_peak(logged_run):
    run_dir, summary = logged_run
    model = ModelConfig.from_dict(json.loads((run_dir / "config.json").read_text())["model"])
    per_token = flops_per_token(model, 64)
    train_rows = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert len(train_rows) == 4
    for row in train_rows:
        expected = per_token * row["tokens_per_s"] / (PEAK_TFLOPS_FLAG * 1e12 * jax.device_count())
        assert row["mfu"] == pytest.approx(expected, rel=1e-12)
    assert 0 < summary["mfu"] < 1  # tokens/s of the rows after the first (which holds the compile)
    assert json.loads((run_dir / "summary.json").read_text())["mfu"] == summary["mfu"]


def test_profile_steps_write_a_trace(logged_run):
    run_dir, summary = logged_run
    traces = list((run_dir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list(traces[0].parent.glob("*.trace.json.gz"))
    assert summary["profile"] == str(traces[0].parent)


# -- without a peak, without TensorBoard -------------------------------------------------------

def test_no_peak_no_mfu_and_tensorboard_off(tmp_path):
    """On a CPU with no ``--log.peak-tflops`` the peak is unknown: no ``mfu`` anywhere.
    ``--log.tensorboard False`` writes no event file; no profile unless asked."""
    summary = _train(tmp_path, "--steps", "2", "--eval-every", "0", "--log.tensorboard", "False")
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(rows) == 2 and not any("mfu" in r for r in rows)
    assert "mfu" not in summary and "profile" not in summary
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "profile").exists()


# -- a resumed run -----------------------------------------------------------------------------

def test_resumed_run_purges_the_interrupted_points(tmp_path):
    """A run interrupted after step 4's row but before its checkpoint (resumes from step 2): the
    JSONL drops rows 3 and 4 and the new event file's ``purge_step`` 3 hides their old points, so
    TensorBoard shows exactly the JSONL rows; the old points are still in the first file."""
    first = _train(tmp_path, "--steps", "6", "--run-steps", "4", "--checkpoint.every", "2", "--eval-every", "0")
    assert first["stopped"] == "run_steps"
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if killed before the checkpoint of step 4
    _train(tmp_path, "--steps", "6", "--checkpoint.every", "2", "--eval-every", "0")
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    with pytest.raises(AssertionError, match=r"\('train/loss', 3\) written twice"):
        _scalars(tmp_path / "tensorboard", purge=False)
    shown = _scalars(tmp_path / "tensorboard")
    assert sorted({s for (t, s) in shown if t == "train/loss"}) == [1, 2, 3, 4, 5, 6]
    assert _same_to_float32(shown, _rows_as_scalars(tmp_path))


def test_starting_over_moves_tensorboard_and_profile_aside(tmp_path):
    (tmp_path / "tensorboard").mkdir(parents=True)
    (tmp_path / "tensorboard" / "events.out.tfevents.1.old").write_bytes(b"")
    (tmp_path / "profile").mkdir()
    _train(tmp_path, "--steps", "1", "--eval-every", "0", "--checkpoint.resume", "False")
    previous = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1 and (previous[0] / "tensorboard" / "events.out.tfevents.1.old").is_file()
    assert (previous[0] / "profile").is_dir() and not (tmp_path / "profile").exists()
    assert "events.out.tfevents.1.old" not in [p.name for p in (tmp_path / "tensorboard").iterdir()]


# -- MetricsWriter alone -----------------------------------------------------------------------

def test_metrics_writer_sends_numeric_fields_of_step_rows(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write({"kind": "config", "step": 0, "changes": {"steps": [1, 2]}})
    writer.write({"kind": "train", "step": 3, "loss": 1.5, "tokens": 7, "note": "x", "flag": True, "nan": None})
    writer.write({"kind": "eval", "step": 3, "eval_loss": 2.25})
    writer.close()
    writer.close()  # idempotent
    assert _scalars(tmp_path / "tensorboard") == {("train/loss", 3): 1.5, ("train/tokens", 3): 7.0,
                                                  ("eval/eval_loss", 3): 2.25}
    assert len(read_metrics(tmp_path)) == 3
    MetricsWriter(tmp_path / "off", enabled=False, tensorboard=True).write({"kind": "train", "step": 1})
    assert not (tmp_path / "off").exists()  # other processes write nothing


# -- configuration -----------------------------------------------------------------------------

def test_profile_steps_are_checked(capsys):
    assert ProfileConfig("2:3").window == (2, 3) and ProfileConfig("5:5").window == (5, 5)
    assert ProfileConfig().window is None
    for bad in ("3:2", "x", "0:1", "2", "1:2:3", "-1:2"):
        with pytest.raises(ValueError, match=r"profile.steps: expected 'A:B' with 1 <= A <= B"):
            ProfileConfig(bad)
        with pytest.raises(SystemExit) as e:
            parse_args(["--profile.steps", bad])
        assert e.value.code == 2 and "profile.steps" in capsys.readouterr().err
    assert parse_args(["--profile.steps", "10:12"]).profile.window == (10, 12)
    assert not any(f.startswith("profile") for f in KEPT_FIELDS)  # a resume may change it


def test_peak_tflops_is_checked():
    with pytest.raises(ValueError, match="log.peak_tflops: expected None or > 0, got 0"):
        LogConfig(peak_tflops=0)
    assert parse_args(["--log.peak-tflops", "989"]).log.peak_tflops == 989.0
    assert parse_args([]).log.tensorboard and parse_args([]).log.peak_tflops is None


def test_help_lists_the_logging_flags(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--log.tensorboard", "--log.peak-tflops", "--profile.steps"):
        assert flag in out, flag


# -- FLOPs per token and the peak table --------------------------------------------------------

TINY = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, mixer=DeltaNetConfig(chunk_size=16),
                   compute_dtype="float32", max_seq_len=64)


def test_flops_per_token_by_hand():
    """TINY: hidden 16, 2 DeltaNet layers of 2 heads (K = V = 8), SwiGLU width 256, vocab 64."""
    block = (16  # mixer norm
             + 3 * 16 * 16  # q, k, v projections
             + 3 * 4 * 16  # short convolutions (4 taps)
             + 16 * 2  # β projection
             + 8  # per-head output norm
             + 16 * 16  # output projection
             + 16  # MLP norm
             + 3 * 16 * 256)  # SwiGLU
    matmul = 2 * block + 16 + 16 * 64  # blocks, final norm, LM head (not the embedding)
    delta_rule = 2 * 2 * 3 * (6 * 8 * 8 + 4 * 16 * 8 + 4 * 16 * 8)  # layers × heads × 3(6KV + 4CK + 4CV)
    assert flops_per_token(TINY, 64) == 6 * matmul + delta_rule == 186048
    # rows shorter than a chunk: C = T
    assert flops_per_token(TINY, 8) == 6 * matmul + 2 * 2 * 3 * (6 * 64 + 4 * 8 * 8 * 2)

    # tied embeddings: the embedding is the LM head's matmul; layer 1 softmax attention (2 heads of 8)
    hybrid = dataclasses.replace(TINY, tie_embeddings=True, attention_layers=(1,))
    attention_block = 16 + 4 * 16 * 16 + 16 + 3 * 16 * 256  # norms, q k v o, SwiGLU
    matmul = block + attention_block + 16 + 64 * 16
    attention = 2 * 3 * 2 * 2 * (64 / 2) * 8  # heads × 3 · 2 · 2 · (T/2) · D
    delta_rule = 2 * 3 * (6 * 8 * 8 + 4 * 16 * 8 + 4 * 16 * 8)
    assert flops_per_token(hybrid, 64) == 6 * matmul + delta_rule + attention == 182352


def test_device_peak_table():
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12  # SXM
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494e12
    assert device_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert device_peak_flops("NVIDIA H100 PCIe", "float32") == 378e12
    assert device_peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert device_peak_flops("NVIDIA H200", "float32") == 494e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert device_peak_flops("NVIDIA A100 80GB PCIe", "float32") == 156e12
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "float16") == 989e12
    assert device_peak_flops("cpu", "float32") is None
    assert device_peak_flops("TFRT_CPU_0", "bfloat16") is None
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "int8") is None
    assert all(set(peaks) == {"bfloat16", "float32"} for _, peaks in PEAK_TFLOPS)
