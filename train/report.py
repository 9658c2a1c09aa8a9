"""What the evaluation commands leave behind: a printed table, and a JSON record (plus a plot where
one helps) in ``RUN_DIR/eval/``, named ``<command>-<data name>-step<N>.<ext>``."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

EVAL_DIR = "eval"
_SUFFIXES = (".gz", ".jsonl", ".json", ".txt", ".npy", ".bin")


def data_name(path: str | Path) -> str:
    """A file-name-safe short name for a data path: ``data/fda.jsonl.gz`` -> ``fda``."""
    name = Path(path).name
    while name.endswith(_SUFFIXES):
        name = name[: name.rfind(".")]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "data"


def output_path(run_dir: str | Path, command: str, name: str | None, step: int, suffix: str = ".json",
                out_dir: str | Path | None = None) -> Path:
    """``RUN_DIR/eval/<command>[-<name>]-step<step><suffix>`` (or under ``out_dir``)."""
    folder = Path(out_dir) if out_dir is not None else Path(run_dir) / EVAL_DIR
    stem = f"{command}-{name}" if name else command
    return folder / f"{stem}-step{step}{suffix}"


def write_json(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table; floats with 4 decimals, numeric columns right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(50)`` like the training summary."""
    return math.exp(min(loss, 50.0))


def bucket_midpoints(buckets: list[dict]) -> list[float]:
    """Where to draw position buckets ``{"lo", "hi"}`` on a log axis of position + 1: the geometric
    middle of ``[lo + 1, hi]`` (position p sits on [p, p + 1))."""
    return [((b["lo"] + 1) * b["hi"]) ** 0.5 for b in buckets]


def plot_write_strength(curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Mean write strength against the position in the document (log₂ axis), one line per entry of
    ``curves`` (name -> ``write_strength_by_position`` buckets), into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, buckets in curves.items():
        rows = [b for b in buckets if b["tokens"]]
        ax.plot(bucket_midpoints(rows), [b["mean"] for b in rows], "o-", ms=4, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the document + 1")
    ax.set_ylabel("mean write strength β⟨d, k²⟩")
    ax.set_title(title, fontsize=10)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return save_figure(fig, ax, path)


def save_figure(fig, axes, path: Path) -> Path:
    """A grid on ``axes`` (one axis or an array of them), then ``fig`` written to ``path`` (PNG,
    folders made; through a temporary file, so a reader never sees half a plot) and closed."""
    import matplotlib.pyplot as plt
    import numpy as np

    for ax in np.ravel(axes):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
