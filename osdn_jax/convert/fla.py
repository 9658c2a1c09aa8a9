"""Load and save flash-linear-attention (fla) Hugging Face checkpoints: ``config.json`` plus
``model.safetensors`` or shards listed in ``model.safetensors.index.json``. No torch needed.

Parameter names (``N`` a layer; ``attn`` the token mixer, softmax attention in a hybrid's attention
layers) and how our parameters relate to them:

| fla tensor | ours | layout |
|---|---|---|
| ``model.embeddings.weight`` | ``embed.embedding`` | same ``[vocab, hidden]`` |
| ``model.layers.N.{attn,mlp}_norm.weight`` | ``blocks.N.{mixer,mlp}_norm.weight`` | same |
| ``model.layers.N.attn.X_proj.weight`` (q k v o b a g apf) | ``blocks.N.mixer.X_proj.kernel`` | transposed |
| ``model.layers.N.attn.X_proj.bias`` (attention qkv bias, APF) | ``blocks.N.mixer.X_proj.bias`` | same |
| ``model.layers.N.attn.{q,k,v}_conv1d.weight`` | ``blocks.N.mixer.{q,k,v}_conv.weight`` | ``[D, 1, W]`` ⇄ ``[W, D]`` |
| ``model.layers.N.attn.{o_norm.weight, A_log, dt_bias, d0}`` | ``blocks.N.mixer.…`` | same |
| ``model.layers.N.mlp.{gate,up,down}_proj.weight`` | ``blocks.N.mlp.….kernel`` | transposed |
| ``model.norm.weight``, ``lm_head.weight`` | ``norm.weight``, ``lm_head.kernel`` | same, transposed |

Loading reads one tensor at a time from the memory-mapped files, so host memory holds the model
plus one tensor. Saving writes into a temporary folder next to the destination and renames it
when every file is complete: a failed save leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from osdn_jax.convert.fla_config import fla_config_from_model, model_config_from_fla, osdn_is_deltanet
from osdn_jax.layer_stacks import convert_layout
from osdn_jax.model import CausalLM, ModelConfig

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_CONV = ("q_conv", "k_conv", "v_conv")


def fla_name(path: tuple) -> tuple[str, str]:
    """``(fla tensor name, layout)`` of our parameter at ``path`` (a pure-dict key path); layout is
    ``same``, ``linear`` (transposed) or ``conv`` (``[W, D]`` ⇄ ``[D, 1, W]``)."""
    path = tuple(str(p) for p in path)
    match path:
        case ("embed", "embedding"):
            return "model.embeddings.weight", "same"
        case ("norm", "weight"):
            return "model.norm.weight", "same"
        case ("lm_head", "kernel"):
            return "lm_head.weight", "linear"
        case ("blocks", i, ("mixer_norm" | "mlp_norm") as norm, "weight"):
            return f"model.layers.{i}.{'attn' if norm == 'mixer_norm' else 'mlp'}_norm.weight", "same"
        case ("blocks", i, "mlp", proj, "kernel"):
            return f"model.layers.{i}.mlp.{proj}.weight", "linear"
        case ("blocks", i, "mixer", conv, "weight") if conv in _CONV:
            return f"model.layers.{i}.attn.{conv}1d.weight", "conv"
        case ("blocks", i, "mixer", proj, "kernel"):
            return f"model.layers.{i}.attn.{proj}.weight", "linear"
        case ("blocks", i, "mixer", proj, "bias"):
            return f"model.layers.{i}.attn.{proj}.bias", "same"
        case ("blocks", i, "mixer", module, "weight"):
            return f"model.layers.{i}.attn.{module}.weight", "same"
        case ("blocks", i, "mixer", name):
            return f"model.layers.{i}.attn.{name}", "same"
    raise ValueError(f"no fla name for parameter {'.'.join(path)}")


def _to_ours(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return x.T
    if layout == "conv":
        return x.reshape(x.shape[0], x.shape[-1]).T if x.ndim == 3 and x.shape[1] == 1 else x
    return x


def _to_fla(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return np.ascontiguousarray(x.T)
    if layout == "conv":
        return np.ascontiguousarray(x.T[:, None, :])
    return x


def _fla_shape(shape: tuple, layout: str) -> tuple:
    if layout == "linear":
        return shape[::-1]
    if layout == "conv":
        return (shape[1], 1, shape[0])
    return shape


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: missing (an fla checkpoint folder holds config.json and model.safetensors "
                         f"or {INDEX_FILE} with its shards)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file that holds it (from the index when sharded)."""
    if (folder / INDEX_FILE).is_file():
        index = _read_json(folder / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{folder / INDEX_FILE}: field 'weight_map' is missing or not an object")
        files = {name: folder / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ValueError(f"{folder / INDEX_FILE}: lists shard {file.name}, which is missing from {folder}")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        other = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
        hint = f" (found {other}: PyTorch pickles are not read; save with safe_serialization=True)" if other else ""
        raise ValueError(f"{folder}: holds neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    from safetensors import safe_open

    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def load_fla(path: str | Path, *, as_osdn: bool = False, param_dtype: str = "float32",
             compute_dtype: str = "float32", ignore_fields: tuple[str, ...] = (),
             **overrides) -> tuple[CausalLM, ModelConfig]:
    """``(model, config)`` from the fla checkpoint folder ``path``.

    ``as_osdn`` upcycles DeltaNet → OSDN and Gated DeltaNet → OS-Gated DeltaNet (``d0 = 1``, the ``may``
    preset, the plain hypergradient: the same logits as the source to fp32 rounding, and training then
    continues as OSDN). Weights (fp32, bf16 or fp16 in the file) are cast to ``param_dtype``; ``overrides``
    set other ``ModelConfig`` fields (``max_seq_len``, ``remat``, ...). Unknown config.json fields are refused
    unless named in ``ignore_fields``. Errors name the file and field or tensor; nothing is approximated.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"path: {folder} is not a folder (an fla checkpoint folder: config.json + safetensors)")
    config_path = folder / CONFIG_FILE
    cfg = model_config_from_fla(_read_json(config_path), where=str(config_path), as_osdn=as_osdn,
                                ignore_fields=tuple(ignore_fields), param_dtype=param_dtype,
                                compute_dtype=compute_dtype, **overrides)
    files = weight_files(folder)
    unrolled = dataclasses.replace(cfg, scan_layers=False)  # fla names one tensor per layer
    abstract = nnx.state(nnx.eval_shape(lambda: CausalLM(unrolled, rngs=nnx.Rngs(0))), nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))[0]
    wanted = {}
    for key_path, leaf in leaves:
        path_keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)
        wanted[path_keys] = (*fla_name(path_keys), leaf)
    missing = [(p, name) for p, (name, _, _) in wanted.items() if name not in files]
    upcycled = {p for p, name in missing if as_osdn and p[-1] == "d0"}
    missing = [name for p, name in missing if p not in upcycled]
    if missing:
        where = folder / (INDEX_FILE if (folder / INDEX_FILE).is_file() else SINGLE_FILE)
        raise ValueError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} missing in all) for model_type "
                         f"{_read_json(config_path).get('model_type')!r} with this config.json")
    expected_names = {name for name, _, _ in wanted.values()}
    extra = sorted(set(files) - expected_names - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if extra:
        raise ValueError(f"{files[extra[0]]}: unexpected tensor {extra[0]!r} ({len(extra)} in all): config.json does "
                         "not describe this checkpoint's layers")
    values = _read_tensors(wanted, files, upcycled, _np_dtype(param_dtype))
    return CausalLM.from_params(cfg, _nest(values)), cfg


def _np_dtype(name: str):
    if name not in _NP_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_NP_DTYPES)}, got {name!r}")
    return _NP_DTYPES[name]


def _read_tensors(wanted: dict, files: dict, upcycled: set, np_dtype) -> dict:
    from safetensors import safe_open

    by_file: dict[Path, list] = {}
    for p, (name, layout, leaf) in wanted.items():
        if p in upcycled:
            continue
        by_file.setdefault(files[name], []).append((p, name, layout, leaf))
    values = {p: jnp.ones(wanted[p][2].shape, np_dtype) for p in upcycled}
    for file, items in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for p, name, layout, leaf in items:
                try:
                    x = f.get_tensor(name)
                except (TypeError, ValueError) as e:  # a dtype numpy cannot hold
                    raise ValueError(f"{file}: tensor {name!r}: cannot read ({e})") from None
                if x.dtype not in (np.float32, ml_dtypes.bfloat16, np.float16):
                    raise ValueError(f"{file}: tensor {name!r} has dtype {x.dtype}; expected float32, bfloat16 "
                                     "or float16")
                want = _fla_shape(tuple(leaf.shape), layout)
                if tuple(x.shape) != want:
                    raise ValueError(f"{file}: tensor {name!r} has shape {list(x.shape)}; config.json implies "
                                     f"{list(want)}")
                # One tensor in flight: the host copy is freed before the next one is read.
                values[p] = jax.block_until_ready(jnp.asarray(_to_ours(x, layout).astype(np_dtype, copy=False)))
                del x
    return values


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def check_new_folder(name: str, dest: Path) -> None:
    """``dest`` must not exist, or be an empty folder (``name``: the argument, for the error)."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{name}: {dest} already exists and is not an empty folder; nothing was written")


@contextlib.contextmanager
def new_folder(name: str, dest: Path) -> Iterator[Path]:
    """A temporary folder beside ``dest`` to fill: renamed to ``dest`` when the block succeeds,
    removed when it fails, so ``dest`` appears whole or not at all."""
    check_new_folder(name, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _parse_size(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size: expected bytes or a size like '5GB' / '200MB', got {size!r}")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_fla(model: CausalLM, path: str | Path, *, dtype: str | None = None, max_shard_size: int | str | None = None,
             as_deltanet: bool = False, token_ids: dict | None = None,
             extra_files: dict[str, str] | None = None) -> Path:
    """Writes ``model`` as an fla checkpoint folder ``path`` (which must not exist, or be empty).

    ``dtype``: the tensors' dtype (``float32`` / ``bfloat16``; default the parameters'). With
    ``max_shard_size`` (bytes or ``'5GB'``), shards plus ``model.safetensors.index.json``.
    ``as_deltanet`` writes an OSDN / OS-GDN model as DeltaNet / Gated DeltaNet, allowed only where
    that is exact (d0 ≡ 1, no APF, 1 inside the clip range). ``token_ids``: bos / eos / pad ids for
    config.json; ``extra_files``: name → text, written alongside (a tokenizer). Returns the folder.
    """
    from safetensors.numpy import save_file

    cfg = model.config
    dest = Path(path)
    check_new_folder("path", dest)
    pure = convert_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), dataclasses.replace(cfg, scan_layers=False))
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    params = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp): v for kp, v in leaves}
    if as_deltanet:
        d0 = [pure["blocks"][i]["mixer"].get("d0") for i in range(cfg.num_layers)]
        why = osdn_is_deltanet(cfg, [None if d is None else np.asarray(d) for d in d0])
        if why:
            raise ValueError(f"as_deltanet: this OSDN model is not exactly DeltaNet: {why}; nothing was written")
        params = {p: v for p, v in params.items() if p[-1] != "d0"}
    dtype = dtype or cfg.param_dtype
    np_dtype = _np_dtype(dtype)
    fla_cfg = fla_config_from_model(cfg, dtype=dtype, as_deltanet=as_deltanet, token_ids=token_ids)
    names = {p: fla_name(p) for p in params}
    limit = _parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    itemsize = np.dtype(np_dtype).itemsize
    for p in params:
        nbytes = int(np.prod(params[p].shape)) * itemsize
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += nbytes
    with new_folder("path", dest) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(fla_cfg, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        weight_map, total = {}, 0
        for n, shard in enumerate(shards):
            file = SINGLE_FILE if limit is None else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for p in shard:
                name, layout = names[p]
                tensors[name] = _to_fla(np.asarray(jax.device_get(params[p])).astype(np_dtype), layout)
                weight_map[name] = file
                total += tensors[name].nbytes
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            del tensors
        if limit is not None:
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return dest


__all__ = ["check_new_folder", "fla_name", "load_fla", "new_folder", "save_fla", "weight_files"]
