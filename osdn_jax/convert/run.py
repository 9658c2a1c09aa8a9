"""Between an fla checkpoint folder and one of our run directories.

An imported run directory holds

- ``model.json``: the ``ModelConfig`` (``ModelSettings.config_path`` points at it);
- ``init/``: the parameters, an orbax checkpoint (``ModelSettings.init_from``);
- ``tokenizer.json`` and ``config.json`` (the training config), as every run has;
- ``fla_config.json``: the source's config.json, kept for the token ids an export writes back.

``python -m osdn_jax.train --config RUN/config.json`` fine-tunes it (from ``init/`` with a fresh
optimizer, then resuming from its own checkpoints), and ``train.evaluate`` / ``generate`` read it
like any run (``init/`` until the first checkpoint).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flax import nnx

from osdn_jax.convert.fla import check_new_folder, load_fla, new_folder, save_fla
from osdn_jax.train.checkpoint import save_params
from osdn_jax.train.config import ModelSettings, TrainConfig, to_dict
from osdn_jax.train.data import DataConfig
from osdn_jax.train.tokenizer import BpeTokenizer, ByteTokenizer, Tokenizer, load_tokenizer, save_tokenizer

MODEL_FILE = "model.json"
INIT_DIR = "init"
SOURCE_CONFIG = "fla_config.json"


def _tokenizer(spec: str | None, source: Path, vocab_size: int) -> Tokenizer:
    """The run's tokenizer: ``spec`` (``byte``, a ``tokenizer.json`` / run directory), else the
    source folder's Hugging Face ``tokenizer.json`` (its eos from ``tokenizer_config.json``)."""
    if spec == "byte":
        tok = ByteTokenizer()
    elif spec is not None:
        tok = load_tokenizer(spec)
    elif (source / "tokenizer.json").is_file():
        tok = load_tokenizer(source / "tokenizer.json")  # its EOS from tokenizer_config.json beside it
    else:
        raise ValueError(f"tokenizer: {source} has no tokenizer.json; pass --tokenizer (byte, a tokenizer.json or a "
                         "run directory)")
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer: {tok.vocab_size} ids do not fit the model's vocab_size={vocab_size}")
    return tok


def import_run(source: str | Path, run_dir: str | Path, *, as_osdn: bool = False, tokenizer: str | None = None,
               param_dtype: str = "float32", compute_dtype: str = "bfloat16", seq_len: int = 1024,
               ignore_fields: tuple[str, ...] = ()) -> Path:
    """Imports the fla checkpoint folder ``source`` into a new run directory ``run_dir`` (written
    whole or not at all). ``compute_dtype`` / ``seq_len`` go into the training config."""
    source, run_dir = Path(source), Path(run_dir)
    check_new_folder("run_dir", run_dir)  # before loading: a model can take minutes
    model, cfg = load_fla(source, as_osdn=as_osdn, param_dtype=param_dtype, compute_dtype=compute_dtype,
                          ignore_fields=ignore_fields)
    tok = _tokenizer(tokenizer, source, cfg.vocab_size)
    with new_folder("run_dir", run_dir) as tmp:
        (tmp / MODEL_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        shutil.copyfile(source / "config.json", tmp / SOURCE_CONFIG)
        save_tokenizer(tok, tmp)
        save_params(tmp / INIT_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        settings = ModelSettings(config_path=MODEL_FILE, init_from=INIT_DIR)
        train = TrainConfig(run_dir=str(run_dir.absolute()), model=settings,
                            data=DataConfig(tokenizer=tok.kind, seq_len=seq_len))
        (tmp / "config.json").write_text(json.dumps({"train": to_dict(train), "model": cfg.to_dict(),
                                                     "imported_from": str(source.absolute()),
                                                     "upcycled": as_osdn}, indent=2) + "\n")
    return run_dir


def export_run(run_dir: str | Path, dest: str | Path, *, step: int | None = None, dtype: str | None = None,
               max_shard_size: int | str | None = None, as_deltanet: bool = False) -> tuple[Path, int]:
    """Writes the checkpoint ``step`` (default the newest) of ``run_dir`` as an fla folder ``dest``;
    the tokenizer goes along as ``tokenizer.json`` when it is a Hugging Face BPE. Returns
    ``(dest, step)``."""
    from osdn_jax.train.evaluate import load_run

    model, tok, _, step = load_run(run_dir, step)
    token_ids = {"eos_token_id": tok.eos_id}
    source = Path(run_dir) / SOURCE_CONFIG
    if source.is_file():
        fla = json.loads(source.read_text())
        token_ids.update({k: fla[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in fla})
    files = {}
    if isinstance(tok, BpeTokenizer):  # Hugging Face's fast tokenizer reads these two
        eos = tok._tok.id_to_token(tok.eos_id)
        files = {"tokenizer.json": tok.hf_json(),
                 "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos})}
    written = save_fla(model, dest, dtype=dtype, max_shard_size=max_shard_size, as_deltanet=as_deltanet,
                       token_ids=token_ids, extra_files=files)
    return written, step


__all__ = ["export_run", "import_run"]
