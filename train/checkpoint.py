"""Checkpoints with orbax: parameters, optimizer state, step, data iterator and run metadata
(config, counters) in one ``CheckpointManager`` step directory.

Saves are asynchronous and atomic (orbax commits a step only once every item is written, so an
interrupted save never replaces the previous checkpoint) and the newest ``keep`` are kept.
Restoring takes target shapes *and shardings* from freshly initialised arrays, so a checkpoint
restores onto any mesh shape.

The data iterator's state goes into the JSON metadata when every process reads the same global
stream (``data_split='rows'``: restorable with any process count) and through grain's own
per-process checkpoint handler otherwise.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from osdn_jax.train.config import CheckpointConfig


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def save_params(directory: str | Path, params) -> Path:
    """Writes a parameters-only checkpoint (a pure dict of arrays) to ``directory``, which must not
    exist: the starting point of a run (``ModelSettings.init_from``), e.g. an imported model."""
    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, params)
        ckptr.wait_until_finished()
    return directory


def restore_params(directory: str | Path, params):
    """The parameters saved by ``save_params``, laid out (shapes, dtypes, shardings) like ``params``.
    A missing folder or a parameter whose shape differs is a ``ValueError`` naming the folder."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise ValueError(f"model.init_from: no such checkpoint folder {str(directory)!r}")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(directory, _abstract(params))
        except ValueError as e:
            raise ValueError(f"model.init_from: {directory} does not hold this model's parameters ({e})") from None


class Checkpointer:
    """``save`` / ``restore`` of one run's state in ``directory``."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, per_process_data: bool):
        self.directory = Path(directory).absolute()
        self.per_process_data = per_process_data
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_iterator, meta: dict) -> None:
        """Starts an asynchronous save of ``step`` (``wait`` blocks until it is committed)."""
        meta = dict(meta)
        items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state))
        if self.per_process_data:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        else:
            meta["data_state"] = data_iterator.get_state()
        items["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, params, opt_state, data_iterator) -> tuple[object, object, dict]:
        """``(params, opt_state, meta)`` of ``step``, laid out like the given (initialised) arrays;
        ``data_iterator`` is moved to the saved position in place."""
        items = dict(params=ocp.args.StandardRestore(_abstract(params)),
                     opt_state=ocp.args.StandardRestore(_abstract(opt_state)), meta=ocp.args.JsonRestore())
        if self.per_process_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = dict(restored["meta"])
        if not self.per_process_data:
            data_iterator.set_state(meta.pop("data_state"))
        return restored["params"], restored["opt_state"], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
