"""Run metrics: ``metrics.jsonl`` (one JSON object per line), the same rows as TensorBoard scalars
(``tensorboard/``, written with tensorboardX), and the loss / perplexity plot.

    python -m osdn_jax.train.metrics RUN_DIR    # (re)draws RUN_DIR/loss.png at any time
    tensorboard --logdir RUN_DIR                # (pip install tensorboard) the scalars, live
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from osdn_jax.train.run_dir import write_atomic

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = ("kind", "step")


class MetricsWriter:
    """Appends rows to ``<run_dir>/metrics.jsonl`` (process 0 only: pass ``enabled=False`` elsewhere).

    With ``tensorboard``, every row with a ``kind`` and a ``step`` (but ``config`` rows) also goes to
    TensorBoard event files in ``<run_dir>/tensorboard``: each numeric field as the scalar
    ``<kind>/<field>`` at the row's step (``train/loss``, ``eval/eval_ppl``...). ``purge_step``
    (a resumed run: its step + 1) hides the points an interrupted invocation wrote from there on,
    as ``keep_rows_until`` drops its rows. Each row is flushed; ``close()`` ends the event file.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False,
                 purge_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            # a unique, time-ordered file name: two invocations in one second on one host would share
            # tensorboardX's name (seconds and host) and the second would overwrite the first
            self._tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge_step, flush_secs=1,
                                     filename_suffix=f".{time.time_ns()}")

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self._tb is not None:
                self._write_scalars(row)

    def _write_scalars(self, row: dict) -> None:
        kind, step = row.get("kind"), row.get("step")
        if kind in (None, "config") or not isinstance(step, int):
            return
        for field, value in row.items():
            if field not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{kind}/{field}", value, global_step=step)
        self._tb.flush()

    def close(self) -> None:
        """Writes out and closes the TensorBoard event file (the JSONL needs nothing)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl``, one per (kind, step): a later row replaces an earlier one in
    its place (a run resumed before its rows were trimmed wrote some steps twice)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows: dict[object, dict] = {}
    for i, row in enumerate(_rows(path)):
        key = (row.get("kind"), row["step"]) if "step" in row else i
        rows[key] = row
    return list(rows.values())


def keep_rows_until(run_dir: str | Path, step: int) -> int:
    """Drops the rows past ``step`` (a resumed run writes them again); the file is replaced whole.
    Returns how many were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    rows = _rows(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) < len(rows):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(rows) - len(kept)


def plot(run_dir: str | Path) -> Path | None:
    """Draws train loss and held-out perplexity against step into ``<run_dir>/loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in evals], [math.exp(min(v, 50.0)) for _, v in evals], "s--", color="tab:red",
                 label="held-out perplexity")
        ax2.set_ylabel("perplexity")
        ax2.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend(loc="upper right")
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / PLOT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m osdn_jax.train.metrics",
                                     description="Redraws RUN_DIR/loss.png from RUN_DIR/metrics.jsonl and prints "
                                                 "its path.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's directory")
    run_dir = parser.parse_args().run_dir
    out = plot(run_dir)
    print(out or f"{run_dir}: no metrics yet")
