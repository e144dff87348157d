"""The one place that talks to Orbax: latest and best checkpoints of a run.

A checkpoint holds a pytree (trainable parameters, optimizer state, step, PRNG key data, partial-epoch sums)
and a JSON record (epoch, position in the epoch, metric history). `checkpoints/latest` keeps the newest few
steps so that a corrupted newest step falls back to the previous one; `checkpoints/best` keeps the best by
validation accuracy. Orbax writes each step to a temporary dir and renames it when complete (atomic), and saves
are synchronous, so a step is listed only once it is whole. A step that goes to both (an epoch that is the best so
far) is serialized once: latest gets a copy of best's step dir, copied the same way (a temporary dir, renamed when
whole); with several processes each writes its own shards, so there both are Orbax saves. Two rules keep latest and
best from telling different stories: best is written before latest (a run resumed from latest always finds the best
it reports), and a step
that is written again (an epoch redone after a crash, or after a corrupted step) replaces the old one. A step that
does not restore is moved aside to `checkpoints/corrupt/` so that training can write that step again.

A write the file system refuses (full, over quota, read-only, no permission, I/O error) raises `OSError(errno,
strerror, step dir)` whichever layer of Orbax failed: Orbax's own files raise OSError, its array writes go through
tensorstore, which raises `ValueError` with the OS error in its status payload (`[os_error_code='28']`). The step's
temporary dir is left for `clean_unfinished`, and the steps written before stay whole: the run dir is resumable.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp

from lora_kd_jax.core.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was required."""
    label = "checkpoint error"


# tensorstore reports an OS error as a status whose payload carries the errno: `... [os_error_code='28']`
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='?(\d+)'?\]")


def os_error_code(exc: BaseException | None) -> int | None:
    """The errno of the file-system failure behind `exc` (searched along its explicit `raise ... from` chain only: an
    unrelated error raised while an OSError was being handled is a bug, not a full disk): an OSError's own, or the
    `os_error_code` payload of the status tensorstore raised; None if there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        if type(exc) is ValueError:  # tensorstore raises its statuses as plain ValueError
            match = _TENSORSTORE_OS_ERROR.search(str(exc))
            if match:
                return int(match.group(1))
        exc = exc.__cause__
    return None


# what a write still in flight says when the failed save has already shut its event loop or executor down
_GONE = ("event loop is closed", "after shutdown", "interpreter shutdown")


def _is_write_noise(exc: BaseException | None) -> bool:
    """What Orbax's background work reports around a failed write: the file-system error itself, and the
    RuntimeErrors of its writes still in flight that find their event loop or executor gone. Nothing else."""
    if exc is None:
        return False
    if os_error_code(exc) is not None:
        return True
    return isinstance(exc, RuntimeError) and any(g in str(exc).lower() for g in _GONE)


class _WriteNoise(logging.Filter):
    """Orbax logs a failed write from each of its background threads (and asyncio each task whose failure nobody
    awaited), with the traceback, before or after the failure reaches the caller, which reports it once: drop
    those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_write_noise(record.exc_info[1]))


_NOISY_LOGGERS = ("absl", "asyncio")
_noise = _WriteNoise()  # kept once a write has failed


def _quiet_unraisable() -> Callable[[], None]:
    """Drop the write noise that reaches `sys.unraisablehook` (tensorstore callbacks into a closed event loop, one
    traceback each); returns the undo."""
    hook = sys.unraisablehook

    def unraisable(unraisable) -> None:
        if not _is_write_noise(unraisable.exc_value):
            hook(unraisable)

    sys.unraisablehook = unraisable

    def undo() -> None:
        if sys.unraisablehook is unraisable:
            sys.unraisablehook = hook
    return undo


_silenced = False


def _silence_leftovers() -> None:
    """After a failed write, the tensorstore writes still in flight go on failing up to the end of the process
    (the run stops with one line): keep their noise out for good. That includes the RuntimeWarning Python prints at
    exit for each write coroutine the closed event loop never ran ("coroutine ... was never awaited")."""
    global _silenced
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(_noise)
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    if not _silenced:
        _silenced = True
        _quiet_unraisable()


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A checkpoint write: a file-system failure at any layer becomes OSError(errno, strerror, path)."""
    loggers, during = [logging.getLogger(name) for name in _NOISY_LOGGERS], _WriteNoise()
    for logger in loggers:
        logger.addFilter(during)
    undo = _quiet_unraisable()
    try:
        yield
    except Exception as e:
        code = os_error_code(e)
        if code is None:
            raise
        _silence_leftovers()
        raise OSError(code, os.strerror(code), str(path)) from e
    finally:
        undo()
        for logger in loggers:
            logger.removeFilter(during)


# what Orbax says when a step is whole but its tree or shapes are not the restore target's
_LAYOUT_MISMATCH = ("tree structures do not match", "is not compatible with the stored shape")


def _layout_mismatch(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and any(m in str(exc) for m in _LAYOUT_MISMATCH)


def _manager(directory: Path, max_to_keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def abstract_like(tree: Any) -> Any:
    """Restore target with the same shapes, dtypes and shardings as `tree`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _copy_tree(source: Path, into: Path) -> None:
    """Copy the files under `source` into the new dir `into`, each synced to disk (an OSError keeps its errno)."""
    into.mkdir()
    for entry in sorted(source.iterdir()):
        if entry.is_dir():
            _copy_tree(entry, into / entry.name)
        else:
            shutil.copyfile(entry, into / entry.name)
            with open(into / entry.name, "rb+") as f:
                os.fsync(f.fileno())
    _sync_dir(into)


def _sync_dir(path: Path) -> None:
    """Make the entries of dir `path` durable (its files' names, a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """checkpoints/latest (newest `keep` steps) and checkpoints/best (one step) under a run dir. A seed dir of a
    seeded run has only best (`with_latest=False`), and the seeded run dir only latest (`with_best=False`): the run
    resumes from the stacked state in the run dir's latest, each seed's best lives in its seed dir."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2, read_only: bool = False,
                 with_latest: bool = True, with_best: bool = True):
        self.directory = Path(directory)
        self.read_only, self.keep = read_only, keep
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no checkpoints directory")
        self.latest = _manager(self.directory / "latest", keep, read_only) if with_latest else None
        self.best = _manager(self.directory / "best", 1, read_only) if with_best else None
        self._managers = [m for m in (self.latest, self.best) if m is not None]

    def save(self, step: int, state: Any, record: dict, *, best: bool = False) -> None:
        """Write `step` to best (when `best`) and then to latest; returns only once both are on disk and listed."""
        if best:
            self._write(self.best, step, state, record)
        if self.latest is None:
            return
        if best and jax.process_count() == 1:
            self._copy(self.best, self.latest, step)  # the same state and record: no second serialization
        else:
            self._write(self.latest, step, state, record)

    def _write(self, manager: ocp.CheckpointManager, step: int, state: Any, record: dict) -> None:
        """One Orbax save of `step` into `manager`, replacing a step of that number (an epoch redone after a crash)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
        with _writing(Path(manager.directory) / str(step)):
            if step in manager.all_steps():
                manager.delete(step)
            manager.save(step, args=args, force=True)
            manager.wait_until_finished()
            manager.reload()
        if step not in manager.all_steps():
            raise CheckpointError(f"{manager.directory}: step {step} was not written completely")

    def _copy(self, source: ocp.CheckpointManager, target: ocp.CheckpointManager, step: int) -> None:
        """`source`'s whole step dir into `target` as Orbax writes a step: file by file (each synced) into a temporary
        dir that `clean_unfinished` removes if the copy is cut off, renamed when whole; then the steps beyond the
        newest `target` keeps are deleted, as its own save would."""
        into = Path(target.directory) / str(step)
        unfinished = into.with_name(f"{step}.orbax-checkpoint-tmp-copy")
        with _writing(into):
            if step in target.all_steps():
                target.delete(step)
            shutil.rmtree(unfinished, ignore_errors=True)
            _copy_tree(Path(source.directory) / str(step), unfinished)
            unfinished.rename(into)
            _sync_dir(into.parent)
            target.reload()
            for old in sorted(target.all_steps())[:-self.keep]:
                target.delete(old)
        if step not in target.all_steps():
            raise CheckpointError(f"{target.directory}: step {step} was not copied completely")

    def wait(self) -> None:
        for manager in self._managers:
            manager.wait_until_finished()

    def _restore(self, manager: ocp.CheckpointManager, target: Any, step: int | None) -> tuple[Any, dict, int]:
        steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise CheckpointError(f"{manager.directory}: no checkpoint steps found")
        errors = []
        for s in steps:
            try:
                args = ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_like(target) if target is not None else None),
                    record=ocp.args.JsonRestore())
                out = manager.restore(s, args=args)
                if errors:
                    log.warning("restored step %d after newer steps failed: %s", s, "; ".join(errors))
                return out["state"], dict(out["record"]), s
            except Exception as e:  # a corrupted or incomplete step: fall back to the previous one
                if _layout_mismatch(e):  # whole, but of another tree: moving it aside would lose a good run
                    raise CheckpointError(
                        f"{manager.directory}: step {s} holds a state of another layout than this run builds "
                        f"({str(e).splitlines()[0]}): it was written by another model, optimizer or lora_kd_jax "
                        "version; start again with run.overwrite=true or another run.dir (nothing was moved)") from None
                errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                if not self.read_only:
                    self._move_aside(manager, s)
        raise CheckpointError(f"{manager.directory}: no step could be restored ({'; '.join(errors)})")

    def _move_aside(self, manager: ocp.CheckpointManager, step: int) -> None:
        """Take a step that does not restore out of the manager's sight (kept for inspection, never reused)."""
        import time

        source = Path(manager.directory) / str(step)
        if not source.is_dir():
            return
        corrupt = self.directory / "corrupt"
        corrupt.mkdir(exist_ok=True)
        target = corrupt / f"{Path(manager.directory).name}-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        source.rename(target)
        manager.reload()
        log.warning("moved the unreadable step %d to %s; training writes that step again", step, target)

    def clean_unfinished(self) -> list[Path]:
        """Remove the temporary dirs of saves that were cut off (Orbax never lists them as steps); returns them."""
        import shutil

        removed = []
        for manager in self._managers:
            directory = Path(manager.directory)
            for tmp in directory.glob("*.orbax-checkpoint-tmp*") if directory.is_dir() else ():
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        if removed:
            log.warning("removed %d unfinished checkpoint write(s): %s", len(removed),
                        ", ".join(str(p) for p in removed))
        return removed

    def restore_latest(self, target: Any = None, step: int | None = None) -> tuple[Any, dict, int]:
        return self._restore(self.latest, target, step)

    def restore_best(self, target: Any = None) -> tuple[Any, dict, int]:
        return self._restore(self.best, target, None)

    def has_latest(self) -> bool:
        return self.latest is not None and bool(self.latest.all_steps())

    def has_best(self, step: int) -> bool:
        return self.best is not None and step in self.best.all_steps()

    def close(self) -> None:
        self.wait()
        for manager in self._managers:
            manager.close()
