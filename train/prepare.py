"""Tokenize a corpus once into a prepared folder of shards (``train/shards.py``), in parallel.

    python -m osdn_jax.train.prepare CORPUS --out DIR [--tokenizer byte|bpe|tiktoken | --tokenizer-path P]
                                     [--workers N] [--max-tokens N] [--eval-fraction F]
    (also installed as ``osdn-prepare``)

CORPUS is a file or a folder of Parquet (``--text-column``), JSONL(.gz) or text(.txt, .txt.gz) files.
Documents are the trainer's (``sources.py``): blank text is dropped, JSONL records and Parquet rows
are one document each, text files split at blank lines (``--doc-split file``: one per file).

Work: each JSONL or text file is one unit, each Parquet file is cut into units of whole row groups of
about ``--unit-bytes`` uncompressed text. Units run in ``--workers`` processes, each streamed (a
record batch or a line at a time, tokenized in batches of ~4 MB), so peak memory does not grow with
the corpus. A unit's shard is written under a temporary name and renamed whole; its record
(``NAME.json``) is written last, so a rerun keeps every finished shard and a killed run loses only the
units in flight. The index (``index.json``, written last of all) lists the shards in corpus order, the
document offsets, the tokenizer and the held-out documents (the trainer's evenly spaced rule over the
corpus order, fixed here for every run).

``--max-tokens N`` keeps the first documents of the corpus (in order) until they hold N tokens or
more; units past that point are not tokenized at all.
"""

from __future__ import annotations

import argparse
import array
import collections
import dataclasses
import json
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from osdn_jax.train import shards, sources
from osdn_jax.train.run_dir import write_atomic
from osdn_jax.train.tokenizer import KINDS as TOKENIZER_KINDS, TIKTOKEN_ENCODINGS, TOKENIZER_FILE
from osdn_jax.train.tokenizer import ByteTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer, train_bpe

PROG = "python -m osdn_jax.train.prepare"
INPUT_SUFFIXES = {"parquet": (".parquet",), "jsonl": sources.JSONL_SUFFIXES, "text": sources.TEXT_SUFFIXES}
_BATCH_CHARS = 4 << 20  # characters of text tokenized per call
_BATCH_DOCS = 4096


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What to read, how to tokenize it and where the shards go.

    corpus:            a file, or a folder searched recursively for the ``source``'s files.
    out:               the prepared folder (created; a rerun resumes it).
    source:            "parquet", "jsonl" or "text"; None: from the files' suffixes.
    text_column:       Parquet column / JSONL field holding the text.
    doc_split:         text files: "blank_line" or "file".
    tokenizer:         "byte", "bpe" (trained here on a sample of the training documents) or "tiktoken";
                       None: byte, or the kind of ``tokenizer_path``.
    tokenizer_path:    a tokenizer to use instead: a run directory, our ``tokenizer.json`` or a Hugging
                       Face ``tokenizer.json`` (its EOS from a ``tokenizer_config.json`` beside it).
    bpe_vocab_size:    ids of a trained BPE (EOS included).
    bpe_sample_bytes:  UTF-8 bytes of training documents (the first ones, in corpus order) the BPE
                       is trained on.
    tiktoken_encoding: "cl100k_base" or "o200k_base".
    eval_fraction:     share of documents held out (the trainer's evenly spaced rule).
    max_tokens:        keep the first documents until they hold this many tokens; None: all.
    workers:           processes; None: every core.
    unit_bytes:        uncompressed Parquet bytes per unit of work (whole row groups).
    """

    corpus: str
    out: str
    source: str | None = None
    text_column: str = "text"
    doc_split: str = "blank_line"
    tokenizer: str | None = None
    tokenizer_path: str | None = None
    bpe_vocab_size: int = 4096
    bpe_sample_bytes: int = 256 << 20
    tiktoken_encoding: str = "cl100k_base"
    eval_fraction: float = 0.05
    max_tokens: int | None = None
    workers: int | None = None
    unit_bytes: int = 256 << 20

    def __post_init__(self):
        def bad(flag: str, value, need: str):
            raise ValueError(f"--{flag}: expected {need}, got {value!r}")

        if self.source is not None and self.source not in INPUT_SUFFIXES:
            bad("source", self.source, f"one of {tuple(INPUT_SUFFIXES)}")
        if not self.text_column:
            bad("text-column", self.text_column, "a non-empty name")
        if self.doc_split not in ("blank_line", "file"):
            bad("doc-split", self.doc_split, "blank_line or file")
        if self.tokenizer is not None and self.tokenizer not in TOKENIZER_KINDS:
            bad("tokenizer", self.tokenizer, f"one of {TOKENIZER_KINDS}")
        if self.bpe_vocab_size < 257:
            bad("bpe-vocab-size", self.bpe_vocab_size, "an int >= 257 (256 bytes + EOS)")
        if self.bpe_sample_bytes < 1:
            bad("bpe-sample-bytes", self.bpe_sample_bytes, "an int >= 1")
        if self.tiktoken_encoding not in TIKTOKEN_ENCODINGS:
            bad("tiktoken-encoding", self.tiktoken_encoding, f"one of {TIKTOKEN_ENCODINGS}")
        if not 0.0 <= self.eval_fraction < 1.0:
            bad("eval-fraction", self.eval_fraction, "a number in [0, 1)")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max-tokens", self.max_tokens, "an int >= 1")
        if self.workers is not None and self.workers < 1:
            bad("workers", self.workers, "an int >= 1")
        if self.unit_bytes < 1:
            bad("unit-bytes", self.unit_bytes, "an int >= 1")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One shard's worth of input: a whole JSONL / text file, or whole row groups of a Parquet file."""

    name: str
    path: str
    kind: str
    row_groups: tuple[int, ...] | None = None


# ---------------------------------------------------------------------------------------------
# Input: files, units, documents


def input_files(cfg: PrepareConfig) -> tuple[str, list[Path]]:
    """``(source kind, files in corpus order)``; errors name the corpus path."""
    p = Path(cfg.corpus)
    if not p.exists():
        raise ValueError(f"corpus: {p} does not exist")
    try:
        kind = cfg.source or sources.infer_kind(p, INPUT_SUFFIXES, "Parquet / JSONL / text files")
    except ValueError as e:
        raise ValueError(f"corpus: {e}") from None
    try:
        files = sources.list_files(p, INPUT_SUFFIXES[kind])
    except ValueError as e:
        raise ValueError(f"corpus: {str(e).removeprefix('path: ')}") from None
    return kind, files


def plan_units(kind: str, files: list[Path], cfg: PrepareConfig) -> list[Unit]:
    """Units in corpus order. Parquet files are opened here, so a damaged file or a missing column
    fails before any work starts."""
    units = []
    for i, f in enumerate(files):
        if kind != "parquet":
            units.append(Unit(f"{i:05d}", str(f), kind))
            continue
        sizes = sources.parquet_row_groups(f, cfg.text_column)
        groups: list[list[int]] = [[]]
        acc = 0
        for rg, size in enumerate(sizes):
            if groups[-1] and acc + size > cfg.unit_bytes:
                groups.append([])
                acc = 0
            groups[-1].append(rg)
            acc += size
        units += [Unit(f"{i:05d}-{j:04d}", str(f), kind, tuple(g)) for j, g in enumerate(groups) if g]
    return units


def unit_documents(unit: Unit, text_column: str, doc_split: str) -> Iterator[str]:
    """The documents of one unit, streamed."""
    path = Path(unit.path)
    if unit.kind == "parquet":
        return sources.iter_parquet_documents(path, text_column, unit.row_groups)
    if unit.kind == "jsonl":
        return sources.iter_jsonl_documents(path, text_column)
    return sources.iter_text_documents(path, doc_split)


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# One unit -> one shard (runs in a worker process)


def _input_stat(path: str) -> list[int]:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def _shard_files(out: Path, name: str) -> tuple[Path, Path, Path]:
    d = out / shards.SHARD_DIR
    return d / f"{name}.bin", d / f"{name}.lengths.npy", d / f"{name}.json"


def prepare_unit(unit: Unit, out: Path, tok: Tokenizer, settings: dict[str, Any], cap: int | None,
                 report: Callable[[int, int], None]) -> dict[str, Any]:
    """Tokenize ``unit`` into ``out/shards/NAME.bin`` (+ lengths, + record last); returns the record.

    ``cap``: stop once the unit holds that many tokens (the corpus cut cannot need more of it).
    ``report(documents, tokens)`` is called after every batch.
    """
    bin_path, len_path, rec_path = _shard_files(out, unit.name)
    dtype = np.dtype(settings["dtype"]).newbyteorder("<")
    eos = np.array([tok.eos_id], np.int32)  # ids are int32: the concatenation stays int32
    lengths = array.array("q")  # 8 bytes per document
    tokens, truncated = 0, False
    tmp = bin_path.with_name(bin_path.name + ".tmp")
    with open(tmp, "wb") as fh:
        for texts in _batches(unit_documents(unit, settings["text_column"], settings["doc_split"])):
            ids = tok.encode_batch(texts)
            fh.write(np.concatenate([x for d in ids for x in (d, eos)]).astype(dtype).tobytes())
            n = [len(d) for d in ids]
            lengths.extend(n)
            tokens += sum(n)
            report(len(n), sum(n))
            if cap is not None and tokens >= cap:
                truncated = True
                break
    os.replace(tmp, bin_path)
    tmp = len_path.with_name(len_path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.frombuffer(lengths, np.int64) if lengths else np.zeros(0, np.int64), allow_pickle=False)
    os.replace(tmp, len_path)
    record = {"unit": dataclasses.asdict(unit), "input": _input_stat(unit.path), "settings": settings,
              "cap": cap, "truncated": truncated, "documents": len(lengths), "tokens": tokens,
              "length": tokens + len(lengths)}
    write_atomic(rec_path, json.dumps(record))
    return record


def finished_record(unit: Unit, out: Path, settings: dict[str, Any], cap: int | None) -> dict[str, Any] | None:
    """The record of ``unit``'s shard if it is finished, made from this input with these settings, and
    holds what a cut at ``cap`` needs; else None (the unit is made again)."""
    bin_path, len_path, rec_path = _shard_files(out, unit.name)
    if not (rec_path.is_file() and bin_path.is_file() and len_path.is_file()):
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except json.JSONDecodeError:
        return None
    if (rec.get("unit") != json.loads(json.dumps(dataclasses.asdict(unit))) or rec.get("settings") != settings
            or rec.get("input") != _input_stat(unit.path)):
        return None
    if bin_path.stat().st_size != rec["length"] * np.dtype(settings["dtype"]).itemsize:
        return None
    if rec["truncated"] and (cap is None or rec["cap"] < cap):
        return None
    return rec


_WORKER: dict[str, Any] = {}


def _init_worker(out: str, progress: Any) -> None:
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core per worker for HF tokenizers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(out=Path(out), tok=load_tokenizer(Path(out) / TOKENIZER_FILE), progress=progress)


def _run_unit(unit: Unit, settings: dict[str, Any], cap: int | None) -> dict[str, Any]:
    progress = _WORKER["progress"]
    return prepare_unit(unit, _WORKER["out"], _WORKER["tok"], settings, cap, lambda d, t: progress.put((d, t)))


# ---------------------------------------------------------------------------------------------
# The tokenizer and the settings record


def make_tokenizer(cfg: PrepareConfig, kind: str, files: list[Path], out: Path) -> Tokenizer:
    """The corpus's tokenizer, saved as ``out/tokenizer.json``. A BPE is trained on the first
    ``bpe_sample_bytes`` of training documents (held-out ones skipped), unless a rerun finds it saved."""
    saved = out / TOKENIZER_FILE
    if cfg.tokenizer_path is not None:
        tok = load_tokenizer(cfg.tokenizer_path)
    elif cfg.tokenizer in ("byte", None):
        tok = ByteTokenizer()
    elif cfg.tokenizer == "tiktoken":
        tok = TiktokenTokenizer(cfg.tiktoken_encoding)
    elif saved.is_file():
        return load_tokenizer(saved)  # the settings record matched: trained by an earlier run
    else:
        tok = train_bpe(_bpe_sample(cfg, kind, files), cfg.bpe_vocab_size)
    if cfg.tokenizer is not None and tok.kind != cfg.tokenizer:
        raise ValueError(f"--tokenizer is {cfg.tokenizer!r} but --tokenizer-path {cfg.tokenizer_path} holds a "
                         f"{tok.kind!r} tokenizer")
    write_atomic(saved, json.dumps(tok.to_dict()))
    return tok


def _bpe_sample(cfg: PrepareConfig, kind: str, files: list[Path]) -> Iterator[str]:
    """Training documents from the start of the corpus, up to ``bpe_sample_bytes`` of UTF-8."""
    taken, number = 0, 0
    for f in files:
        groups = None
        if kind == "parquet":
            groups = range(len(sources.parquet_row_groups(f, cfg.text_column)))
        for doc in unit_documents(Unit("", str(f), kind, groups), cfg.text_column, cfg.doc_split):
            held = len(shards.heldout_documents(number, number + 1, cfg.eval_fraction)) > 0
            number += 1
            if held:
                continue
            yield doc
            taken += len(doc.encode("utf-8"))
            if taken >= cfg.bpe_sample_bytes:
                return


def _settings(cfg: PrepareConfig, kind: str, tokenizer_spec: dict[str, Any]) -> dict[str, Any]:
    """What a shard depends on, besides its input file (recorded in ``prepare.json`` and every shard)."""
    return {"format": shards.FORMAT, "source": kind, "corpus": str(Path(cfg.corpus).resolve()),
            "text_column": cfg.text_column, "doc_split": cfg.doc_split, "tokenizer": tokenizer_spec}


def _tokenizer_spec(cfg: PrepareConfig) -> dict[str, Any]:
    if cfg.tokenizer_path is not None:
        return {"path": cfg.tokenizer_path, "fingerprint": load_tokenizer(cfg.tokenizer_path).fingerprint}
    spec: dict[str, Any] = {"kind": cfg.tokenizer or "byte"}
    if cfg.tokenizer == "bpe":
        spec.update(vocab_size=cfg.bpe_vocab_size, sample_bytes=cfg.bpe_sample_bytes,
                    eval_fraction=cfg.eval_fraction)
    if cfg.tokenizer == "tiktoken":
        spec.update(encoding=cfg.tiktoken_encoding)
    return spec


def _claim(out: Path, settings: dict[str, Any]) -> None:
    """Create ``out`` or check that it was started with the same settings (nothing there is deleted)."""
    record = out / shards.SETTINGS_FILE
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file; give a folder")
    if record.is_file():
        old = json.loads(record.read_text())
        if old != settings:
            diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
            raise ValueError(f"out: {out} was prepared with other settings ({', '.join(diff)}: "
                             f"{[old.get(k) for k in diff]} there, {[settings.get(k) for k in diff]} now); "
                             "use another --out folder, or delete that one")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} exists and is not a prepared folder; use a new or empty folder")
    (out / shards.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(settings))
    for tmp in (out / shards.SHARD_DIR).glob("*.tmp"):  # left by a killed run
        tmp.unlink()


# ---------------------------------------------------------------------------------------------
# Running the units


class _Progress:
    """Documents, tokens and tokens/s on a tqdm bar (or nothing)."""

    def __init__(self, enabled: bool, done_docs: int, done_tokens: int):
        self.docs, self.tokens, self.t0, self.new = done_docs, done_tokens, time.perf_counter(), 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc="prepare", unit="tok", unit_scale=True, initial=done_tokens, file=sys.stderr)

    def add(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.new += tokens
        if self.bar is not None:
            self.bar.update(tokens)
            self.bar.set_postfix(docs=f"{self.docs:,}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _enough(units: list[Unit], records: dict[str, dict], max_tokens: int | None) -> bool:
    """Whether the finished units at the start of the corpus already hold ``max_tokens``."""
    if max_tokens is None:
        return False
    total = 0
    for u in units:
        if u.name not in records:
            return False
        total += records[u.name]["tokens"]
        if total >= max_tokens:
            return True
    return False


def run_units(units: list[Unit], todo: list[Unit], records: dict[str, dict], cfg: PrepareConfig, out: Path,
              tok: Tokenizer, settings: dict[str, Any], progress: _Progress) -> None:
    """Make the shards of ``todo`` (in corpus order, at most ``workers`` at once) into ``records``;
    stops starting units once the corpus cut at ``max_tokens`` is covered."""
    workers = min(cfg.workers or os.cpu_count() or 1, max(len(todo), 1))
    pending = collections.deque(todo)
    if workers == 1:
        while pending and not _enough(units, records, cfg.max_tokens):
            u = pending.popleft()
            records[u.name] = prepare_unit(u, out, tok, settings, cfg.max_tokens, progress.add)
        return
    ctx = multiprocessing.get_context("spawn")  # the parent has imported JAX: never fork it
    reports = ctx.Queue()
    pool = ctx.Pool(workers, _init_worker, (str(out), reports))
    running: dict[str, Any] = {}
    try:
        while pending or running:
            while pending and len(running) < workers and not _enough(units, records, cfg.max_tokens):
                u = pending.popleft()
                running[u.name] = pool.apply_async(_run_unit, (u, settings, cfg.max_tokens))
            if not running:
                break
            try:
                progress.add(*reports.get(timeout=0.2))
            except queue.Empty:
                pass
            for name in [n for n, r in running.items() if r.ready()]:
                records[name] = running.pop(name).get()  # re-raises a worker's error
        while True:  # the last reports
            try:
                progress.add(*reports.get_nowait())
            except queue.Empty:
                break
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------------------------------------
# The index


def write_index(units: list[Unit], records: dict[str, dict], cfg: PrepareConfig, out: Path, tok: Tokenizer,
                settings: dict[str, Any], kind: str) -> dict[str, Any]:
    """``documents.npy``, ``heldout.npy`` and, last, ``index.json`` over the units in corpus order (cut at
    ``max_tokens``); returns the index record. One shard's lengths are in memory at a time."""
    (out / shards.INDEX_FILE).unlink(missing_ok=True)  # the folder is unfinished until the new one is written
    used, total = [], 0
    for u in units:
        if u.name not in records or (cfg.max_tokens is not None and total >= cfg.max_tokens):
            break
        rec = records[u.name]
        n_docs, n_tok = rec["documents"], rec["tokens"]
        if cfg.max_tokens is not None and total + n_tok > cfg.max_tokens:
            lengths = np.load(_shard_files(out, u.name)[1])
            n_docs = int(np.searchsorted(np.cumsum(lengths), cfg.max_tokens - total)) + 1
            n_tok = int(lengths[:n_docs].sum())
        if n_docs:
            used.append((u, rec, n_docs))
        total += n_tok
    num_docs = sum(n for _, _, n in used)
    if num_docs == 0:
        raise ValueError(f"corpus: {cfg.corpus} holds no documents (every {kind} record is empty or blank)")

    tmp = out / (shards.DOCUMENTS_FILE + ".tmp")
    table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(num_docs, 3))
    at = 0
    for s, (u, rec, n) in enumerate(used):
        lengths = np.load(_shard_files(out, u.name)[1])[:n]
        ends = np.cumsum(lengths + 1) - 1
        table[at:at + n, 0] = s
        table[at:at + n, 1] = ends - lengths
        table[at:at + n, 2] = ends
        at += n
    table.flush()
    del table
    os.replace(tmp, out / shards.DOCUMENTS_FILE)

    window = 1 << 22
    held = np.concatenate([shards.heldout_documents(lo, min(lo + window, num_docs), cfg.eval_fraction)
                           for lo in range(0, num_docs, window)])
    tmp = out / (shards.HELDOUT_FILE + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, held, allow_pickle=False)
    os.replace(tmp, out / shards.HELDOUT_FILE)

    index = {
        "format": shards.FORMAT, "dtype": settings["dtype"], "eos_id": tok.eos_id, "vocab_size": tok.vocab_size,
        "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint}, "eval_fraction": cfg.eval_fraction,
        "num_documents": num_docs, "num_tokens": total,
        "heldout_documents": int(len(held)), "max_tokens": cfg.max_tokens,
        "input": {"corpus": settings["corpus"], "source": kind, "text_column": cfg.text_column,
                  "doc_split": cfg.doc_split},
        "shards": [{"name": u.name, "length": rec["length"], "documents": n, "source": u.path,
                    "row_groups": list(u.row_groups) if u.row_groups is not None else None} for u, rec, n in used],
    }
    write_atomic(out / shards.INDEX_FILE, json.dumps(index, indent=1))
    return index


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``cfg.corpus`` into ``cfg.out`` (resuming a folder an earlier run started); returns a
    summary: the index record plus ``seconds``, ``tokens_per_s`` (of the tokens made by this run),
    ``units`` and ``units_reused``."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    kind, files = input_files(cfg)
    units = plan_units(kind, files, cfg)
    settings = _settings(cfg, kind, _tokenizer_spec(cfg))
    _claim(out, settings)
    tok = make_tokenizer(cfg, kind, files, out)
    settings = {**settings, "dtype": shards.token_dtype(tok.vocab_size), "eos_id": tok.eos_id,
                "tokenizer_fingerprint": tok.fingerprint}

    records = {u.name: r for u in units if (r := finished_record(u, out, settings, cfg.max_tokens))}
    reused = len(records)
    todo = [u for u in units if u.name not in records]
    bar = _Progress(progress, sum(r["documents"] for r in records.values()),
                    sum(r["tokens"] for r in records.values()))
    t_units = time.perf_counter()
    try:
        run_units(units, todo, records, cfg, out, tok, settings, bar)
    finally:
        bar.close()
    seconds_units = time.perf_counter() - t_units
    index = write_index(units, records, cfg, out, tok, settings, kind)
    return {**index, "seconds": time.perf_counter() - t0, "units": len(units), "units_reused": reused,
            "tokens_made": bar.new, "tokens_per_s": bar.new / max(seconds_units, 1e-9)}


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> tuple[PrepareConfig, bool]:
    d = PrepareConfig("", "")
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", help="a Parquet / JSONL(.gz) / text (.txt, .txt.gz) file, or a folder of them")
    p.add_argument("--out", required=True, help="the prepared folder (a rerun resumes it)")
    p.add_argument("--source", choices=list(INPUT_SUFFIXES), default=None, help="default: from the suffixes")
    p.add_argument("--text-column", default=d.text_column, help="Parquet column / JSONL field of the text (text)")
    p.add_argument("--doc-split", choices=["blank_line", "file"], default=d.doc_split,
                   help="text files: documents end at blank lines (default), or one per file")
    p.add_argument("--tokenizer", choices=list(TOKENIZER_KINDS), default=None,
                   help="(byte; with --tokenizer-path: that tokenizer's kind)")
    p.add_argument("--tokenizer-path", default=None,
                   help="a run directory, a tokenizer.json of ours, or a Hugging Face tokenizer.json")
    p.add_argument("--bpe-vocab-size", type=int, default=d.bpe_vocab_size, help=f"({d.bpe_vocab_size})")
    p.add_argument("--bpe-sample-bytes", type=int, default=d.bpe_sample_bytes,
                   help=f"text the BPE is trained on ({d.bpe_sample_bytes >> 20} MiB)")
    p.add_argument("--tiktoken-encoding", choices=list(TIKTOKEN_ENCODINGS), default=d.tiktoken_encoding)
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help=f"share of documents held out, fixed for every run ({d.eval_fraction}); training "
                        "must pass the same --data.eval-fraction")
    p.add_argument("--max-tokens", type=int, default=None, help="keep the first documents up to this many tokens")
    p.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    p.add_argument("--unit-bytes", type=int, default=d.unit_bytes,
                   help=f"Parquet: uncompressed bytes per unit of work ({d.unit_bytes >> 20} MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(PrepareConfig)}
    return PrepareConfig(**{k: v for k, v in vars(a).items() if k in fields}), not a.no_progress


def main(argv: list[str] | None = None) -> None:
    try:
        cfg, progress = parse_args(argv)
        summary = prepare(cfg, progress)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{cfg.out}: {summary['num_documents']:,} documents, {summary['num_tokens']:,} tokens "
          f"({summary['dtype']}) in {len(summary['shards'])} shards; {summary['heldout_documents']:,} held out; "
          f"{summary['units_reused']} of {summary['units']} units reused; "
          f"{summary['tokens_per_s']:,.0f} tokens/s; {summary['seconds']:.1f} s")
    print(f"train on it: python -m osdn_jax.train --data.source shards --data.path {cfg.out} "
          f"--data.tokenizer {summary['tokenizer']['kind']} --data.eval-fraction {cfg.eval_fraction}")


if __name__ == "__main__":
    main()
