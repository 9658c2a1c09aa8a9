"""Small language models, one per mixer, on the embedded corpus: held-out perplexity, the recall
residual ratio and the write strength by position in the document side by side.

    python benchmarks/lm_recall_ratio.py [--steps 400] [--out runs/lm] [--mixers deltanet gdn osdn ...]

Trains (or resumes) ``<out>-<mixer>`` with ``python -m osdn_jax.train`` (the ``tiny`` preset), then
runs ``evaluate sample`` (held-out loss), ``evaluate ratio`` and ``evaluate strength`` on the corpus,
prints two tables and writes ``<out>-strength.png`` (every mixer's write strength by position) and
``<out>-summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import osdn_jax.train

CORPUS = Path(osdn_jax.train.__file__).parent / "corpus" / "kjv.txt.gz"
MIXERS = {  # name: training flags
    "deltanet": ["--model.mixer", "deltanet"],
    "gdn": ["--model.mixer", "gdn"],
    "osdn": ["--model.mixer", "osdn"],
    "osdn-apf": ["--model.mixer", "osdn", "--model.apf", "True"],
    "osdn-d1": ["--model.mixer", "osdn", "--model.osdn-preset", "apr-d1"],
    "os_gdn": ["--model.mixer", "os_gdn"],
    "attention": ["--model.mixer", "attention"],
}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default="runs/lm")
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=list(MIXERS))
    p.add_argument("--ratio-batches", type=int, default=8)
    args = p.parse_args()
    py = sys.executable
    rows = []
    for m in args.mixers:
        run_dir = f"{args.out}-{m}"
        run([py, "-m", "osdn_jax.train", *MIXERS[m], "--run-dir", run_dir, "--steps", str(args.steps),
             "--eval-every", "0", "--sample-tokens", "0", "--log.progress", "False"])
        run([py, "-m", "osdn_jax.train.evaluate", "sample", run_dir, "--tokens", "0"])
        sample = json.loads(max(Path(run_dir, "eval").glob("sample-*.json")).read_text())
        row = {"mixer": m, "held_out_loss": sample["loss"], "ppl": math.exp(sample["loss"])}
        if m != "attention":
            run([py, "-m", "osdn_jax.train.evaluate", "ratio", run_dir, "--data", str(CORPUS),
                 "--max-batches", str(args.ratio_batches), "--no-progress"])
            ratio = json.loads(max(Path(run_dir, "eval").glob("ratio-*.json")).read_text())
            row.update(ratio=ratio["overall"], per_layer=ratio["per_layer"])
            run([py, "-m", "osdn_jax.train.evaluate", "strength", run_dir, "--data", str(CORPUS),
                 "--max-batches", str(args.ratio_batches), "--no-progress"])
            strength = json.loads(max(Path(run_dir, "eval").glob("strength-*.json")).read_text())
            row.update(strength=strength["buckets"], d0=strength["d0"])
        rows.append(row)
    Path(f"{args.out}-summary.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1) + "\n")
    print(f"\n| mixer | held-out loss | perplexity | recall residual ratio | per layer |  ({args.steps} steps, tiny)")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['ratio']:.4f}" if "ratio" in r else "—"
        layers = ", ".join(f"{x:.3f}" for x in r.get("per_layer", []))
        print(f"| {r['mixer']} | {r['held_out_loss']:.4f} | {r['ppl']:.2f} | {ratio} | {layers} |")

    print_strength(rows, args.steps, Path(f"{args.out}-strength.png"))


def print_strength(rows: list[dict], steps: int, png: Path) -> None:
    """The write strength table (mean over heads and layers, by position in the document; the
    learned d0's mean over layers) and the plot of every mixer's curve."""
    from osdn_jax.train.report import plot_write_strength

    rows = [r for r in rows if "strength" in r]
    if not rows:
        return
    spans = [(b["lo"], b["hi"]) for b in rows[0]["strength"]]
    print("\n| mixer | " + " | ".join(f"w at [{lo}, {hi})" for lo, hi in spans) + " | learned d0 (mean) |")
    print("|---|" + "---|" * (len(spans) + 1))
    for r in rows:
        d0 = f"{sum(x['mean'] for x in r['d0']) / len(r['d0']):.3f}" if r["d0"] else "—"
        print(f"| {r['mixer']} | " + " | ".join(f"{b['mean']:.3f}" for b in r["strength"]) + f" | {d0} |")
    plot_write_strength({r["mixer"]: r["strength"] for r in rows}, png,
                        f"tiny LMs, {steps} steps: write strength by position in the document")
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
