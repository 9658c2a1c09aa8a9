"""Training and evaluation data: sources -> documents -> packed rows -> batches (grain).

Pipeline (per process):
  1. Documents: read the source (``sources.py``) and tokenise it once per process (cached in
     memory); token files are memmapped and only scanned for separators; a prepared folder
     (``shards``, made by ``python -m osdn_jax.train.prepare``) is memmapped and its index gives the
     document boundaries, so nothing is read or scanned at start.
  2. Split by document: held-out documents are evenly spaced (``split_documents``), independent
     of the seed, so every run with the same corpus and ``eval_fraction`` evaluates on the same
     documents (a prepared folder records its held-out documents: the split of prepare time).
  3. Shard by document: process ``p`` of ``n`` takes documents ``p, p+n, p+2n, ...`` of its split.
  4. Pieces: each document gets EOS appended (``append_eos``) and is cut into pieces of at most
     ``seq_len + 1`` tokens that overlap by one token, so every next-token target inside a
     document is trained exactly once however long the document is.
  5. grain: pieces are shuffled by ``seed`` (a new order every epoch) and repeated for training,
     first-fit packed into rows of ``seq_len + 1`` tokens with per-row segment ids, batched, and
     shifted into the batch contract below. Evaluation skips shuffle and repeat. grain handles
     token *positions* (packing needs only lengths); the tokens are read after batching, for the
     rows a process keeps (``rows=``), so a process reads only its own rows of a memory-mapped corpus.

Batch contract (a dict of numpy arrays; ``T = seq_len``; ``B`` = the ``batch_size`` of the config
these functions are given, or the rows ``rows=`` selects of it; ``make_process_data`` gives each of
several processes its share of the global batch):
  inputs       [B, T] int32    token ids (0 on padding)
  targets      [B, T] int32    the next token in the packed row (0 on padding)
  segment_ids  [B, T] int32    1, 2, ... per packed piece in the row, 0 on padding; a new value
                               starts exactly where a document (or a piece of a long one) starts
  loss_mask    [B, T] float32  1 where ``targets`` is the next token of the same piece, else 0
                               (padding, and the last position of each piece, whose target would
                               cross into the next one)

The train iterator is a grain ``DatasetIterator``: ``get_state()/set_state()`` and orbax
``grain.checkpoint.CheckpointSave/CheckpointRestore`` resume it with exactly the same batches.
No grain multiprocessing is used, so nothing needs a ``__main__`` guard.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from osdn_jax.train import shards, sources
from osdn_jax.train.tokenizer import (
    KINDS as TOKENIZER_KINDS,
    TIKTOKEN_ENCODINGS,
    TOKENIZER_FILE,
    ByteTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)

SOURCES = ("embedded", "text", "jsonl", "npy", "bin", "shards")
TEXT_SOURCES = ("embedded", "text", "jsonl")
DOC_SPLITS = ("blank_line", "file")
TOKEN_DTYPES = ("uint16", "uint32", "int32")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from, how it is tokenised, and the batch shape.

    source:            "embedded" (the packaged KJV excerpt), "text", "jsonl", "npy", "bin" or
                       "shards" (a folder made by ``python -m osdn_jax.train.prepare``).
    path:              file or directory for every source but "embedded".
    text_field:        JSONL field holding the document text.
    doc_split:         "text" source: "blank_line" (documents end at blank lines) or "file".
    token_dtype:       element type of raw ".bin" token files.
    token_eos_id:      separator id inside token files; None means the tokenizer's EOS.
    tokenizer:         "byte", "bpe" or "tiktoken".
    tokenizer_path:    a saved tokenizer (run dir, our ``tokenizer.json`` or a ``tokenizers``
                       BPE JSON) to use instead of building one.
    bpe_vocab_size:    vocabulary of a BPE trained on the training documents.
    tiktoken_encoding: "cl100k_base" or "o200k_base".
    seq_len:           T, positions per row (rows hold T + 1 tokens before the shift).
    batch_size:        B, rows per global batch (all processes together). ``make_process_data``
                       gives each process its batch_size / process_count rows (``rows=``), or
                       with ``data_split="documents"`` a config of that many rows of its own.
    seed:              shuffle seed of the training stream.
    eval_fraction:     share of documents held out for evaluation, in [0, 1). "shards": must
                       equal the folder's, whose held-out documents were fixed at prepare time.
    append_eos:        append EOS to every document, so the model learns where documents end.
    packing_bins:      first-fit packing window in rows (None: batch_size); more bins, less
                       padding.
    """

    source: str = "embedded"
    path: str | None = None
    text_field: str = "text"
    doc_split: str = "blank_line"
    token_dtype: str = "uint16"
    token_eos_id: int | None = None
    tokenizer: str = "byte"
    tokenizer_path: str | None = None
    bpe_vocab_size: int = 4096
    tiktoken_encoding: str = "cl100k_base"
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    eval_fraction: float = 0.05
    append_eos: bool = True
    packing_bins: int | None = None

    def __post_init__(self):
        def bad(field: str, need: str):
            raise ValueError(f"DataConfig.{field} {need}, got {getattr(self, field)!r}")

        if self.source not in SOURCES:
            bad("source", f"must be one of {SOURCES}")
        if self.source != "embedded" and not self.path:
            bad("path", f"is required for source={self.source!r}")
        if not self.text_field:
            bad("text_field", "must be a non-empty string")
        if self.doc_split not in DOC_SPLITS:
            bad("doc_split", f"must be one of {DOC_SPLITS}")
        if self.token_dtype not in TOKEN_DTYPES:
            bad("token_dtype", f"must be one of {TOKEN_DTYPES}")
        if self.token_eos_id is not None and self.token_eos_id < 0:
            bad("token_eos_id", "must be >= 0 or None")
        if self.tokenizer not in TOKENIZER_KINDS:
            bad("tokenizer", f"must be one of {TOKENIZER_KINDS}")
        if self.bpe_vocab_size < 257:
            bad("bpe_vocab_size", "must be >= 257 (256 bytes + EOS)")
        if self.tiktoken_encoding not in TIKTOKEN_ENCODINGS:
            bad("tiktoken_encoding", f"must be one of {TIKTOKEN_ENCODINGS}")
        if self.seq_len < 2:
            bad("seq_len", "must be >= 2")
        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        if not 0 <= self.seed < 2**32:
            bad("seed", "must be in [0, 2**32)")
        if not 0.0 <= self.eval_fraction < 1.0:
            bad("eval_fraction", "must be in [0, 1)")
        if self.packing_bins is not None and self.packing_bins < 1:
            bad("packing_bins", "must be >= 1 or None")


# ---------------------------------------------------------------------------------------------
# Documents (cached per process)

_CACHE: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
_CACHE_SIZE = 8


def _cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """A small LRU keyed by source identity (paths, sizes, mtimes) and tokenizer fingerprint."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = build()
    _CACHE[key] = value
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class _Prepared:
    docs: sources.Documents
    heldout: np.ndarray
    index: shards.ShardIndex


def _prepared(cfg: DataConfig) -> _Prepared:
    """The prepared folder of a ``shards`` source (opened once per process)."""
    return _cached(("shards", _source_key(cfg)), lambda: _Prepared(*shards.open_documents(cfg.path)))


def prepared_heldout(cfg: DataConfig) -> np.ndarray:
    """The held-out document numbers a prepared folder fixed at prepare time, whatever ``cfg`` holds out."""
    return _prepared(cfg).heldout


def prepared_split(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) document numbers of a prepared folder: the split fixed at prepare time, whose
    ``eval_fraction`` the config must name (so that a run says what it holds out)."""
    prepared = _prepared(cfg)
    if prepared.index.eval_fraction != cfg.eval_fraction:
        raise ValueError(
            f"DataConfig.eval_fraction is {cfg.eval_fraction} but the prepared folder {cfg.path} holds out "
            f"{prepared.index.eval_fraction} of its documents (fixed at prepare time); pass "
            f"--data.eval-fraction {prepared.index.eval_fraction}, or prepare again with --eval-fraction "
            f"{cfg.eval_fraction}")
    held = prepared.heldout
    return _complement(len(prepared.docs), held), held


def _source_suffixes(cfg: DataConfig) -> tuple[str, ...]:
    return {
        "text": sources.TEXT_SUFFIXES,
        "jsonl": sources.JSONL_SUFFIXES,
        "npy": (".npy",),
        "bin": (".bin",),
    }[cfg.source]


def _source_key(cfg: DataConfig) -> tuple:
    """Identity of the source's content: settings plus (path, size, mtime) of every file."""
    if cfg.source == "embedded":
        return ("embedded",)
    if cfg.source == "shards":
        index = Path(cfg.path) / shards.INDEX_FILE
        stat = index.stat() if index.is_file() else None
        return ("shards", str(index.resolve()), stat and (stat.st_size, stat.st_mtime_ns))
    files = sources.list_files(cfg.path, _source_suffixes(cfg))
    stats = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return (cfg.source, cfg.text_field, cfg.doc_split, cfg.token_dtype, stats)


def document_texts(cfg: DataConfig) -> list[str]:
    """The text documents of a text source (embedded, text, jsonl), in corpus order."""
    if cfg.source not in TEXT_SOURCES:
        raise ValueError(f"DataConfig.source {cfg.source!r} holds token ids, not text")

    def build() -> list[str]:
        if cfg.source == "embedded":
            docs = sources.split_blank_lines(sources.embedded_text())
        elif cfg.source == "text":
            docs = sources.read_text_documents(cfg.path, cfg.doc_split)
        else:
            docs = sources.read_jsonl_documents(cfg.path, cfg.text_field)
        if not docs:
            raise ValueError(f"DataConfig.path: source {cfg.source!r} at {cfg.path} has no documents")
        return docs

    return _cached(("texts", _source_key(cfg)), build)


def load_documents(cfg: DataConfig, tokenizer: Tokenizer) -> sources.Documents:
    """All documents of the source as token ids (text is tokenised once per process)."""
    if cfg.source in TEXT_SOURCES:
        key = ("tokens", _source_key(cfg), tokenizer.fingerprint)
        return _cached(key, lambda: sources.documents_from_arrays(tokenizer.encode_batch(document_texts(cfg))))

    if cfg.source == "shards":
        prepared = _prepared(cfg)
        if prepared.index.tokenizer_fingerprint != tokenizer.fingerprint:
            raise ValueError(
                f"DataConfig.tokenizer: the prepared folder {cfg.path} was tokenized by its own tokenizer.json "
                f"(fingerprint {prepared.index.tokenizer_fingerprint}), not by this {tokenizer.kind} tokenizer "
                f"({tokenizer.fingerprint})")
        return prepared.docs

    eos = tokenizer.eos_id if cfg.token_eos_id is None else cfg.token_eos_id

    def build() -> sources.Documents:
        docs, max_id = sources.read_token_documents(cfg.path, f".{cfg.source}", cfg.token_dtype, eos)
        if len(docs) == 0:
            raise ValueError(f"DataConfig.path: token files at {cfg.path} hold no documents")
        if max_id >= tokenizer.vocab_size:
            raise ValueError(
                f"DataConfig.tokenizer: token files at {cfg.path} hold id {max_id}, outside the "
                f"{tokenizer.kind} tokenizer's vocab_size {tokenizer.vocab_size}"
            )
        return docs

    return _cached(("tokens", _source_key(cfg), tokenizer.fingerprint, eos), build)


# ---------------------------------------------------------------------------------------------
# Split, shard, pieces (pure functions of document counts and lengths)


def split_documents(num_docs: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) document indices, int64, disjoint, covering ``range(num_docs)``.

    Held-out documents are evenly spaced: document i is held out when round((i+1)*f) exceeds
    round(i*f) (rounding half up), which gives round(num_docs * f) of them.
    """
    held = shards.heldout_documents(0, num_docs, eval_fraction)
    return _complement(num_docs, held), held


def _complement(num_docs: int, held: np.ndarray) -> np.ndarray:
    """The document numbers in ``range(num_docs)`` not in ``held``, ascending (no sort: a mask)."""
    keep = np.ones(num_docs, bool)
    keep[held] = False
    return np.flatnonzero(keep).astype(np.int64, copy=False)


def shard_documents(doc_ids: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Process ``process_index``'s share of ``doc_ids``: every ``process_count``-th one."""
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    return doc_ids[process_index::process_count]


def piece_bounds(lengths: np.ndarray, seq_len: int, window: int = 1 << 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut documents of ``lengths`` [D] into pieces of at most ``seq_len + 1`` tokens.

    Piece j of a document covers ``[j*T, min(j*T + T + 1, L))``: consecutive pieces share one
    token, so each of the L - 1 next-token targets lies in exactly one piece. Documents shorter
    than 2 tokens have no target and no piece. Returns ``(doc, lo, hi)``, each [P] int64, where
    ``doc`` indexes ``lengths``. Computed ``window`` documents at a time, so the temporaries stay
    small for a corpus of millions of documents.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = np.where(lengths >= 2, -(-(lengths - 1) // seq_len), 0)
    total = int(counts.sum())
    doc, lo, hi = (np.empty(total, np.int64) for _ in range(3))
    at = 0
    for w in range(0, len(lengths), window):
        c, n = counts[w:w + window], lengths[w:w + window]
        d = np.repeat(np.arange(w, w + len(c), dtype=np.int64), c)
        j = np.arange(len(d), dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
        doc[at:at + len(d)] = d
        lo[at:at + len(d)] = j * seq_len
        hi[at:at + len(d)] = np.minimum(j * seq_len + seq_len + 1, n[d - w])
        at += len(d)
    return doc, lo, hi


@dataclasses.dataclass(frozen=True, eq=False)
class _Pieces:
    """Random-access pieces for grain: item i is ``{"tokens": [hi - lo] int64}``, the piece's token
    *positions* in ``docs`` (``Documents.gather``), ``-1`` for an appended EOS.

    Packing needs only lengths, so grain shuffles, packs and batches positions; the tokens are read
    afterwards for the rows a process keeps (``_Rows``), and a memory-mapped corpus is read only there.
    """

    docs: sources.Documents
    doc: np.ndarray  # [P] indices into docs
    lo: np.ndarray  # [P]
    hi: np.ndarray  # [P], positions in the document with EOS appended
    eos_id: int | None  # appended after each document when not None

    def __len__(self) -> int:
        return int(self.doc.shape[0])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d, lo, hi = int(self.doc[i]), int(self.lo[i]), int(self.hi[i])
        n, first = int(self.docs.end[d] - self.docs.start[d]), int(self.docs.global_start[d])
        body = np.arange(first + lo, first + min(hi, n), dtype=np.int64)
        if self.eos_id is not None and hi > n:
            body = np.append(body, np.int64(-1))
        return {"tokens": body}


@dataclasses.dataclass(frozen=True, eq=False)
class _Rows:
    """Packed batches of positions -> the batch contract, for rows ``rows`` of each batch only.

    ``rows=None`` keeps every row. A short batch (the end of a pass) is first padded to
    ``batch_size`` rows (``loss_mask`` 0), so a process's rows are the same rows of the same global
    batch."""

    docs: sources.Documents
    eos_id: int | None
    batch_size: int
    rows: slice | None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pos, seg = batch["tokens"], batch["tokens_segment_ids"]
        missing = self.batch_size - pos.shape[0]
        if missing:
            pos, seg = (np.concatenate([x, np.zeros((missing, x.shape[1]), x.dtype)]) for x in (pos, seg))
        if self.rows is not None:
            pos, seg = pos[self.rows], seg[self.rows]
        tokens = np.zeros(pos.shape, np.int32)
        real = seg > 0
        p = pos[real]
        read = np.zeros(p.shape, np.int32) if self.eos_id is None else np.full(p.shape, self.eos_id, np.int32)
        read[p >= 0] = self.docs.gather(p[p >= 0])
        tokens[real] = read
        return batch_from_packed(tokens, seg)


def _pieces(cfg: DataConfig, tokenizer: Tokenizer, doc_ids: np.ndarray) -> _Pieces:
    docs = load_documents(cfg, tokenizer)
    lengths = docs.lengths[doc_ids] + int(cfg.append_eos)
    local, lo, hi = piece_bounds(lengths, cfg.seq_len)
    return _Pieces(docs, doc_ids[local], lo, hi, tokenizer.eos_id if cfg.append_eos else None)


def _split_shard(
    cfg: DataConfig, tokenizer: Tokenizer, which: str, process_index: int, process_count: int
) -> np.ndarray:
    """Document ids of split ``which`` ("train" or "eval") for one process; never empty."""
    num_docs = len(load_documents(cfg, tokenizer))
    if cfg.source == "shards":  # the split was fixed when the folder was prepared
        train, held = prepared_split(cfg)
    else:
        train, held = split_documents(num_docs, cfg.eval_fraction)
    ids = train if which == "train" else held
    if len(ids) == 0:
        raise ValueError(
            f"DataConfig.eval_fraction={cfg.eval_fraction} leaves no {which} documents "
            f"out of {num_docs}"
        )
    shard = shard_documents(ids, process_index, process_count)
    if len(shard) == 0:
        raise ValueError(
            f"process_index {process_index} of process_count {process_count} gets no {which} "
            f"documents ({len(ids)} in the split)"
        )
    return shard


# ---------------------------------------------------------------------------------------------
# Batches


def batch_from_packed(tokens: np.ndarray, segments: np.ndarray) -> dict[str, np.ndarray]:
    """The batch contract from packed rows ``tokens`` and ``segments``, both [B, T + 1].

    ``segments`` is 0 on padding and a per-row piece number elsewhere.
    """
    seg_in, seg_out = segments[:, :-1], segments[:, 1:]
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "segment_ids": seg_in.astype(np.int32),
        "loss_mask": ((seg_in > 0) & (seg_out == seg_in)).astype(np.float32),
    }


def _packed_batches(cfg: DataConfig, pieces: _Pieces, ds: grain.MapDataset, *, drop_remainder: bool,
                    rows: slice | None) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    packed = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={"tokens": cfg.seq_len + 1},
        num_packing_bins=cfg.packing_bins or cfg.batch_size,
        shuffle_bins=False,
    )
    to_contract = _Rows(pieces.docs, pieces.eos_id, cfg.batch_size, rows)
    return packed.batch(cfg.batch_size, drop_remainder=drop_remainder).map(to_contract)


def _check_rows(cfg: DataConfig, rows: slice | None) -> None:
    if rows is not None and len(range(cfg.batch_size)[rows]) == 0:
        raise ValueError(f"rows: {rows} selects no row of data.batch_size={cfg.batch_size}")


def make_train_dataset(
    cfg: DataConfig, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1,
    rows: slice | None = None,
) -> grain.IterDataset:
    """The infinite training stream of this process (see ``make_train_iterator``)."""
    _check_rows(cfg, rows)
    pieces = _pieces(cfg, tokenizer, _split_shard(cfg, tokenizer, "train", process_index, process_count))
    ds = grain.MapDataset.source(pieces).seed(cfg.seed).shuffle().repeat()
    return _packed_batches(cfg, pieces, ds, drop_remainder=True, rows=rows)


def make_train_iterator(
    cfg: DataConfig, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1,
    rows: slice | None = None,
) -> grain.DatasetIterator:
    """Endless training batches (the batch contract, [batch_size, seq_len]) for one process.

    ``process_index`` / ``process_count`` give processes disjoint documents. ``rows`` keeps only
    those rows of each batch, and reads the tokens of those rows only. Checkpoint with
    ``get_state()/set_state()`` or orbax's ``grain.checkpoint.CheckpointSave(iterator)`` /
    ``CheckpointRestore(iterator)``.
    """
    return iter(make_train_dataset(cfg, tokenizer, process_index, process_count, rows))


def _padding_batch(cfg: DataConfig, rows: slice | None = None) -> dict[str, np.ndarray]:
    n = cfg.batch_size if rows is None else len(range(cfg.batch_size)[rows])
    z = np.zeros((n, cfg.seq_len + 1), np.int32)
    return batch_from_packed(z, z)


def make_eval_batches(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    num_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    rows: slice | None = None,
) -> list[dict[str, np.ndarray]]:
    """Held-out batches for one process, in a fixed order (no shuffle, no repeat, seed unused).

    ``num_batches=None`` takes one pass over this process's held-out pieces (processes may get
    different counts). An integer gives exactly that many on every process: the pass is cut
    short, or filled with padding rows (``loss_mask`` 0), so multi-host steps stay in lockstep.
    The last batch of a pass is padded to ``batch_size`` rows. ``rows`` keeps those rows only.
    """
    if num_batches is not None and num_batches < 0:
        raise ValueError(f"num_batches must be >= 0 or None, got {num_batches}")
    ids = _split_shard(cfg, tokenizer, "eval", process_index, process_count)
    batches = list(itertools.islice(iter_document_batches(cfg, tokenizer, ids, rows), num_batches))
    if num_batches is not None:
        batches += [_padding_batch(cfg, rows) for _ in range(num_batches - len(batches))]
    return batches


def iter_document_batches(
    cfg: DataConfig, tokenizer: Tokenizer, doc_ids: np.ndarray | None = None, rows: slice | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over documents ``doc_ids`` (default: every document of the source, no split), in
    order, packed like the held-out batches; the last batch is padded to ``batch_size`` rows.
    Batches are built lazily, so a large corpus is never held as batches in memory. ``rows`` keeps
    (and reads) those rows of each batch only."""
    _check_rows(cfg, rows)
    if doc_ids is None:
        doc_ids = np.arange(len(load_documents(cfg, tokenizer)), dtype=np.int64)
    pieces = _pieces(cfg, tokenizer, np.asarray(doc_ids, dtype=np.int64))
    yield from _packed_batches(cfg, pieces, grain.MapDataset.source(pieces), drop_remainder=False, rows=rows)


def make_process_data(
    cfg: DataConfig, tokenizer: Tokenizer, data_split: str, eval_batches: int | None,
    process_index: int = 0, process_count: int = 1,
) -> tuple[grain.DatasetIterator, list[dict[str, np.ndarray]]]:
    """``(train iterator, held-out batches)`` of one process of ``process_count``, ``cfg.batch_size``
    being the global batch.

    ``data_split="rows"``: every process walks the same global batch stream and keeps (and reads)
    only its ``batch_size / process_count`` rows, so results do not depend on the process count.
    ``"documents"``: each process packs its own share of the documents into its rows.
    """
    B = cfg.batch_size
    if B % process_count:
        raise ValueError(f"data.batch_size: expected a multiple of the process count {process_count}, got {B}")
    if data_split == "documents":
        local = dataclasses.replace(cfg, batch_size=B // process_count)
        return (make_train_iterator(local, tokenizer, process_index, process_count),
                make_eval_batches(local, tokenizer, eval_batches, process_index, process_count))
    if data_split != "rows":
        raise ValueError(f"data_split must be 'rows' or 'documents', got {data_split!r}")
    rows = slice(process_index * (B // process_count), (process_index + 1) * (B // process_count))
    rows = None if process_count == 1 else rows
    return (make_train_iterator(cfg, tokenizer, rows=rows),
            make_eval_batches(cfg, tokenizer, eval_batches, rows=rows))


def pretokenize(cfg: DataConfig, tokenizer: Tokenizer, out_path: str | Path) -> DataConfig:
    """Write a text source's documents as one token file (``.npy`` or ``.bin``, by suffix).

    Returns ``cfg`` pointed at the new file; it yields the same documents, hence the same
    batches. The dtype is uint16 when the vocabulary fits, else uint32.
    """
    docs = load_documents(cfg, tokenizer)
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    path = sources.write_token_file(out_path, [docs.tokens(i) for i in range(len(docs))], tokenizer.eos_id, dtype)
    kind = "npy" if path.name.endswith(".npy") else "bin"
    return dataclasses.replace(cfg, source=kind, path=str(path), token_dtype=dtype, token_eos_id=None)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(cfg: DataConfig, run_dir: str | Path | None = None, *, save: bool = True) -> Tokenizer:
    """The run's tokenizer, recorded in ``run_dir/tokenizer.json``.

    If ``run_dir`` already records one (a resumed run, evaluation, sampling) it is loaded as is.
    Otherwise: ``tokenizer_path`` if given, else a fresh ``byte`` / ``tiktoken`` tokenizer, or a
    BPE trained on the training split's documents (text sources only). A new tokenizer is saved
    to ``run_dir`` when one is given and ``save`` (the training loop saves it itself, once its
    checks of the run directory have passed).

    With several processes, train a BPE on one process (or beforehand) and pass the run
    directory or ``tokenizer_path`` to the others, so they cannot disagree.
    """
    if cfg.source == "shards":
        tok, where = _prepared_tokenizer(cfg, run_dir)
    elif run_dir is not None and (Path(run_dir) / TOKENIZER_FILE).is_file():
        tok = load_tokenizer(run_dir)
        where = f"run_dir {run_dir}"
    elif cfg.tokenizer_path is not None:
        tok = load_tokenizer(cfg.tokenizer_path)
        where = f"tokenizer_path {cfg.tokenizer_path}"
    elif cfg.tokenizer == "byte":
        tok, where = ByteTokenizer(), ""
    elif cfg.tokenizer == "tiktoken":
        tok, where = TiktokenTokenizer(cfg.tiktoken_encoding), ""
    else:
        if cfg.source not in TEXT_SOURCES:
            raise ValueError(
                f"DataConfig.tokenizer='bpe' needs a text source to train on or a tokenizer_path; "
                f"source is {cfg.source!r}"
            )
        texts = document_texts(cfg)
        train, _ = split_documents(len(texts), cfg.eval_fraction)
        tok, where = train_bpe((texts[i] for i in train), cfg.bpe_vocab_size), ""
    if tok.kind != cfg.tokenizer:
        raise ValueError(f"DataConfig.tokenizer is {cfg.tokenizer!r} but {where} holds a {tok.kind!r} tokenizer"
                         + (f"; pass --data.tokenizer {tok.kind}" if cfg.source == "shards" else _run_dir_hint(where)))
    if cfg.tokenizer == "tiktoken" and tok.encoding != cfg.tiktoken_encoding:
        raise ValueError(
            f"DataConfig.tiktoken_encoding is {cfg.tiktoken_encoding!r} but {where} holds {tok.encoding!r}"
            + _run_dir_hint(where)
        )
    if save and run_dir is not None and not (Path(run_dir) / TOKENIZER_FILE).is_file():
        save_tokenizer(tok, run_dir)
    return tok


def _prepared_tokenizer(cfg: DataConfig, run_dir: str | Path | None) -> tuple[Tokenizer, str]:
    """A prepared folder's tokenizer (its ``tokenizer.json``); a run directory's or a
    ``tokenizer_path``'s must be the same one."""
    shards.read_index(cfg.path)  # a clear error for an unfinished or wrong folder
    tok = load_tokenizer(cfg.path)
    others = [(f"run_dir {run_dir}", run_dir) if run_dir is not None and (Path(run_dir) / TOKENIZER_FILE).is_file()
              else None, (f"DataConfig.tokenizer_path {cfg.tokenizer_path}", cfg.tokenizer_path)
              if cfg.tokenizer_path is not None else None]
    for where, path in filter(None, others):
        other = load_tokenizer(path)
        if other.fingerprint != tok.fingerprint:
            raise ValueError(
                f"DataConfig.tokenizer: {where} holds a {other.kind} tokenizer ({other.fingerprint}) but the "
                f"prepared folder {cfg.path} was tokenized with a {tok.kind} one ({tok.fingerprint})"
                + _run_dir_hint(where))
    return tok, f"the prepared folder {cfg.path}"


def _run_dir_hint(where: str) -> str:
    """The ways out when a run directory's ``tokenizer.json`` does not fit the config."""
    if not where.startswith("run_dir "):
        return ""
    return (f" ({TOKENIZER_FILE}); give the same tokenizer settings, use another --run-dir, or pass "
            f"--checkpoint.resume False to start over there (the old tokenizer is moved aside)")
