"""What the evaluation commands leave behind: a printed table, and a JSON record (plus a plot where
one helps) in ``RUN_DIR/eval/``, named ``<command>-<data name>-step<N>.<ext>``."""

from __future__ import annotations

import json
import math
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
