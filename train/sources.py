"""Reading corpora into documents: text (embedded, plain files, JSONL) and token files (.npy, .bin).

Document rules:
  embedded  ``corpus/kjv.txt.gz`` shipped with the package, split with the blank-line rule.
  text      a file, or every ``*.txt`` / ``*.txt.gz`` under a directory (recursive, sorted by
            path). ``doc_split="blank_line"``: a document is a maximal run of non-blank lines (a
            blank line is empty or whitespace only; lines are joined with ``\\n``, ``\\r\\n`` is
            read as ``\\n``). ``doc_split="file"``: each file is one document, stripped of
            leading and trailing whitespace.
  jsonl     a file, or every ``*.jsonl`` / ``*.jsonl.gz`` under a directory; one JSON object per
            non-blank line, its ``text_field`` (a string) is one document.
  npy/bin   a file, or every ``*.npy`` / ``*.bin`` under a directory: a 1-D integer token array
            (``.bin``: raw little-endian ``token_dtype`` with no header), documents separated by
            an EOS id. Opened with ``np.memmap``; only a chunked scan for separators reads them.

Text documents that are empty or whitespace only are dropped, so every text document encodes to
at least one token. Empty token documents (two separators in a row) are dropped too.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

EMBEDDED_CORPUS = "kjv.txt.gz"
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning a token file for separators


@dataclasses.dataclass(frozen=True, eq=False)
class Documents:
    """Tokenised documents: document ``i`` is ``arrays[file[i]][start[i]:end[i]]``.

    ``arrays`` are 1-D integer arrays (in memory, or ``np.memmap`` for token files); ``file``,
    ``start``, ``end`` are ``[D]`` int64. Separators (EOS) are not part of a document.
    """

    arrays: tuple[np.ndarray, ...]
    file: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return int(self.start.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """[D] int64 tokens per document."""
        return self.end - self.start

    @functools.cached_property
    def bases(self) -> np.ndarray:
        """[F + 1] int64: where each array starts when the arrays are laid end to end."""
        return np.concatenate([[0], np.cumsum([a.shape[0] for a in self.arrays], dtype=np.int64)])

    @functools.cached_property
    def global_start(self) -> np.ndarray:
        """[D] int64: where each document starts in the arrays laid end to end (``gather``'s positions)."""
        return self.bases[self.file] + self.start

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The int32 tokens at ``positions`` [N] (int64, in the arrays laid end to end). Reads only
        those tokens of a memory-mapped array."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(positions.shape, np.int32)
        which = np.searchsorted(self.bases, positions, side="right") - 1
        for f in np.unique(which):
            at = which == f
            out[at] = self.arrays[int(f)][positions[at] - self.bases[f]]
        return out

    def tokens(self, i: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Tokens ``[lo:hi]`` of document ``i`` as int32 (a copy; reads only that span)."""
        s, e = int(self.start[i]), int(self.end[i])
        hi = e - s if hi is None else min(hi, e - s)
        return np.asarray(self.arrays[int(self.file[i])][s + lo : s + hi], dtype=np.int32)


def documents_from_arrays(docs: Sequence[np.ndarray]) -> Documents:
    """Pack per-document id arrays ``[n_i]`` into one in-memory ``Documents``."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    end = np.cumsum(lengths)
    flat = np.concatenate(docs).astype(np.int32, copy=False) if docs else np.zeros(0, np.int32)
    return Documents((flat,), np.zeros(len(docs), np.int64), end - lengths, end)


# ---------------------------------------------------------------------------------------------
# Text


def embedded_text() -> str:
    """The embedded corpus as one string (documents separated by blank lines)."""
    res = importlib.resources.files("osdn_jax.train") / "corpus" / EMBEDDED_CORPUS
    return gzip.decompress(res.read_bytes()).decode("utf-8")


def split_blank_lines(text: str) -> list[str]:
    """Documents of ``text`` under the blank-line rule (see the module docstring)."""
    return list(_blank_line_documents(text.replace("\r\n", "\n").split("\n")))


def _blank_line_documents(lines: Iterable[str]) -> Iterator[str]:
    """Maximal runs of non-blank ``lines`` (without line ends), each joined with ``\\n``."""
    current: list[str] = []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            yield "\n".join(current)
            current = []
    if current:
        yield "\n".join(current)


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8-sig")  # drops a byte-order mark
    except UnicodeDecodeError as e:
        raise ValueError(f"path: {path} is not UTF-8 text ({e})") from None


def list_files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """``path`` itself if it is a file, else the files under it ending in ``suffixes``, sorted.

    Raises ValueError naming ``path`` when nothing is there.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ValueError(f"path: {p} does not exist")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    if not files:
        raise ValueError(f"path: no {'/'.join('*' + s for s in suffixes)} files under {p}")
    return files


def infer_kind(path: Path, suffixes: dict[str, tuple[str, ...]], what: str) -> str:
    """The kind (a key of ``suffixes``) of a file from its suffix, or of the files under a folder
    (exactly one kind must be there). ValueError otherwise, ending in the ``--source`` hint; ``what``
    names the files looked for (``"text / JSONL / token files"``)."""
    def kind(name: str) -> str | None:
        return next((k for k, ends in suffixes.items() if name.endswith(ends)), None)

    hint = f"pass --source {'|'.join(suffixes)}"
    if path.is_file():
        if (k := kind(path.name)) is None:
            raise ValueError(f"cannot tell the kind of {path} from its suffix; {hint}")
        return k
    kinds = sorted({k for f in path.rglob("*") if f.is_file() and (k := kind(f.name))})
    if len(kinds) != 1:
        found = f"files of kinds {kinds}" if kinds else f"no {what}"
        raise ValueError(f"{path} holds {found}; {hint}")
    return kinds[0]


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file (``.gz`` decompressed), streamed line by line.

    Lines end at ``\\n`` only (a trailing ``\\r`` is dropped); a byte-order mark is dropped; a line that
    is not UTF-8 raises ValueError naming the file and the line.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for n, raw in enumerate(fh, start=1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"path: {path}:{n} is not UTF-8 text ({e.reason} at byte {e.start})") from None
                yield n, line.rstrip("\n").removesuffix("\r")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"path: {path} cannot be read ({e})") from None


def iter_text_documents(path: Path, doc_split: str) -> Iterator[str]:
    """Documents of one text file, in order (the module docstring's rules), streamed for
    ``"blank_line"``; ``"file"`` reads the file as one document."""
    if doc_split == "file":
        text = _read_text_file(path).strip()
        if text:
            yield text
        return
    if doc_split != "blank_line":
        raise ValueError(f"doc_split must be 'blank_line' or 'file', got {doc_split!r}")
    yield from _blank_line_documents(line for _, line in _decoded_lines(path))


def read_text_documents(path: str | Path, doc_split: str) -> list[str]:
    """Documents of a text file or directory (``doc_split``: ``"blank_line"`` or ``"file"``)."""
    if doc_split not in ("blank_line", "file"):
        raise ValueError(f"doc_split must be 'blank_line' or 'file', got {doc_split!r}")
    return [d for f in list_files(path, TEXT_SUFFIXES) for d in iter_text_documents(f, doc_split)]


def iter_jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """The non-blank ``text_field`` strings of one JSONL file, in order, streamed line by line."""
    for n, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"path: {path}:{n} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"text_field: {path}:{n} has no field {text_field!r}")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"text_field: {path}:{n} field {text_field!r} is {type(text).__name__}, not str")
        if text.strip():
            yield text


def read_jsonl_documents(path: str | Path, text_field: str) -> list[str]:
    """The ``text_field`` string of every record of a JSONL file or directory."""
    return [d for f in list_files(path, JSONL_SUFFIXES) for d in iter_jsonl_documents(f, text_field)]


# ---------------------------------------------------------------------------------------------
# Parquet (read by ``python -m osdn_jax.train.prepare``; needs pyarrow, the ``data`` extra)


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Parquet input needs pyarrow: pip install 'osdn-jax[data]'") from None
    return pq


def parquet_row_groups(path: Path, column: str) -> list[int]:
    """Uncompressed bytes of each row group of a Parquet file, after checking that it opens and has
    a string (or binary) ``column``. Errors name the file and the column."""
    pq = _pyarrow_parquet()
    import pyarrow as pa

    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
        raise ValueError(f"path: {path} is not a readable Parquet file ({e})") from None
    if column not in schema.names:
        raise ValueError(f"text_column: {path} has no column {column!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or pa.types.is_string_view(kind)):
        raise ValueError(f"text_column: {path} column {column!r} holds {kind}, not strings")
    return [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]


def iter_parquet_documents(path: Path, column: str, row_groups: Sequence[int], batch_rows: int = 1024) -> Iterator[str]:
    """The non-blank ``column`` strings of ``row_groups`` of a Parquet file, in order, streamed one
    record batch at a time (peak memory: one batch, not the file). Null values are skipped."""
    pq = _pyarrow_parquet()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"path: {path} is not a readable Parquet file ({e})") from None
    for rg in row_groups:
        row = 0
        for values in _parquet_values(pf, path, rg, column, batch_rows):
            for value in values:
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"path: {path} row group {rg} row {row} is not UTF-8 text "
                                         f"({e.reason} at byte {e.start})") from None
                row += 1
                if value is not None and value.strip():
                    yield value


def _parquet_values(pf, path: Path, rg: int, column: str, batch_rows: int) -> Iterator[list]:
    """``column``'s values of row group ``rg``, one record batch at a time; read errors name the row group."""
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=[column]):
            yield batch.column(0).to_pylist()
    except Exception as e:  # ArrowInvalid, OSError, ... from a damaged page
        raise ValueError(f"path: {path} row group {rg} cannot be read ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Token files


def open_token_file(path: Path, dtype: str) -> np.ndarray:
    """A read-only memmap of a ``.npy`` (1-D integer) or ``.bin`` (raw ``dtype``) token file."""
    if path.stat().st_size == 0:
        raise ValueError(f"path: token file {path} is empty")
    if path.name.endswith(".npy"):
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"path: {path} must hold a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
        return arr
    itemsize = np.dtype(dtype).itemsize
    if path.stat().st_size % itemsize:
        raise ValueError(
            f"token_dtype: size of {path} ({path.stat().st_size} bytes) is not a multiple of "
            f"{dtype} ({itemsize} bytes)"
        )
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


def scan_documents(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Split a 1-D token array on ``eos_id`` without reading it whole.

    Returns ``(start [D], end [D], max_id)``: non-empty documents ``tokens[start:end]`` and the
    largest id in the array (for a vocabulary check).
    """
    n = int(tokens.shape[0])
    seps, max_id = [], -1
    for lo in range(0, n, _SCAN_CHUNK):
        chunk = np.asarray(tokens[lo : lo + _SCAN_CHUNK])
        seps.append(np.flatnonzero(chunk == eos_id) + lo)
        max_id = max(max_id, int(chunk.max()))
        if chunk.min() < 0:
            raise ValueError("token file holds negative ids")
    sep = np.concatenate(seps).astype(np.int64) if seps else np.zeros(0, np.int64)
    # Documents lie between consecutive separators (and the array ends).
    start = np.concatenate([[0], sep + 1])
    end = np.concatenate([sep, [n]])
    keep = end > start
    return start[keep], end[keep], max_id


def read_token_documents(
    path: str | Path, suffix: str, dtype: str, eos_id: int
) -> tuple[Documents, int]:
    """``Documents`` over the token files at ``path`` (memmapped) and their largest id."""
    arrays, files, starts, ends, max_id = [], [], [], [], -1
    for i, f in enumerate(list_files(path, (suffix,))):
        arr = open_token_file(f, dtype)
        try:
            start, end, m = scan_documents(arr, eos_id)
        except ValueError as e:
            raise ValueError(f"path: {f}: {e}") from None
        arrays.append(arr)
        files.append(np.full(len(start), i, np.int64))
        starts.append(start)
        ends.append(end)
        max_id = max(max_id, m)
    docs = Documents(tuple(arrays), np.concatenate(files), np.concatenate(starts), np.concatenate(ends))
    return docs, max_id


def write_token_file(path: str | Path, docs: Sequence[np.ndarray], eos_id: int, dtype: str | None = None) -> Path:
    """Write documents as one token file, each followed by ``eos_id``.

    ``.npy`` files carry their dtype; ``.bin`` files are raw little-endian ``dtype``, which
    defaults to uint16 when every id (EOS included) fits, else uint32. Returns the path.
    """
    path = Path(path)
    if not docs:
        raise ValueError("write_token_file: no documents")
    max_id = max([eos_id, *(int(d.max()) for d in docs if len(d))])
    dtype = dtype or ("uint16" if max_id < 2**16 else "uint32")
    if max_id > np.iinfo(dtype).max:
        raise ValueError(f"token_dtype: id {max_id} does not fit {dtype}")
    eos = np.array([eos_id])
    flat = np.concatenate([x for d in docs for x in (np.asarray(d), eos)])
    flat = flat.astype(np.dtype(dtype).newbyteorder("<"))
    if path.name.endswith(".npy"):
        np.save(path, flat, allow_pickle=False)
    elif path.name.endswith(".bin"):
        flat.tofile(path)
    else:
        raise ValueError(f"path: token file {path} must end in .npy or .bin")
    return path
