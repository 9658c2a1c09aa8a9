"""Checkpoints with orbax: parameters, optimizer state, step, data iterator and run metadata
(config, counters) in one ``CheckpointManager`` step directory.

Saves are asynchronous and atomic (orbax commits a step only once every item is written, so an
interrupted save never replaces the previous checkpoint) and the newest ``keep`` are kept.
Restoring takes target shapes *and shardings* from freshly initialised arrays, so a checkpoint
restores onto any mesh shape.

The data iterator's state goes into the JSON metadata when every process reads the same global
stream (``data_split='rows'``: restorable with any process count) and through grain's own
per-process checkpoint handler otherwise.

A checkpoint that cannot be read (a damaged file) is skipped for the next older kept one
(``restore_newest``); the caller then moves it to ``<step>.damaged`` (``set_aside``), which orbax
ignores, so the step can be saved again.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from osdn_jax.layer_stacks import convert_layout, other_layout
from osdn_jax.train.config import CheckpointConfig
from osdn_jax.train.run_dir import free_path


DAMAGED_SUFFIX = ".damaged"


class CheckpointError(ValueError):
    """No kept checkpoint of the run can be read."""


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _either_layout(read: Callable, targets: tuple, model_config) -> tuple:
    """``read(targets)`` → ``(tree per target, *other items)``. When that fails and ``model_config``
    is given, the checkpoint may hold the other layer layout (``osdn_jax.layer_stacks``: unrolled
    ``blocks`` or scanned ``stacks``): it is read in that layout, converted, and placed on the
    targets' shardings. When neither layout reads, the first error is raised."""
    try:
        return read(targets)
    except Exception as first:  # noqa: BLE001 - orbax raises ValueError, KeyError or a plain Exception
        if model_config is None:
            raise
        try:
            restored = read(other_layout(targets, model_config))
        except Exception:  # noqa: BLE001
            raise first from None
    trees = convert_layout(restored[:len(targets)], model_config)
    placed = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), trees, targets)
    return (*placed, *restored[len(targets):])


def save_params(directory: str | Path, params) -> Path:
    """Writes a parameters-only checkpoint (a pure dict of arrays) to ``directory``, which must not
    exist: the starting point of a run (``ModelSettings.init_from``), e.g. an imported model."""
    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, params)
        ckptr.wait_until_finished()
    return directory


def restore_params(directory: str | Path, params, model_config=None):
    """The parameters saved by ``save_params``, laid out (shapes, dtypes, shardings) like ``params``;
    with ``model_config``, saved in either layer layout. A missing folder or a parameter whose shape
    differs is a ``ValueError`` naming the folder."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise ValueError(f"model.init_from: no such checkpoint folder {str(directory)!r}")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return _either_layout(lambda t: (ckptr.restore(directory, t[0]),), (_abstract(params),), model_config)[0]
        except ValueError as e:
            raise ValueError(f"model.init_from: {directory} does not hold this model's parameters ({e})") from None


class Checkpointer:
    """``save`` / ``restore`` of one run's state in ``directory``. Nothing is written (the folder
    is not even created) before the first ``save``."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, per_process_data: bool):
        self.directory = Path(directory).absolute()
        self.per_process_data = per_process_data
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               create=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """The kept steps, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reload(self) -> None:
        """Re-reads the folder (after steps were moved away)."""
        self.manager.reload()

    def newest_meta(self) -> tuple[int, dict] | None:
        """``(step, meta)`` of the newest checkpoint whose metadata (counters, config) can be read."""
        read = lambda step: self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))  # noqa: E731
        step, restored, _ = _newest_readable(self.steps(), read)
        return None if step is None else (step, dict(restored["meta"]))

    def save(self, step: int, params, opt_state, data_iterator, meta: dict) -> None:
        """Starts an asynchronous save of ``step`` (``wait`` blocks until it is committed)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = dict(meta)
        items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state))
        if self.per_process_data:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        else:
            meta["data_state"] = data_iterator.get_state()
        items["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, params, opt_state, data_iterator, model_config=None) -> tuple[object, object, dict]:
        """``(params, opt_state, meta)`` of ``step``, laid out like the given (initialised) arrays
        (with ``model_config``: from either layer layout); ``data_iterator`` is moved to the saved
        position in place."""

        def read(targets):
            items = dict(params=ocp.args.StandardRestore(targets[0]), opt_state=ocp.args.StandardRestore(targets[1]),
                         meta=ocp.args.JsonRestore())
            if self.per_process_data:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            return restored["params"], restored["opt_state"], dict(restored["meta"])

        params, opt_state, meta = _either_layout(read, (_abstract(params), _abstract(opt_state)), model_config)
        if not self.per_process_data:
            data_iterator.set_state(meta.pop("data_state"))
        return params, opt_state, meta

    def restore_newest(self, params, opt_state, data_iterator, agree: Callable[[bool], bool] = bool,
                       model_config=None):
        """The newest checkpoint that can be read, as ``(step, params, opt_state, meta, unreadable)``
        with ``unreadable`` the ``(step, reason)`` of each newer one that could not; None when there
        is no checkpoint. ``agree(ok)`` makes every process take the same step (all must read it).
        When none can be read: a ``CheckpointError`` naming each step and why. ``model_config``:
        checkpoints of either layer layout are read (``restore``)."""
        read = lambda step: self.restore(step, params, opt_state, data_iterator, model_config)  # noqa: E731
        step, restored, unreadable = _newest_readable(self.steps(), read, agree)
        if step is not None:
            return (step, *restored, unreadable)
        if unreadable:
            raise _none_readable(self.directory, unreadable, ". To start over, pass --checkpoint.resume False (the "
                                 "unreadable checkpoints are moved aside), or use another --run-dir")
        return None

    def set_aside(self, step: int) -> Path:
        """Moves the (unreadable) ``step`` to ``<step>.damaged`` (``-2``, ... if taken), which the
        manager ignores; returns the new path. Process 0 only; then ``reload`` on every process."""
        dest = free_path(self.directory / f"{step}{DAMAGED_SUFFIX}")
        (self.directory / str(step)).rename(dest)
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_newest_params(manager: ocp.CheckpointManager, target, directory, model_config=None) -> tuple[int, dict]:
    """``(step, params)`` of the newest checkpoint of ``manager`` whose parameters can be read into
    ``target``; an unreadable newer one is named in a warning (stderr) with the step used instead. A
    ``CheckpointError`` naming each step and why when none can be read."""
    read = lambda step: restore_step_params(manager, step, target, model_config)  # noqa: E731
    step, restored, unreadable = _newest_readable(manager.all_steps(), read)
    if step is None:
        raise _none_readable(directory, unreadable)
    for bad, reason in unreadable:
        print(f"warning: checkpoint step {bad} cannot be read ({reason}); using step {step} instead", file=sys.stderr)
    return step, restored


def restore_step_params(manager: ocp.CheckpointManager, step: int, target, model_config=None):
    """The parameters of checkpoint ``step`` laid out like ``target`` (with ``model_config``: saved
    in either layer layout)."""
    def read(targets):
        args = ocp.args.Composite(params=ocp.args.StandardRestore(targets[0]))
        return (manager.restore(step, args=args)["params"],)

    return _either_layout(read, (target,), model_config)[0]


def _newest_readable(steps, read: Callable[[int], object], agree: Callable[[bool], bool] = bool):
    """``(step, read(step), unreadable)`` for the newest of ``steps`` that ``read`` can read (every
    process agreeing through ``agree``), with ``unreadable`` the ``(step, reason)`` of each newer one;
    ``(None, None, unreadable)`` when none can be read."""
    unreadable = []
    for step in sorted(steps, reverse=True):
        with _quiet():
            try:
                value, reason = read(step), None
            except Exception as e:  # noqa: BLE001 - damaged files raise ValueError, OSError or a plain Exception
                value, reason = None, describe(e)
                _drop_read_debris()
        if agree(reason is None):
            return step, value, unreadable
        unreadable.append((step, reason or "another process could not read it"))
    return None, None, unreadable


def _none_readable(directory, unreadable, hint: str = "") -> CheckpointError:
    reasons = "; ".join(f"step {s}: {r}" for s, r in unreadable)
    return CheckpointError(f"checkpoint: no checkpoint in {directory} can be read ({reasons}){hint}")


def describe(error: BaseException) -> str:
    """The first line of the innermost cause of ``error`` (orbax wraps tensorstore's read errors in
    long messages), at most 300 characters."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class _PartialRestoreNotes(logging.Filter):
    """Drops orbax's notes on the items a read leaves out on purpose (``newest_meta``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "could not be restored" not in record.getMessage()


@contextlib.contextmanager
def _quiet():
    """Around one read: orbax's notes are dropped; if the read fails, so is what it leaves behind."""
    logger, notes = logging.getLogger("absl"), _PartialRestoreNotes()
    logger.addFilter(notes)
    try:
        yield
    finally:
        logger.removeFilter(notes)


def _is_read_debris(exc_type, exc, obj=None) -> bool:
    """What a failed orbax read leaves: its other reads' coroutines, collected later with their own
    errors, and tensorstore's callbacks into the event loop orbax has closed."""
    code = getattr(obj, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    return exc_type is RuntimeError and str(exc) == "Event loop is closed"


class _ReadDebrisLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not ("exception was never retrieved" in record.getMessage() and "orbax" in record.getMessage())


_debris_dropped = False


def _drop_read_debris() -> None:
    """Once a read has failed (and was reported in one line): its leftovers, reported by asyncio,
    ``sys.unraisablehook`` or ``sys.excepthook`` at some later moment (often at exit), are dropped;
    everything else still goes to the hooks that were there."""
    global _debris_dropped
    if _debris_dropped:
        return
    _debris_dropped = True
    unraisable, excepthook = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = lambda u: None if _is_read_debris(u.exc_type, u.exc_value, u.object) else unraisable(u)
    sys.excepthook = lambda t, v, tb: None if _is_read_debris(t, v) else excepthook(t, v, tb)
    logging.getLogger("asyncio").addFilter(_ReadDebrisLogs())
