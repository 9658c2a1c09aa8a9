"""Training and evaluation data: sources -> documents -> packed rows -> batches (grain).

Pipeline (per process):
  1. Documents: read the source (``sources.py``) and tokenise it once per process (cached in
     memory); token files are memmapped and only scanned for separators.
  2. Split by document: held-out documents are evenly spaced (``split_documents``), independent
     of the seed, so every run with the same corpus and ``eval_fraction`` evaluates on the same
     documents.
  3. Shard by document: process ``p`` of ``n`` takes documents ``p, p+n, p+2n, ...`` of its split.
  4. Pieces: each document gets EOS appended (``append_eos``) and is cut into pieces of at most
     ``seq_len + 1`` tokens that overlap by one token, so every next-token target inside a
     document is trained exactly once however long the document is.
  5. grain: pieces are shuffled by ``seed`` (a new order every epoch) and repeated for training,
     first-fit packed into rows of ``seq_len + 1`` tokens with per-row segment ids, batched, and
     shifted into the batch contract below. Evaluation skips shuffle and repeat.

Batch contract (a dict of numpy arrays; ``T = seq_len``; ``B`` = the ``batch_size`` of the config
these functions are given: the global batch, which the training loop divides by the process count
before handing each process its config):
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
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from osdn_jax.train import sources
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

SOURCES = ("embedded", "text", "jsonl", "npy", "bin")
TEXT_SOURCES = ("embedded", "text", "jsonl")
DOC_SPLITS = ("blank_line", "file")
TOKEN_DTYPES = ("uint16", "uint32", "int32")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from, how it is tokenised, and the batch shape.

    source:            "embedded" (the packaged KJV excerpt), "text", "jsonl", "npy" or "bin".
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
    batch_size:        B, rows per global batch (all processes together). The training loop hands
                       each process a copy of this config with batch_size / process_count, so the
                       functions here build that process's rows.
    seed:              shuffle seed of the training stream.
    eval_fraction:     share of documents held out for evaluation, in [0, 1).
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
    i = np.arange(num_docs + 1, dtype=np.float64)
    k = np.floor(i * eval_fraction + 0.5)
    held = np.diff(k) > 0
    idx = np.arange(num_docs, dtype=np.int64)
    return idx[~held], idx[held]


def shard_documents(doc_ids: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Process ``process_index``'s share of ``doc_ids``: every ``process_count``-th one."""
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    return doc_ids[process_index::process_count]


def piece_bounds(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut documents of ``lengths`` [D] into pieces of at most ``seq_len + 1`` tokens.

    Piece j of a document covers ``[j*T, min(j*T + T + 1, L))``: consecutive pieces share one
    token, so each of the L - 1 next-token targets lies in exactly one piece. Documents shorter
    than 2 tokens have no target and no piece. Returns ``(doc, lo, hi)``, each [P] int64, where
    ``doc`` indexes ``lengths``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = np.where(lengths >= 2, -(-(lengths - 1) // seq_len), 0)
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    j = np.arange(len(doc), dtype=np.int64) - np.repeat(first, counts)
    lo = j * seq_len
    hi = np.minimum(lo + seq_len + 1, lengths[doc])
    return doc, lo, hi


@dataclasses.dataclass(frozen=True, eq=False)
class _Pieces:
    """Random-access pieces for grain: item i is ``{"tokens": [hi - lo] int32}``."""

    docs: sources.Documents
    doc: np.ndarray  # [P] indices into docs
    lo: np.ndarray  # [P]
    hi: np.ndarray  # [P], positions in the document with EOS appended
    eos_id: int | None  # appended after each document when not None

    def __len__(self) -> int:
        return int(self.doc.shape[0])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d, lo, hi = int(self.doc[i]), int(self.lo[i]), int(self.hi[i])
        body = self.docs.tokens(d, lo, hi)
        if self.eos_id is not None and hi > int(self.docs.lengths[d]):
            body = np.append(body, np.int32(self.eos_id))
        return {"tokens": body}


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


def _contract(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch_from_packed(batch["tokens"], batch["tokens_segment_ids"])


def _packed_batches(cfg: DataConfig, ds: grain.MapDataset, *, drop_remainder: bool) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    packed = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={"tokens": cfg.seq_len + 1},
        num_packing_bins=cfg.packing_bins or cfg.batch_size,
        shuffle_bins=False,
    )
    return packed.batch(cfg.batch_size, drop_remainder=drop_remainder).map(_contract)


def make_train_dataset(
    cfg: DataConfig, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """The infinite training stream of this process (see ``make_train_iterator``)."""
    pieces = _pieces(cfg, tokenizer, _split_shard(cfg, tokenizer, "train", process_index, process_count))
    ds = grain.MapDataset.source(pieces).seed(cfg.seed).shuffle().repeat()
    return _packed_batches(cfg, ds, drop_remainder=True)


def make_train_iterator(
    cfg: DataConfig, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Endless training batches (the batch contract, [batch_size, seq_len]) for one process.

    Processes see disjoint documents. Checkpoint with ``get_state()/set_state()`` or orbax's
    ``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)``.
    """
    return iter(make_train_dataset(cfg, tokenizer, process_index, process_count))


def _padding_batch(cfg: DataConfig) -> dict[str, np.ndarray]:
    z = np.zeros((cfg.batch_size, cfg.seq_len + 1), np.int32)
    return batch_from_packed(z, z)


def _pad_rows(cfg: DataConfig, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = cfg.batch_size - batch["inputs"].shape[0]
    if missing == 0:
        return batch
    pad = _padding_batch(cfg)
    return {k: np.concatenate([v, pad[k][:missing]]) for k, v in batch.items()}


def make_eval_batches(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    num_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Held-out batches for one process, in a fixed order (no shuffle, no repeat, seed unused).

    ``num_batches=None`` takes one pass over this process's held-out pieces (processes may get
    different counts). An integer gives exactly that many on every process: the pass is cut
    short, or filled with padding rows (``loss_mask`` 0), so multi-host steps stay in lockstep.
    The last batch of a pass is padded to ``batch_size`` rows.
    """
    if num_batches is not None and num_batches < 0:
        raise ValueError(f"num_batches must be >= 0 or None, got {num_batches}")
    batches = []
    for batch in iter_document_batches(cfg, tokenizer, _split_shard(cfg, tokenizer, "eval", process_index,
                                                                    process_count)):
        if num_batches is not None and len(batches) == num_batches:
            break
        batches.append(batch)
    if num_batches is not None:
        batches += [_padding_batch(cfg) for _ in range(num_batches - len(batches))]
    return batches


def iter_document_batches(
    cfg: DataConfig, tokenizer: Tokenizer, doc_ids: np.ndarray | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over documents ``doc_ids`` (default: every document of the source, no split), in
    order, packed like the held-out batches; the last batch is padded to ``batch_size`` rows.
    Batches are built lazily, so a large corpus is never held as batches in memory."""
    if doc_ids is None:
        doc_ids = np.arange(len(load_documents(cfg, tokenizer)), dtype=np.int64)
    pieces = _pieces(cfg, tokenizer, np.asarray(doc_ids, dtype=np.int64))
    for batch in _packed_batches(cfg, grain.MapDataset.source(pieces), drop_remainder=False):
        yield _pad_rows(cfg, batch)


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
    if run_dir is not None and (Path(run_dir) / TOKENIZER_FILE).is_file():
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
                         + _run_dir_hint(where))
    if cfg.tokenizer == "tiktoken" and tok.encoding != cfg.tiktoken_encoding:
        raise ValueError(
            f"DataConfig.tiktoken_encoding is {cfg.tiktoken_encoding!r} but {where} holds {tok.encoding!r}"
            + _run_dir_hint(where)
        )
    if save and run_dir is not None and not (Path(run_dir) / TOKENIZER_FILE).is_file():
        save_tokenizer(tok, run_dir)
    return tok


def _run_dir_hint(where: str) -> str:
    """The ways out when a run directory's ``tokenizer.json`` does not fit the config."""
    if not where.startswith("run_dir "):
        return ""
    return (f" ({TOKENIZER_FILE}); give the same tokenizer settings, use another --run-dir, or pass "
            f"--checkpoint.resume False to start over there (the old tokenizer is moved aside)")
