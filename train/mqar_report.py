"""The MQAR grid's report: the table (accuracy per seed, mean ± std), learning curves and write
strength by position, for one grid or side by side for several (e.g. a cold and a warm study).

    python -m osdn_jax.train.mqar_report runs/mqar runs/mqar-warm --labels cold warm --out-dir runs/compare

reads each directory's ``results.jsonl`` and writes ``NAME.md`` (the tables), ``NAME.png`` (held-out
accuracy against training steps) and ``NAME_strength.png`` (write strength by position) in
``--out-dir``, NAME being ``--name`` (default ``mqar_compare``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from osdn_jax.train.mqar import MIXERS, best_per_cell, read_results
from osdn_jax.train.report import bucket_midpoints, save_figure

# A cell of the grid: (width, L, N); a study's rows are grouped by it and by mixer.
GridCell = tuple[int, int, int]


def _mixers(rows: list[dict]) -> list[str]:
    names = {r["mixer"] for r in rows}
    return [m for m in MIXERS if m in names]


def _cells(rows: list[dict]) -> list[GridCell]:
    return sorted({(r["width"], r["seq_len"], r["num_pairs"]) for r in rows})


def _runs(rows: list[dict], mixer: str, cell: GridCell) -> list[dict]:
    """The best-lr run of each seed of ``mixer`` in ``cell``, by seed."""
    best = best_per_cell(rows)
    return [best[k] for k in sorted(best) if k[0] == mixer and (k[1], k[2], k[3]) == cell]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def pair_strength(row: dict) -> float | None:
    """Mean write strength over a row's key-value pairs (positions ``[P, P + 2N)``): the row's
    ``pair_strength``, or for rows written before it existed (cold runs) the token-weighted mean of
    its position buckets inside ``[0, 2N)``; None for attention."""
    if row.get("pair_strength"):
        return row["pair_strength"]["mean"]
    if not row.get("write_strength") or row["budget"].get("prefix", 0):
        return None
    inside = [b for b in row["write_strength"] if b["hi"] <= 2 * row["num_pairs"] and b["tokens"]]
    return sum(b["mean"] * b["tokens"] for b in inside) / sum(b["tokens"] for b in inside) if inside else None


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"


def table(rows: list[dict]) -> str:
    """A markdown table, one line per mixer and width: held-out accuracy (best lr) per seed, its
    mean ± std over seeds, the write strength over the pairs (mean over seeds), the learned d0
    (mean over layers and seeds) and the recall residual ratio (mean over seeds), per (L, N)."""
    pairs = sorted({(c[1], c[2]) for c in _cells(rows)})
    seeds = sorted({r["seed"] for r in rows})
    head = "| mixer | width |"
    for L, N in pairs:
        head += "".join(f" L={L} N={N} seed {s} |" for s in seeds)
        head += f" L={L} N={N} mean ± std | write strength at the pairs | learned d0 | residual ratio |"
    lines = [head + " best lr |", "|" + "---|" * (head.count("|"))]
    for m in _mixers(rows):
        for w in sorted({r["width"] for r in rows if r["mixer"] == m}):
            cells, lrs = [], []
            for L, N in pairs:
                runs = {r["seed"]: r for r in _runs(rows, m, (w, L, N))}
                cells += [f"{runs[s]['accuracy']:.3f}" if s in runs else "—" for s in seeds]
                lrs += [f"{r['lr']:g}" for r in runs.values()]
                accs = [r["accuracy"] for r in runs.values()]
                cells.append(_fmt(*mean_std(accs), len(accs)) if accs else "—")
                strength = [s for s in map(pair_strength, runs.values()) if s is not None]
                d0 = [np.mean([x["mean"] for x in r["d0"]]) for r in runs.values() if r.get("d0")]
                ratio = [r["residual_ratio"] for r in runs.values() if "residual_ratio" in r]
                cells += [f"{np.mean(v):.3f}" if v else "—" for v in (strength, d0, ratio)]
            lines.append(f"| {m} | {w} | " + " | ".join(cells) + " | " + ", ".join(dict.fromkeys(lrs)) + " |")
    return "\n".join(lines)


def _panels(studies: dict[str, list[dict]], height: float = 3.6):
    """A figure with one panel per study × cell, and the ``(label, rows, cell, axis)`` of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({c for rows in studies.values() for c in _cells(rows)})
    fig, axes = plt.subplots(len(cells), len(studies), figsize=(5.2 * len(studies), height * len(cells)),
                             squeeze=False, sharey=True)
    panels = []
    for i, cell in enumerate(cells):
        for j, (label, rows) in enumerate(studies.items()):
            prefix = {r["budget"].get("prefix", 0) for r in rows}
            title = f"MQAR L={cell[1]}, N={cell[2]}, width {cell[0]}"
            extra = [label] if label else []
            extra += [f"{p} filler tokens first" for p in prefix if p]
            axes[i][j].set_title(title + ("\n" + ", ".join(extra) if extra else ""), fontsize=9)
            panels.append((label, rows, cell, axes[i][j]))
    return fig, axes, panels


def _color(mixer: str) -> str:
    """The same color for a mixer in every panel and plot."""
    return f"C{list(MIXERS).index(mixer) % 10}"


def _save(fig, axes, path: Path) -> Path:
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, axes, path)


def plot_curves(studies: dict[str, list[dict]], path: Path) -> Path | None:
    """Held-out accuracy against training steps, one line per mixer (mean over seeds, the band
    spans the seeds' min to max), one panel per study and cell. A run without a recorded curve
    shows as its final accuracy."""
    if not any(studies.values()):
        return None
    fig, axes, panels = _panels(studies)
    for _, rows, cell, ax in panels:
        for m in _mixers(rows):
            runs = _runs(rows, m, cell)
            curves = [r["curve"] or [[r["steps"], r["accuracy"]]] for r in runs]
            steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
            if not steps:
                continue
            acc = np.array([[dict(c)[s] for s in steps] for c in curves])  # [seeds, steps]
            line, = ax.plot(steps, acc.mean(0), "o-", ms=3, color=_color(m), label=f"{m} ({len(runs)} seeds)")
            if len(runs) > 1:
                ax.fill_between(steps, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_ylim(-0.02, 1.02)
    for row in axes:
        row[0].set_ylabel("held-out accuracy")
    return _save(fig, axes, path)


def plot_strength(studies: dict[str, list[dict]], path: Path) -> Path | None:
    """Mean write strength ``β⟨d, k²⟩`` against the position (log₂ axis), one line per delta-rule
    mixer (mean over seeds, band: min to max), one panel per study and cell; the key-value pairs'
    positions are shaded."""
    if not any(r.get("write_strength") for rows in studies.values() for r in rows):
        return None
    fig, axes, panels = _panels(studies)
    for _, rows, cell, ax in panels:
        for m in _mixers(rows):
            runs = [r for r in _runs(rows, m, cell) if r.get("write_strength")]
            if not runs:
                continue
            buckets = [b for b in runs[0]["write_strength"] if b["tokens"]]
            mid = bucket_midpoints(buckets)
            w = np.array([[b["mean"] for b in r["write_strength"] if b["tokens"]] for r in runs])
            line, = ax.plot(mid, w.mean(0), "o-", ms=3, color=_color(m), label=m)
            if len(runs) > 1:
                ax.fill_between(mid, w.min(0), w.max(0), color=line.get_color(), alpha=0.15)
        prefix = rows[0]["budget"].get("prefix", 0)
        ax.axvspan(prefix + 1, prefix + 2 * cell[2] + 1, color="0.5", alpha=0.15, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position + 1 (shaded: the key-value pairs)")
    for row in axes:
        row[0].set_ylabel("mean write strength β⟨d, k²⟩")
    return _save(fig, axes, path)


def write_reports(out: Path, rows: list[dict]) -> str:
    """The grid's own report in ``out``: ``results.md``, ``mqar.png`` (learning curves) and
    ``strength.png`` (write strength by position). Returns the table."""
    text = table(rows)
    tmp = out / "results.md.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, out / "results.md")
    plot_curves({"": rows}, out / "mqar.png")
    plot_strength({"": rows}, out / "strength.png")
    return text


def compare(dirs: list[Path], labels: list[str], out_dir: Path, name: str = "mqar_compare") -> str:
    """Several grids side by side: one table per grid in ``out_dir/NAME.md``, the learning curves in
    ``NAME.png`` and the write strength in ``NAME_strength.png`` (a column of panels per grid)."""
    studies = {}
    for d, label in zip(dirs, labels):
        rows = read_results(d / "results.jsonl")
        if not rows:
            raise ValueError(f"dirs: no runs in {d / 'results.jsonl'}")
        budgets = {json.dumps(r["budget"], sort_keys=True) for r in rows}
        if len(budgets) > 1:
            raise ValueError(f"dirs: {d / 'results.jsonl'} holds runs of {len(budgets)} different budgets; "
                             "expected one grid's runs")
        studies[label] = rows
    text = "\n\n".join(f"**{label}** ({d}):\n\n{table(rows)}" for d, (label, rows) in zip(dirs, studies.items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(text + "\n")
    plot_curves(studies, out_dir / f"{name}.png")
    plot_strength(studies, out_dir / f"{name}_strength.png")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m osdn_jax.train.mqar_report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="grid output directories (each with results.jsonl)")
    p.add_argument("--labels", nargs="+", help="a name per directory (default: the directory names)")
    p.add_argument("--out-dir", type=Path, required=True, help="where the tables and plots go")
    p.add_argument("--name", default="mqar_compare", help="file name stem of the outputs")
    args = p.parse_args(argv)
    labels = args.labels or [d.name for d in args.dirs]
    if len(labels) != len(args.dirs):
        p.error(f"--labels: expected one per directory ({len(args.dirs)}), got {len(labels)}")
    try:
        print(compare(args.dirs, labels, args.out_dir, args.name))
    except ValueError as e:
        print(f"mqar_report: {e}", file=sys.stderr)
        return 2
    stem = args.out_dir / args.name
    print(f"mqar_report: wrote {stem}.md, {stem}.png and {stem}_strength.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
