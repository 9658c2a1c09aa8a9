"""The two layouts of a ``CausalLM``'s blocks, and the conversion between them.

- **unrolled** (``ModelConfig.scan_layers=False``): ``blocks/<i>/…``, one subtree per layer. Every
  layer is traced and compiled on its own.
- **scanned** (``scan_layers=True``, the default): ``stacks/<g>/…``, one subtree per group of
  consecutive layers with the same mixer (``ModelConfig.layer_groups``; one group unless the model
  is a hybrid), every parameter with a leading axis over the group's layers. The forward pass runs
  a group as one ``nnx.scan`` (``nnx.remat`` per layer with ``remat``), so a block is traced and
  compiled once per group.

Both layouts hold the same numbers: a scanned model built from a seed equals the unrolled one built
from it, layer for layer. ``convert_layout`` turns a tree that holds parameters (a pure dict, Adam's
moments inside an optimizer state, arrays or ``jax.ShapeDtypeStruct`` s with their shardings) into a
model's layout, so checkpoints, imports and exports of either layout load into both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

UNROLLED, SCANNED = "blocks", "stacks"  # the pure-dict key of the layer subtrees in each layout
_LAYER_AXIS = {nnx.PARTITION_NAME: None}  # the stacked axis is never sharded


def stack_blocks(blocks: list) -> nnx.Module:
    """One module like ``blocks[0]`` whose every variable stacks the ``blocks``' along a new leading
    axis (its logical axis names gain a leading ``None``)."""
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
    return nnx.merge(graphdef, nnx.spmd.add_axis(stacked, 0, _LAYER_AXIS))


def layer_view(stack: nnx.Module, index: int) -> nnx.Module:
    """Layer ``index`` of a ``stack_blocks`` module, as a module of its own (a copy: writing to it
    leaves ``stack`` unchanged)."""
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, nnx.spmd.remove_axis(jax.tree.map(lambda a: a[index], state), 0, _LAYER_AXIS))


def layout_of(params: dict) -> str | None:
    """``'blocks'`` (unrolled), ``'stacks'`` (scanned) or None (no layer subtree) of a parameter dict."""
    return UNROLLED if UNROLLED in params else SCANNED if SCANNED in params else None


def _is_params(x) -> bool:
    return isinstance(x, dict) and layout_of(x) is not None


def _stack(leaves: list):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
    if isinstance(first, np.ndarray):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _slice(leaf, index: int):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    return leaf[index]


def _item(d: dict, i: int):
    """``d[i]``; restored checkpoints may key layers by ``str(i)``."""
    return d[i] if i in d else d[str(i)]


def stacked_params(params: dict, config) -> dict:
    """An unrolled parameter dict in the scanned layout of ``config``'s groups."""
    blocks = params[UNROLLED]
    stacks = {g: jax.tree.map(lambda *xs: _stack(list(xs)), *[_item(blocks, i) for i in range(a, b)])
              for g, (a, b) in enumerate(config.layer_groups())}
    return {**{k: v for k, v in params.items() if k != UNROLLED}, SCANNED: stacks}


def unrolled_params(params: dict, config) -> dict:
    """A scanned parameter dict in the unrolled layout."""
    stacks = params[SCANNED]
    blocks = {i: jax.tree.map(lambda x: _slice(x, i - a), _item(stacks, g))
              for g, (a, b) in enumerate(config.layer_groups()) for i in range(a, b)}
    return {**{k: v for k, v in params.items() if k != SCANNED}, UNROLLED: blocks}


def convert_layout(tree, config):
    """``tree`` with every parameter dict in it (the parameters themselves, or the moments of an
    optimizer state) in ``config``'s layout (``config.scan_layers``); the rest unchanged."""
    target = SCANNED if config.scan_layers else UNROLLED

    def convert(x):
        if not _is_params(x) or layout_of(x) == target:
            return x
        return stacked_params(x, config) if target == SCANNED else unrolled_params(x, config)

    return jax.tree.map(convert, tree, is_leaf=_is_params)


def other_layout(tree, config):
    """``tree`` (in ``config``'s layout) in the other layout: what a checkpoint of the other kind holds."""
    return convert_layout(tree, dataclasses.replace(config, scan_layers=not config.scan_layers))


__all__ = ["SCANNED", "UNROLLED", "convert_layout", "layer_view", "layout_of", "other_layout", "stack_blocks",
           "stacked_params", "unrolled_params"]
