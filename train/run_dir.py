"""The run directory's rules: what a run keeps for its whole life, what a resume may change, and
where an earlier run's files go when a run starts over in place.

A run directory holds ``config.json`` (``{"train": ..., "model": ...}``), ``tokenizer.json``,
``checkpoints/<step>/``, ``metrics.jsonl``, ``tensorboard/``, ``summary.json``, ``loss.png``, ``eval/``
and ``profile/`` (``--profile.steps``). The
training loop checks a directory before it writes anything to it:

- resuming (``checkpoint.resume``, the default) from checkpoints trained with other ``KEPT_FIELDS``
  is refused with one error naming each field and both values (``check``);
- before the first checkpoint, ``tokenizer.json`` fixes only the ``TOKENIZER_FIELDS``;
- every other field may change and is recorded (``changes``: a ``config`` row in the metrics and the
  new ``config.json``);
- ``--checkpoint.resume False`` starts over in place: the earlier run's files move to
  ``previous-<date>-<time>/`` (``set_aside``), with a copy of its config and tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from osdn_jax.train.tokenizer import TOKENIZER_FILE

CONFIG_FILE = "config.json"
PREVIOUS_PREFIX = "previous-"
# What a run leaves besides its config and tokenizer; starting over moves them aside.
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "loss.png", "eval", "tensorboard", "profile")

# Settings a run keeps for its whole life: they fix the parameters (their shapes and initial
# values), the optimizer state's layout or the data stream a checkpoint continues.
KEPT_FIELDS = (
    "seed",
    "model.preset", "model.mixer", "model.osdn_preset", "model.apf", "model.beta_aware", "model.hidden_size",
    "model.num_layers", "model.num_heads", "model.config_path",
    "data.source", "data.path", "data.text_field", "data.doc_split", "data.token_dtype", "data.token_eos_id",
    "data.tokenizer", "data.tokenizer_path", "data.bpe_vocab_size", "data.tiktoken_encoding", "data.seq_len",
    "data.batch_size", "data.seed", "data.eval_fraction", "data.append_eos", "data.packing_bins",
    "data_split",
    "optim.grad_clip",  # only turning clipping on or off: the optimizer state's layout
)
# Everything else may change when a run resumes: steps (the learning-rate schedule's length), optim
# (but clipping on/off), mesh, dist, checkpoint, log, eval_every, eval_batches, run_steps,
# max_bad_steps, sample_*, and how the same parameters are computed or first set (model.impl,
# chunk_size, precision, compute_dtype, remat, init_from).
TOKENIZER_FIELDS = ("data.tokenizer", "data.tokenizer_path", "data.bpe_vocab_size", "data.tiktoken_encoding")
_PATH_FIELDS = ("data.path", "data.tokenizer_path", "model.config_path")
_NOT_RECORDED = ("run_dir", "checkpoint.resume")
_MISSING = object()


class RunDirError(ValueError):
    """The run directory does not fit the command (the CLI prints it and exits with status 2)."""


# -- comparing configs -------------------------------------------------------------------------

def _get(tree: dict, field: str):
    for key in field.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_leaves(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def _applies(field: str, train: dict) -> bool:
    """Whether ``field`` matters to the run ``train`` (e.g. ``bpe_vocab_size`` only to a BPE that the
    run trains, the preset's fields only without ``model.config_path``)."""
    data = train.get("data", {})
    source, tokenizer = data.get("source"), data.get("tokenizer")
    rules = {
        "data.path": source != "embedded",
        "data.text_field": source == "jsonl",
        "data.doc_split": source == "text",
        "data.token_dtype": source == "bin",
        "data.token_eos_id": source in ("npy", "bin"),
        "data.bpe_vocab_size": tokenizer == "bpe" and data.get("tokenizer_path") is None,
        "data.tiktoken_encoding": tokenizer == "tiktoken",
    }
    if field.startswith("model.") and field != "model.config_path":
        return _get(train, "model.config_path") in (None, _MISSING)
    return rules.get(field, True)


def _same(field: str, old, new) -> bool:
    if field == "optim.grad_clip":
        return (old > 0) == (new > 0)
    if field in _PATH_FIELDS and isinstance(old, str) and isinstance(new, str):
        return old == new or Path(old).resolve() == Path(new).resolve()
    return old == new


def differences(old: dict, new: dict, fields=KEPT_FIELDS) -> list[tuple[str, object, object]]:
    """``(field, old value, new value)`` for each of ``fields`` that differs between two train
    configs (nested dicts); fields the old config does not record, or that matter to neither, are
    skipped."""
    out = []
    for field in fields:
        a, b = _get(old, field), _get(new, field)
        if a is _MISSING or not (_applies(field, old) or _applies(field, new)) or _same(field, a, b):
            continue
        out.append((field, a, b))
    return out


def changes(old: dict, new: dict) -> dict[str, list]:
    """``{field: [old, new]}`` for every setting that differs (the record of a resume)."""
    before, after = _leaves(old), _leaves(new)
    return {k: [before[k], v] for k, v in after.items()
            if k in before and before[k] != v and k not in _NOT_RECORDED}


def _show(field: str, value) -> str:
    """A setting as the refusal names it; an unset model field means the model preset's value."""
    if value is None and field.startswith("model.") and field != "model.config_path":
        return "not given (the preset's value)"
    return repr(value)


def check(run_dir: Path, old: dict, new: dict, fields, what: str) -> None:
    """Raises a ``RunDirError`` naming each of ``fields`` that ``new`` changes, and the ways out."""
    diff = differences(old, new, fields)
    if not diff:
        return
    changed = ", ".join(f"{field} {_show(field, a)} -> {_show(field, b)}" for field, a, b in diff)
    same = "give the run's values"
    if (run_dir / CONFIG_FILE).is_file():
        same += f" (--config {run_dir / CONFIG_FILE}, then flags that may change, such as --steps)"
    raise RunDirError(f"run_dir {run_dir}: {what}; this command changes {changed}. To resume, {same}; for a new "
                      f"run, use another --run-dir; to start over here, pass --checkpoint.resume False (the "
                      f"earlier run's checkpoints and metrics move to {run_dir / PREVIOUS_PREFIX}<date>-<time>/)")


# -- the directory -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunDir:
    """What a run directory holds before a run starts (read only)."""

    path: Path
    existed: bool
    saved: dict | None  # config.json
    has_tokenizer: bool

    @classmethod
    def read(cls, path: str | Path) -> RunDir:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"run_dir: {path} is not a folder")
        return cls(path, path.exists(), _read_config(path / CONFIG_FILE), (path / TOKENIZER_FILE).is_file())

    @property
    def saved_train(self) -> dict | None:
        return None if self.saved is None else self.saved["train"]

    def has_run_files(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES)

    def set_aside(self, keep_tokenizer: bool) -> Path:
        """Moves an earlier run's files (``RUN_FILES``) to a new ``previous-<date>-<time>/`` and copies
        its config there; its tokenizer is copied (``keep_tokenizer``) or moved. Returns the folder."""
        dest = free_path(self.path / (PREVIOUS_PREFIX + time.strftime("%Y%m%d-%H%M%S")))
        dest.mkdir(parents=True)
        for name in RUN_FILES:
            if (self.path / name).exists():
                shutil.move(self.path / name, dest / name)
        if (self.path / CONFIG_FILE).is_file():
            shutil.copy2(self.path / CONFIG_FILE, dest / CONFIG_FILE)
        if (self.path / TOKENIZER_FILE).is_file():
            (shutil.copy2 if keep_tokenizer else shutil.move)(self.path / TOKENIZER_FILE, dest / TOKENIZER_FILE)
        return dest

    def write_config(self, train: dict, model: dict) -> None:
        """``config.json`` with the run's settings now; other entries (e.g. an import's) are kept."""
        record = {**(self.saved or {}), "train": train, "model": model}
        write_atomic(self.path / CONFIG_FILE, json.dumps(record, indent=2))


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"run_dir: {path} is not valid JSON ({e}); repair or remove it, or use another "
                          f"--run-dir") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
        raise RunDirError(f"run_dir: {path} holds no 'train' settings (not a training run's config.json)")
    return saved


def free_path(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first name not taken."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def write_atomic(path: Path, text: str) -> None:
    """Writes ``path`` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["KEPT_FIELDS", "TOKENIZER_FIELDS", "RunDir", "RunDirError", "changes", "check", "differences",
           "free_path", "write_atomic"]
