"""Run metrics: ``metrics.jsonl`` (one JSON object per line) and the loss / perplexity plot.

    python -m osdn_jax.train.metrics RUN_DIR    # (re)draws RUN_DIR/loss.png at any time
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from osdn_jax.train.run_dir import write_atomic

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsWriter:
    """Appends rows to ``<run_dir>/metrics.jsonl`` (process 0 only: pass ``enabled=False`` elsewhere)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


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
