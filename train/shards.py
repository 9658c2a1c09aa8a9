"""A prepared corpus: tokenized shards and one small index (written by ``python -m osdn_jax.train.prepare``).

Layout of a prepared folder::

    index.json         the index, written last: a folder without it is not finished
    tokenizer.json     the tokenizer record (``load_tokenizer(folder)`` reads it)
    documents.npy      int64 [D, 3]: shard number, start, end of each document (token offsets in the
                       shard; the document's EOS sits at ``end``), in corpus order
    heldout.npy        int64 [E]: held-out document numbers, ascending, fixed at prepare time
    prepare.json       the settings the shards were made with (a rerun with others is refused)
    shards/NAME.bin    raw little-endian uint16 (vocabulary <= 65,536) or uint32 tokens, every
                       document followed by EOS, so each shard is also a valid ``bin`` token file
    shards/NAME.lengths.npy   int64 [n]: tokens per document of that shard
    shards/NAME.json   the shard's record (input, settings, counts), written after the two above:
                       a shard without it is unfinished and is made again

``index.json`` holds: ``format``, ``dtype``, ``eos_id``, ``vocab_size``, ``tokenizer`` (kind and
fingerprint), ``eval_fraction``, ``num_documents``, ``num_tokens`` (EOS not counted),
``heldout_documents``, ``max_tokens``, ``input`` (what was read) and ``shards``: one entry per shard in
corpus order, ``{"name", "length" (tokens in the file, EOS included), "documents" (used by the index),
"source", "row_groups"}``.

Training reads a folder through ``open_documents`` (``--data.source shards``): every shard is
memory-mapped and the document boundaries come from ``documents.npy``, so nothing is scanned at start.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from osdn_jax.train.sources import Documents

FORMAT = "osdn_jax.shards/1"
INDEX_FILE = "index.json"
DOCUMENTS_FILE = "documents.npy"
HELDOUT_FILE = "heldout.npy"
SETTINGS_FILE = "prepare.json"
SHARD_DIR = "shards"


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a finished prepared folder (it holds ``index.json``)."""
    return (Path(path) / INDEX_FILE).is_file()


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (EOS included), else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


@dataclasses.dataclass(frozen=True)
class ShardIndex:
    """``index.json`` of a prepared folder, read and checked (``read_index``)."""

    path: Path
    record: dict[str, Any]

    @property
    def dtype(self) -> str:
        return self.record["dtype"]

    @property
    def eos_id(self) -> int:
        return int(self.record["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.record["vocab_size"])

    @property
    def eval_fraction(self) -> float:
        return float(self.record["eval_fraction"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.record["tokenizer"]["fingerprint"]

    @property
    def num_documents(self) -> int:
        return int(self.record["num_documents"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.record["shards"]

    def shard_path(self, name: str) -> Path:
        return self.path / SHARD_DIR / f"{name}.bin"


def read_index(path: str | Path) -> ShardIndex:
    """The index of a prepared folder; ValueError naming ``path`` when it is missing or unfinished."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path: {path} is not a folder (a prepared corpus is a folder with {INDEX_FILE})")
    index = path / INDEX_FILE
    if not index.is_file():
        hint = (" (its prepare run has not finished: run python -m osdn_jax.train.prepare again)"
                if (path / SETTINGS_FILE).is_file() else "")
        raise ValueError(f"path: {path} has no {INDEX_FILE}, so it is not a prepared corpus{hint}")
    try:
        record = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"path: {index} is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"path: {index} is not a {FORMAT} index (format {record.get('format')!r})")
    return ShardIndex(path, record)


def open_documents(path: str | Path) -> tuple[Documents, np.ndarray, ShardIndex]:
    """``(documents, held-out document numbers [E], index)`` of a prepared folder.

    Shards are memory-mapped; ``documents.npy`` gives the boundaries. Checks that every shard is there
    with the size the index records.
    """
    index = read_index(path)
    itemsize = np.dtype(index.dtype).itemsize
    arrays = []
    for shard in index.shards:
        f = index.shard_path(shard["name"])
        want = int(shard["length"]) * itemsize
        if not f.is_file():
            raise ValueError(f"path: {index.path}: shard {f.name} listed in {INDEX_FILE} is missing")
        if f.stat().st_size != want:
            raise ValueError(f"path: {index.path}: shard {f.name} holds {f.stat().st_size} bytes, the index "
                             f"records {want}")
        arrays.append(np.memmap(f, dtype=np.dtype(index.dtype).newbyteorder("<"), mode="r"))
    docs = np.load(index.path / DOCUMENTS_FILE, mmap_mode="r", allow_pickle=False)
    if docs.ndim != 2 or docs.shape != (index.num_documents, 3):
        raise ValueError(f"path: {index.path / DOCUMENTS_FILE} has shape {list(docs.shape)}, expected "
                         f"[{index.num_documents}, 3]")
    heldout = np.load(index.path / HELDOUT_FILE, allow_pickle=False).astype(np.int64)
    documents = Documents(tuple(arrays), docs[:, 0], docs[:, 1], docs[:, 2])  # views of the memory map
    return documents, heldout, index


def heldout_documents(lo: int, hi: int, eval_fraction: float) -> np.ndarray:
    """Held-out document numbers in ``[lo, hi)``: number i is held out when round((i+1)·f) exceeds
    round(i·f) (half up), the evenly spaced rule of ``data.split_documents``, computed in a window
    so that a corpus of any size needs no array of its size."""
    i = np.arange(lo, hi + 1, dtype=np.float64)
    k = np.floor(i * eval_fraction + 0.5)
    return np.arange(lo, hi, dtype=np.int64)[np.diff(k) > 0]


__all__ = ["DOCUMENTS_FILE", "FORMAT", "HELDOUT_FILE", "INDEX_FILE", "SETTINGS_FILE", "SHARD_DIR", "ShardIndex",
           "heldout_documents", "is_prepared", "open_documents", "read_index", "token_dtype"]
