"""The training configuration: a tree of frozen dataclasses, read from the command line (tyro),
optionally on top of a JSON config file (``--config run.json``).

Every field is listed with its default by ``python -m osdn_jax.train --help``. Unknown keys (on the
command line or in the file) and bad values fail before any work starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import typing
from pathlib import Path

from osdn_jax.loss import DEFAULT_LOSS_CHUNK
from osdn_jax.model import ModelConfig, model_config
from osdn_jax.ops.checks import require
from osdn_jax.train import shards, sources
from osdn_jax.train.data import DataConfig


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """A model preset (``tiny``, ``small``, ``osdn-340m``, ``deltanet-1.3b``, ...) and overrides.

    ``vocab_size`` always comes from the tokenizer. ``None`` keeps the preset's value.
    """

    preset: str = "tiny"  # tiny | small | {deltanet,gdn,osdn,osdn-apf,os-gdn,attention}-{340m,1.3b}
    mixer: str | None = None  # deltanet | gdn | osdn | os_gdn | attention (its default config)
    osdn_preset: str | None = None  # OSDN mixers: apr | may | apr-d1 (short documents, retrieval)
    apf: bool | None = None  # OSDN mixers: the forgetting gate
    beta_aware: bool | None = None  # OSDN mixers: the β-aware hypergradient
    impl: str | None = None  # delta-rule mixers' ops path: auto | reference | chunked | pallas
    chunk_size: int | None = None  # delta-rule mixers: tokens per chunk of the chunked / pallas paths
    precision: str | None = None  # Pallas kernels' multiply policy: tf32 | ieee (None: by compute dtype)
    hidden_size: int | None = None  # model width
    num_layers: int | None = None  # blocks
    num_heads: int | None = None  # heads per mixer
    compute_dtype: str | None = None  # float32 | bfloat16 (parameters and optimizer state stay fp32)
    remat: bool | None = None  # recompute each block in the backward pass (less memory)
    scan_layers: bool | None = None  # stack the layers and scan them (compiled once); False: one module per layer
    # A ModelConfig JSON (``model.json``, written by ``python -m osdn_jax.convert import``) replacing
    # the preset; a relative path is taken from the run directory. Its vocab size is kept.
    config_path: str | None = None
    # Parameters to start from when the run has no checkpoint to resume (an orbax checkpoint of the
    # parameters, e.g. the ``init`` folder an import writes); a relative path is taken from the run dir.
    init_from: str | None = None

    def resolve(self, path: str, run_dir: str | Path | None) -> Path:
        """``path`` (``config_path`` / ``init_from``), relative paths taken from ``run_dir``."""
        p = Path(path)
        return p if p.is_absolute() or run_dir is None else Path(run_dir) / p

    def build(self, vocab_size: int, max_seq_len: int, run_dir: str | Path | None = None) -> ModelConfig:
        """The ``ModelConfig`` of this run (the vocab from the tokenizer, rows up to ``max_seq_len``).
        With ``config_path``, the model in that file (the tokenizer must fit its vocab)."""
        if self.config_path is not None:
            return self._build_from_file(vocab_size, max_seq_len, run_dir)
        cfg = model_config(self.preset, mixer=self.mixer)
        mixer_changes = {"preset": self.osdn_preset, "apf": self.apf, "beta_aware": self.beta_aware,
                         "impl": self.impl, "chunk_size": self.chunk_size, "precision": self.precision}
        mixer_changes = {k: v for k, v in mixer_changes.items() if v is not None}
        osdn_only = {"preset", "apf", "beta_aware"} & set(mixer_changes)
        if osdn_only and not hasattr(cfg.mixer, "preset"):
            names = sorted("osdn_preset" if k == "preset" else k for k in osdn_only)
            raise ValueError(f"model: {names} only apply to OSDN mixers, not {cfg.mixer.name!r}")
        delta_only = {"impl", "chunk_size", "precision"} & set(mixer_changes)
        if delta_only and not hasattr(cfg.mixer, "impl"):
            raise ValueError(f"model: {sorted(delta_only)} only apply to the delta-rule mixers (deltanet, gdn, "
                             f"osdn, os_gdn), not {cfg.mixer.name!r}")
        mixer = dataclasses.replace(cfg.mixer, **mixer_changes)
        overrides = {k: getattr(self, k) for k in ("hidden_size", "num_layers", "num_heads", "compute_dtype",
                                                   "remat", "scan_layers") if getattr(self, k) is not None}
        return dataclasses.replace(cfg, mixer=mixer, vocab_size=vocab_size,
                                   max_seq_len=max(cfg.max_seq_len, max_seq_len), **overrides)

    def _build_from_file(self, vocab_size: int, max_seq_len: int, run_dir) -> ModelConfig:
        path = self.resolve(self.config_path, run_dir)
        if not path.is_file():
            raise ValueError(f"model.config_path: no such file {str(path)!r}")
        try:
            cfg = ModelConfig.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"model.config_path: {path}: {e}") from None
        fixed = [k for k in ("mixer", "osdn_preset", "apf", "beta_aware", "hidden_size", "num_layers", "num_heads")
                 if getattr(self, k) is not None]
        if fixed:
            raise ValueError(f"model: {fixed} cannot change the model of config_path {path} (its weights fix them)")
        if vocab_size > cfg.vocab_size:
            raise ValueError(f"model.config_path: the tokenizer has {vocab_size} ids, more than the model's "
                             f"vocab_size={cfg.vocab_size} ({path})")
        mixer_changes = {k: getattr(self, k) for k in ("impl", "chunk_size", "precision")
                         if getattr(self, k) is not None}
        mixer = cfg.mixer
        if mixer_changes:
            if not hasattr(mixer, "impl"):
                raise ValueError(f"model: {sorted(mixer_changes)} only apply to the delta-rule mixers, not "
                                 f"{mixer.name!r}")
            mixer = dataclasses.replace(mixer, **mixer_changes)
        overrides = {k: getattr(self, k) for k in ("compute_dtype", "remat", "scan_layers")
                     if getattr(self, k) is not None}
        return dataclasses.replace(cfg, mixer=mixer, max_seq_len=max(cfg.max_seq_len, max_seq_len), **overrides)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio · lr``; global-norm clipping.
    Weight decay skips norms, biases and the mixers' d0 / A_log / dt_bias."""

    lr: float = 3e-3  # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1  # the cosine decay ends at min_lr_ratio · lr on the last step
    warmup_steps: int = 50  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    b1: float = 0.9  # Adam β1
    b2: float = 0.95  # Adam β2
    eps: float = 1e-8  # Adam ε
    grad_clip: float = 1.0  # 0 turns clipping off
    grad_accum: int = 1  # micro-batches per step (the batch is split along rows)

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", "> 0", self.lr)
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        require(self.warmup_steps >= 0, "optim.warmup_steps", ">= 0", self.warmup_steps)
        require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1, optim.b2", "in [0, 1)", (self.b1, self.b2))
        require(self.grad_clip >= 0, "optim.grad_clip", ">= 0", self.grad_clip)
        require(self.grad_accum >= 1, "optim.grad_accum", ">= 1", self.grad_accum)


# Fewest positions of a row per ``context`` device: the short convolution (4 taps) takes a halo
# of 3 positions from the previous device.
MIN_CONTEXT_SHARD = 4


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, context)``: batch rows are split over ``data`` × ``fsdp``, the
    time axis of each row over ``context`` (context parallelism: one long sequence over several
    devices), parameters and optimizer state over ``fsdp`` (their ``embed`` dimension; replicated
    over ``data`` and ``context``). ``data=-1`` takes every remaining device:
    ``data = devices // (fsdp · context)``."""

    data: int = -1  # devices the batch rows are split over (-1: devices // (fsdp · context))
    fsdp: int = 1  # devices the rows, parameters and optimizer state are split over
    context: int = 1  # devices sharing each row's time axis (a divisor of data.seq_len)
    cpu_devices: int | None = None  # fake CPU devices (jax_num_cpu_devices), for tests and trials

    def __post_init__(self):
        require(self.data == -1 or self.data >= 1, "mesh.data", "-1 or >= 1", self.data)
        require(self.fsdp >= 1, "mesh.fsdp", ">= 1", self.fsdp)
        require(self.context >= 1, "mesh.context", ">= 1", self.context)
        require(self.cpu_devices is None or self.cpu_devices >= 1, "mesh.cpu_devices", "None or >= 1",
                 self.cpu_devices)


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """Multi-host runs through ``jax.distributed.initialize``. With ``enabled`` and no address, JAX
    detects the cluster (SLURM, Open MPI, Kubernetes...); otherwise give all three fields."""

    enabled: bool = False  # start JAX's multi-process runtime (several hosts)
    coordinator: str | None = None  # host:port of process 0
    num_processes: int | None = None  # processes in the run, one per host
    process_id: int | None = None  # this process: 0 .. num_processes - 1
    cpu_collectives: str = "gloo"  # CPU backend collectives across processes


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``<run_dir>/checkpoints``: async, atomic, ``keep`` newest kept. A run
    restarts from the newest one (``resume``); SIGTERM saves one before exiting."""

    every: int = 200  # steps between saves (0: only at the end)
    keep: int = 3  # newest checkpoints kept
    resume: bool = True  # start from the newest checkpoint in run_dir, if there is one
    async_save: bool = True  # write checkpoints in the background while training goes on

    def __post_init__(self):
        require(self.every >= 0, "checkpoint.every", ">= 0", self.every)
        require(self.keep >= 1, "checkpoint.keep", ">= 1", self.keep)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Progress bar on process 0, ``metrics.jsonl``, TensorBoard scalars and ``loss.png`` in the run
    directory. MFU (model FLOP utilisation, ``osdn_jax.flops``) is logged where the devices' peak is
    known: ``peak_tflops``, else the peak table's entry for the GPU and the compute dtype."""

    every: int = 10  # steps between metric rows
    progress: bool = True  # progress bar (step, loss, tokens/s, MFU, ETA)
    plot: bool = True  # draw loss.png
    tensorboard: bool = True  # also write the metric rows as TensorBoard scalars in <run_dir>/tensorboard
    # one device's peak in TFLOP/s for the MFU (overrides the GPU table, e.g. to see MFU on a CPU);
    # None: the table's (H100, H200, A100), no MFU elsewhere
    peak_tflops: float | None = None

    def __post_init__(self):
        require(self.peak_tflops is None or self.peak_tflops > 0, "log.peak_tflops", "None or > 0",
                self.peak_tflops)


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """A ``jax.profiler`` trace of some training steps, written to ``<run_dir>/profile/`` (open it
    with TensorBoard's profile plugin or xprof, or load its ``.trace.json.gz`` in ui.perfetto.dev)."""

    # A:B traces steps A to B (1-based, as in metrics.jsonl; e.g. 10:12, after the compile); None: no trace
    steps: str | None = None

    def __post_init__(self):
        _ = self.window  # checks the value

    @property
    def window(self) -> tuple[int, int] | None:
        """``(A, B)`` of ``steps``, or None."""
        if self.steps is None:
            return None
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.steps))
        ok = m is not None and 1 <= int(m.group(1)) <= int(m.group(2))
        require(ok, "profile.steps", "'A:B' with 1 <= A <= B (training steps A to B, 1-based), e.g. '10:12'",
                self.steps)
        return int(m.group(1)), int(m.group(2))


def _source_from_suffix(path: str) -> str | None:
    """The ``data.source`` that ``path``'s suffix names (``.jsonl`` -> jsonl), or None."""
    if shards.is_prepared(path):
        return "shards"
    suffixes = {"text": sources.TEXT_SUFFIXES, "jsonl": sources.JSONL_SUFFIXES, "npy": (".npy",), "bin": (".bin",)}
    return next((kind for kind, ends in suffixes.items() if path.endswith(ends)), None)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. With no arguments: the ``tiny`` OSDN model on the embedded corpus (CPU,
    a few minutes), then held-out perplexity, a checkpoint and a sample."""

    run_dir: str = "runs/tiny-osdn"  # the run's folder: config, tokenizer, checkpoints, metrics, plots
    steps: int = 600  # optimizer steps of the whole run (the learning-rate schedule ends there)
    seed: int = 42  # parameter init (the data order has its own data.seed)
    model: ModelSettings = ModelSettings()
    #: Where the data comes from, its tokenizer, and the shape of a batch.
    data: DataConfig = DataConfig(batch_size=16, seq_len=256)
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    dist: DistConfig = DistConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    #: A ``jax.profiler`` trace of some steps (``--profile.steps 10:12``) in ``<run_dir>/profile``.
    profile: ProfileConfig = ProfileConfig()
    eval_every: int = 200  # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 8  # held-out batches per evaluation
    run_steps: int | None = None  # stop after this many steps in this invocation (with a checkpoint)
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    #: positions of each row whose vocabulary-sized logits exist at once in the loss (peak: rows per
    #: device × loss_chunk × vocab fp32 floats, and as many for their gradient); 0: all T at once
    loss_chunk: int = DEFAULT_LOSS_CHUNK
    #: how processes share the data: rows (each reads the global batch and keeps its rows, so batches
    #: do not depend on the process count) | documents (each reads only its share of the documents)
    data_split: str = "rows"
    sample_prompt: str = "And God said"  # the text the end-of-run sample continues
    sample_tokens: int = 200  # tokens sampled at the end (0: no sample)

    def __post_init__(self):
        require(self.steps >= 1, "steps", ">= 1", self.steps)
        require(self.eval_every >= 0, "eval_every", ">= 0", self.eval_every)
        require(self.eval_batches >= 1, "eval_batches", ">= 1", self.eval_batches)
        require(self.run_steps is None or self.run_steps >= 1, "run_steps", "None or >= 1", self.run_steps)
        require(self.max_bad_steps >= 1, "max_bad_steps", ">= 1", self.max_bad_steps)
        require(self.loss_chunk >= 0, "loss_chunk", ">= 0 (0: the whole logits at once)", self.loss_chunk)
        require(self.data_split in ("rows", "documents"), "data_split", "'rows' or 'documents'", self.data_split)
        require(self.sample_tokens >= 0, "sample_tokens", ">= 0", self.sample_tokens)
        require(self.data.batch_size % self.optim.grad_accum == 0, "data.batch_size",
                 f"a multiple of optim.grad_accum={self.optim.grad_accum}", self.data.batch_size)
        self._check_data_path()
        self._check_mesh_fits_batch()

    def _check_data_path(self) -> None:
        """The embedded corpus reads no file, so a ``data.path`` with it would be silently ignored."""
        if self.data.source == "embedded" and self.data.path:
            kind = _source_from_suffix(self.data.path)
            hint = f" (its suffix says --data.source {kind})" if kind else ""
            raise ValueError(f"data.path={self.data.path!r} needs data.source text, jsonl, npy, bin or shards{hint}: "
                             "data.source='embedded' (the default) is the packaged corpus, which reads no path")

    def _check_mesh_fits_batch(self) -> None:
        """Rows ``[B, T]`` split over ``data`` × ``fsdp`` (``data=-1``: checked once the device
        count is known, ``sharding.check_batch``) and time over ``context``: each device keeps at
        least ``MIN_CONTEXT_SHARD`` positions, since the short convolution reads the last 3 of the
        previous device."""
        T, P = self.data.seq_len, self.mesh.context
        require(T % P == 0, "mesh.context", f"a divisor of data.seq_len={T}", P)
        require(T // P >= MIN_CONTEXT_SHARD, "mesh.context",
                f"at most data.seq_len / {MIN_CONTEXT_SHARD} = {T // MIN_CONTEXT_SHARD} (each device needs "
                f"{MIN_CONTEXT_SHARD} or more positions of data.seq_len={T})", P)
        if self.mesh.data != -1:
            rows = self.mesh.data * self.mesh.fsdp
            require(self.data.batch_size % rows == 0, "data.batch_size",
                    f"a multiple of mesh.data · mesh.fsdp = {rows} (rows are split over data × fsdp)",
                    self.data.batch_size)


# -- config files ------------------------------------------------------------------------------

def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls, values: dict, where: str):
    """``cls(**values)`` with nested dataclasses; unknown keys raise a ValueError naming them."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'}: expected a JSON object, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown keys {unknown}; expected some of {sorted(names)}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        t = types_[key]
        if dataclasses.is_dataclass(t) and isinstance(t, type):
            value = _from_dict(t, value, f"{where}.{key}" if where else key)
        kwargs[key] = value
    return cls(**kwargs)


def from_dict(values: dict) -> TrainConfig:
    """A ``TrainConfig`` from a (possibly partial) nested dict, e.g. a run's ``config.json``."""
    return _from_dict(TrainConfig, values, "")


def to_dict(cfg) -> dict:
    """The config as a JSON-ready dict (nested)."""
    return dataclasses.asdict(cfg)


def load_config_file(path: str | Path) -> TrainConfig:
    """A ``TrainConfig`` from a JSON file holding any subset of the fields (nested objects), or a
    run's ``config.json`` (its ``train`` entry: the run's own settings, to resume or continue it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config: {path} is not valid JSON ({e})") from None
    if isinstance(values, dict) and isinstance(values.get("train"), dict):  # a run's config.json
        values = run_settings(values)
    return _from_dict(TrainConfig, values, "")


def run_settings(saved: dict) -> dict:
    """The ``train`` entry of a run's ``config.json``. Runs recorded before ``data.path`` was checked
    may pair the embedded source with a path, which that source never read: the path is dropped."""
    values = saved["train"]
    data = values.get("data")
    if isinstance(data, dict) and data.get("source", "embedded") == "embedded" and data.get("path"):
        values = {**values, "data": {**data, "path": None}}
    return values


def _take_option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """``(value of --name, argv without it)``; ``--name value`` or ``--name=value``."""
    for i, arg in enumerate(argv):
        if arg == name or arg.startswith(name + "="):
            if "=" in arg:
                return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
            if i + 1 >= len(argv):
                raise ValueError(f"{name}: expected a value")
            return argv[i + 1], argv[:i] + argv[i + 2:]
    return None, argv


# -- the command line --------------------------------------------------------------------------

PROG = "python -m osdn_jax.train"

# ``--help`` for the data flags. ``DataConfig`` (train/data.py) documents its fields in a table in
# its docstring, which tyro does not read per field; these entries replace the table's where the
# command line needs other words.
DATA_FLAG_HELP = {
    "source": "embedded (the packaged KJV excerpt; takes no data.path) | text | jsonl | npy | bin | shards "
              "(a folder made by python -m osdn_jax.train.prepare)",
    "path": "what data.source reads: a file, or a folder searched recursively for *.txt(.gz) (text), "
            "*.jsonl(.gz) (jsonl), *.npy or *.bin files, or a prepared folder (shards); required by every "
            "source but embedded",
    "batch_size": "the global batch: rows per step over all processes and devices, split over "
                  "mesh.data × mesh.fsdp devices (each row's seq_len positions over mesh.context)",
}


def _docstring_table(cls) -> dict[str, str]:
    """``{field: text}`` from the ``field:   text`` table of ``cls``'s docstring (continuation
    lines are indented under the text)."""
    names = {f.name for f in dataclasses.fields(cls)}
    table: dict[str, list[str]] = {}
    name = None
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        m = re.match(r"(\w+):\s+(\S.*)", line)
        if m and m.group(1) in names:
            name = m.group(1)
            table[name] = [m.group(2)]
        elif name is not None and line.startswith(" ") and line.strip():
            table[name].append(line.strip())
        else:
            name = None
    return {k: " ".join(v).rstrip(".") for k, v in table.items()}


def data_flag_help() -> dict[str, str]:
    """The ``--help`` line of every ``--data.*`` flag (a field missing from both gets none)."""
    return {**_docstring_table(DataConfig), **DATA_FLAG_HELP}


def _cli_registry():
    """tyro's rules, plus one giving ``DataConfig``'s fields their help (``data_flag_help``)."""
    import tyro

    registry = tyro.constructors.ConstructorRegistry()

    @registry.struct_rule
    def data_config(info: tyro.constructors.StructTypeInfo):
        if info.type is not DataConfig:
            return None
        default = info.default if isinstance(info.default, DataConfig) else DataConfig()
        types_, helps = _field_types(DataConfig), data_flag_help()
        fields = tuple(tyro.constructors.StructFieldSpec(name=f.name, type=types_[f.name],
                                                         default=getattr(default, f.name), helptext=helps.get(f.name))
                       for f in dataclasses.fields(DataConfig))
        return tyro.constructors.StructConstructorSpec(instantiate=DataConfig, fields=fields)

    return registry


def _prog() -> str:
    """The command as typed: ``osdn-train`` (the installed script) or ``python -m osdn_jax.train``."""
    return "osdn-train" if Path(sys.argv[0]).name == "osdn-train" else PROG


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """``--config FILE`` (optional, JSON) or ``--recipe NAME`` (a paper run), then command-line
    overrides such as ``--steps 100 --model.preset small --data.source text --data.path corpus/``."""
    import tyro

    from osdn_jax.train.recipes import RECIPES, get_recipe

    argv = list(sys.argv[1:] if argv is None else argv)
    config_file, argv = _take_option(argv, "--config")
    recipe, argv = _take_option(argv, "--recipe")
    if config_file is not None and recipe is not None:
        raise ValueError("--config, --recipe: give one of them (the other fields are flags)")
    default = TrainConfig()
    if config_file is not None:
        default = load_config_file(config_file)
    elif recipe is not None:
        default = get_recipe(recipe)
    description = (inspect.cleandoc(TrainConfig.__doc__ or "")
                   + "\n\n--config FILE    a JSON file with any subset of the fields, or a run's config.json"
                   + f"\n--recipe NAME    a paper run ({', '.join(RECIPES)}); flags override its fields")
    return tyro.cli(TrainConfig, args=argv, default=default, prog=_prog(), description=description,
                    config=(tyro.conf.FlagConversionOff,), registry=_cli_registry())


__all__ = ["CheckpointConfig", "DataConfig", "DistConfig", "LogConfig", "MeshConfig", "ModelSettings",
           "OptimConfig", "ProfileConfig", "TrainConfig", "data_flag_help", "from_dict", "load_config_file",
           "parse_args", "to_dict"]
