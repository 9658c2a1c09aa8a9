"""Preparing a corpus: tokens/s of ``python -m osdn_jax.train.prepare`` per tokenizer, its peak memory at
two corpus sizes, and the time to the first training step on the prepared folder against the
``jsonl`` source of the same documents. Prints tables (docs/data.md holds a run of it).

    python benchmarks/prepare_data.py                     # 200 MB and 50 MB of Parquet, every core
    python benchmarks/prepare_data.py --mb 20 5 --tokenizers byte --skip-first-step   # a quick look

The corpus is generated here (nothing is downloaded): documents of 50 to 1,500 Zipf-distributed words
(the embedded KJV text's ~12,000 words, plus 30,000 made-up words and 10,000 numbers for a long tail),
about 6 KB on average, written as Parquet files of 20 MB with row groups of 1,000 rows, and the same
documents as one JSONL file. Its vocabulary is still smaller than web text's, so tokenizers that cache
words (HF BPE, tiktoken) run faster here than on FineWeb.

Each prepare runs in a fresh process (``--workers`` processes under it, default every core).
Peak RSS: the preparing process's own and its largest worker's, each its ``VmHWM`` (peak since its
exec) read from /proc every 20 ms. The BPE row trains its tokenizer first (``--bpe-sample-mb`` of text) and says how long
that took; tokens/s counts the tokenizing only. Time to first step: ``python -m osdn_jax.train --steps 1``
on the ``tiny`` preset with 1 row of 256 tokens; the step-1 row's ``elapsed_s`` (from the start of
``train()``: reading the data, building the model, compiling, one step). First batch: a fresh process
from its first look at the data to the first training batch (tokenizer, documents, split, packing),
imports excluded. Index size: a prepared folder of 1M and 10M short documents (made here in prepare's
format), a fresh process's time and peak RSS to its first batch of 8 rows of 4,096.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_RUN = """
import json, sys, time
from osdn_jax.train.prepare import PrepareConfig, prepare
cfg = PrepareConfig(**json.loads(sys.argv[1]))
t = time.perf_counter()
s = prepare(cfg, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": s["num_tokens"], "docs": s["num_documents"],
                  "tokens_per_s": s["tokens_per_s"], "dtype": s["dtype"]}))
"""


def _hwm_mb(pid: int) -> float | None:
    """Peak resident memory of a process since its exec (VmHWM; ``ru_maxrss`` would carry over the
    parent's peak from before the exec)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def run_watched(cmd: list[str]) -> tuple[str, float, float]:
    """Runs ``cmd``; returns its stdout, its own peak RSS and the largest peak RSS of its children (MB),
    read from /proc every 20 ms while they run."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    main_mb, child_mb = 0.0, 0.0
    while proc.poll() is None:
        main_mb = max(main_mb, _hwm_mb(proc.pid) or 0.0)
        for kid in _children(proc.pid):
            child_mb = max(child_mb, _hwm_mb(kid) or 0.0)
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(err[-3000:])
    return out, main_mb, child_mb


def make_corpus(folder: Path, mb: float, seed: int = 0, file_mb: float = 20) -> tuple[Path, Path, int]:
    """Parquet files (``folder/parquet``) and one JSONL file of the same documents; returns both and the
    document count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from osdn_jax.train.sources import embedded_text

    rng = np.random.default_rng(seed)
    words = sorted(set(re.findall(r"[A-Za-z']+", embedded_text())))
    # a long tail as web text has (names, numbers, rare words): 40,000 made-up words and numbers
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words += ["".join(rng.choice(letters, size=int(rng.integers(3, 12)))) for _ in range(30000)]
    words += [str(int(x)) for x in rng.integers(0, 100000, size=10000)]
    words = np.array(words)
    rank = rng.permutation(len(words))
    p = 1.0 / (1.0 + rank) ** 1.05
    p /= p.sum()
    (folder / "parquet").mkdir(parents=True, exist_ok=True)
    jsonl = folder / "corpus.jsonl"
    total, n_docs, part = 0, 0, 0
    with open(jsonl, "w") as out:
        while total < mb * 1e6:
            docs, size = [], 0
            while size < file_mb * 1e6 and total + size < mb * 1e6:
                n = int(rng.integers(50, 1500))
                text = " ".join(words[rng.choice(len(words), size=n, p=p)])
                text = ". ".join(text[i:i + 120].capitalize() for i in range(0, len(text), 120))
                docs.append(text)
                size += len(text)
            pq.write_table(pa.table({"text": docs}), folder / "parquet" / f"part-{part:04d}.parquet",
                           row_group_size=1000)
            out.writelines(json.dumps({"text": d}) + "\n" for d in docs)
            total, n_docs, part = total + size, n_docs + len(docs), part + 1
    return folder / "parquet", jsonl, n_docs


def run_prepare(corpus: Path, out: Path, **settings) -> dict:
    cfg = {"corpus": str(corpus), "out": str(out), **settings}
    out, main_mb, worker_mb = run_watched([sys.executable, "-c", _RUN, json.dumps(cfg)])
    return {**json.loads(out.strip().splitlines()[-1]), "rss_self_mb": main_mb, "rss_worker_mb": worker_mb}


_FIRST_BATCH = """
import json, sys, time
t = time.perf_counter()
from osdn_jax.train import data as data_lib
t_import = time.perf_counter()
cfg = data_lib.DataConfig(**json.loads(sys.argv[1]))
it, _ = data_lib.make_process_data(cfg, data_lib.build_tokenizer(cfg), "rows", 1)
next(it)
print(time.perf_counter() - t_import)
"""


def first_batch_s(**data) -> float:
    """Seconds from a fresh process's first look at the data to its first training batch (imports excluded)."""
    res = subprocess.run([sys.executable, "-c", _FIRST_BATCH, json.dumps({"seq_len": 256, "batch_size": 1, **data})],
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return float(res.stdout.strip().splitlines()[-1])


_BIG_INDEX = """
import json, sys, time
from pathlib import Path
hwm = lambda: next(int(l.split()[1]) / 1024 for l in Path("/proc/self/status").read_text().splitlines()
                   if l.startswith("VmHWM:"))
from osdn_jax.train import data as data_lib
rss0 = hwm()
t = time.perf_counter()
cfg = data_lib.DataConfig(source="shards", path=sys.argv[1], seq_len=4096, batch_size=8, eval_fraction=0.005)
it, _ = data_lib.make_process_data(cfg, data_lib.build_tokenizer(cfg), "rows", 1)
next(it)
print(json.dumps({"seconds": time.perf_counter() - t, "rss_mb": hwm(), "rss_imports_mb": rss0}))
"""


def big_index(folder: Path, num_docs: int) -> dict:
    """A prepared folder of ``num_docs`` short documents (2-8 tokens: the index is what is measured), in
    prepare's format; then a fresh process's time and peak RSS to its first batch of 8 x 4096."""
    from osdn_jax.train import shards
    from osdn_jax.train.tokenizer import ByteTokenizer

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, size=num_docs)
    ends = np.cumsum(lengths + 1) - 1
    tokens = rng.integers(0, 256, size=int(ends[-1]) + 1).astype(np.uint16)
    tokens[ends] = 256
    (folder / shards.SHARD_DIR).mkdir(parents=True)
    tokens.tofile(folder / shards.SHARD_DIR / "00000.bin")
    np.save(folder / shards.DOCUMENTS_FILE, np.stack([np.zeros(num_docs, np.int64), ends - lengths, ends], 1))
    held = shards.heldout_documents(0, num_docs, 0.005)
    np.save(folder / shards.HELDOUT_FILE, held)
    tok = ByteTokenizer()
    (folder / "tokenizer.json").write_text(json.dumps(tok.to_dict()))
    (folder / shards.INDEX_FILE).write_text(json.dumps({
        "format": shards.FORMAT, "dtype": "uint16", "eos_id": tok.eos_id, "vocab_size": tok.vocab_size,
        "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint}, "eval_fraction": 0.005,
        "num_documents": num_docs, "num_tokens": int(lengths.sum()), "heldout_documents": len(held),
        "max_tokens": None, "input": {}, "shards": [{"name": "00000", "length": len(tokens), "documents": num_docs}]}))
    res = subprocess.run([sys.executable, "-c", _BIG_INDEX, str(folder)], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def first_step_s(run_dir: Path, *data_flags: str) -> tuple[float, float]:
    """(elapsed_s of step 1 from the run's metrics, wall seconds of the whole command)."""
    cmd = [sys.executable, "-m", "osdn_jax.train", "--run-dir", str(run_dir), "--steps", "1", "--log.every", "1",
           "--log.progress", "False", "--log.plot", "False", "--sample-tokens", "0", "--eval-batches", "1",
           "--checkpoint.every", "0", "--data.seq-len", "256", "--data.batch-size", "1", *data_flags]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["elapsed_s"] for r in rows if r["kind"] == "train" and r["step"] == 1), wall


def _table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[(f"{c:,.2f}" if c < 10 else f"{c:,.1f}") if isinstance(c, float) else f"{c:,}" if isinstance(c, int) else str(c)
                         for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, nargs=2, default=[200, 50], help="the large and the small corpus (MB)")
    ap.add_argument("--tokenizers", nargs="+", default=["byte", "bpe", "tiktoken"])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--bpe-vocab-size", type=int, default=32000)
    ap.add_argument("--bpe-sample-mb", type=float, default=20)
    ap.add_argument("--skip-first-step", action="store_true")
    ap.add_argument("--index-docs", type=int, nargs="*", default=[1_000_000, 10_000_000],
                    help="also time the first batch from prepared folders of this many (tiny) documents")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, deleted)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.dir or tmp)
        print(f"# {os.cpu_count()} cores, --workers {args.workers}; corpora {args.mb[0]:g} MB and {args.mb[1]:g} MB")
        corpora = {}
        for mb in args.mb:
            t = time.perf_counter()
            corpora[mb] = make_corpus(work / f"corpus-{mb:g}", mb)
            print(f"# generated {mb:g} MB: {corpora[mb][2]:,} documents in {time.perf_counter() - t:.0f} s")

        rows, folders = [], {}
        big, small = args.mb
        for name in args.tokenizers:
            settings = {"tokenizer": name, "workers": args.workers}
            if name == "bpe":  # trained once on the small corpus, then given by path (so both sizes share it)
                t = time.perf_counter()
                run_prepare(corpora[small][0], work / "bpe-train", tokenizer="bpe", workers=1, max_tokens=1,
                            bpe_vocab_size=args.bpe_vocab_size, bpe_sample_bytes=int(args.bpe_sample_mb * 1e6))
                print(f"# BPE ({args.bpe_vocab_size} ids) trained on {args.bpe_sample_mb:g} MB in "
                      f"{time.perf_counter() - t:.0f} s (one process)")
                settings = {"tokenizer_path": str(work / "bpe-train"), "workers": args.workers}
            for mb in args.mb:
                out = work / f"out-{name}-{mb:g}"
                r = run_prepare(corpora[mb][0], out, **settings)
                folders[(name, mb)] = out
                rows.append([name, f"{mb:g}", r["docs"], r["tokens"], r["dtype"], r["seconds"], r["tokens_per_s"],
                             r["tokens_per_s"] / args.workers, r["rss_self_mb"], r["rss_worker_mb"]])
        print()
        _table(["tokenizer", "MB", "documents", "tokens", "dtype", "prepare s", "tokens/s", "tokens/s/core",
                "peak RSS main MB", "peak RSS worker MB"], rows)

        if args.index_docs:
            print()
            index_rows = []
            for n in args.index_docs:
                r = big_index(work / f"index-{n}", n)
                index_rows.append([n, r["seconds"], r["rss_imports_mb"], r["rss_mb"]])
            _table(["documents in the folder", "first batch s", "RSS after imports MB", "peak RSS MB"], index_rows)

        if args.skip_first_step:
            return
        print()
        steps = []
        for name in [t for t in ("byte", "bpe") if t in args.tokenizers]:
            out = folders[(name, big)]
            tok_flags = ["--data.tokenizer", "bpe", "--data.tokenizer-path", str(out)] if name == "bpe" else []
            s_shards, w_shards = first_step_s(work / f"run-shards-{name}", "--data.source", "shards",
                                              "--data.path", str(out), *tok_flags[:2])
            s_jsonl, w_jsonl = first_step_s(work / f"run-jsonl-{name}", "--data.source", "jsonl", "--data.path",
                                            str(corpora[big][1]), *tok_flags)
            tok = {"tokenizer": "bpe", "tokenizer_path": str(out)} if name == "bpe" else {}
            b_shards = first_batch_s(source="shards", path=str(out), **{k: v for k, v in tok.items() if k == "tokenizer"})
            b_jsonl = first_batch_s(source="jsonl", path=str(corpora[big][1]), **tok)
            steps.append([name, f"{big:g}", b_shards, b_jsonl, s_shards, s_jsonl, s_jsonl / s_shards, w_shards, w_jsonl])
        _table(["tokenizer", "MB", "first batch s (shards)", "first batch s (jsonl)", "first step s (shards)",
                "first step s (jsonl)", "jsonl / shards", "command s (shards)", "command s (jsonl)"], steps)


if __name__ == "__main__":
    main()
