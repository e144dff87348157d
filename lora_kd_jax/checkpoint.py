"""The one place that talks to Orbax: latest and best checkpoints of a run.

A checkpoint holds a pytree (trainable parameters, optimizer state, step, PRNG key data, partial-epoch sums)
and a JSON record (epoch, position in the epoch, metric history). `checkpoints/latest` keeps the newest few
steps so that a corrupted newest step falls back to the previous one; `checkpoints/best` keeps the best by
validation accuracy. Orbax writes each step to a temporary dir and renames it when complete (atomic).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lora_kd_jax.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was required."""
    label = "checkpoint error"


def _manager(directory: Path, max_to_keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def abstract_like(tree: Any) -> Any:
    """Restore target with the same shapes, dtypes and shardings as `tree`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointStore:
    """checkpoints/latest (newest `keep` steps) and checkpoints/best (one step) under a run dir."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2, read_only: bool = False):
        self.directory = Path(directory)
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no checkpoints directory")
        self.latest = _manager(self.directory / "latest", keep, read_only)
        self.best = _manager(self.directory / "best", 1, read_only)

    def save(self, step: int, state: Any, record: dict, *, best: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
        self.latest.save(step, args=args, force=True)
        if best:
            self.best.save(step, args=args, force=True)
        self.wait()

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

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
                errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise CheckpointError(f"{manager.directory}: no step could be restored ({'; '.join(errors)})")

    def restore_latest(self, target: Any = None, step: int | None = None) -> tuple[Any, dict, int]:
        return self._restore(self.latest, target, step)

    def restore_best(self, target: Any = None) -> tuple[Any, dict, int]:
        return self._restore(self.best, target, None)

    def has_latest(self) -> bool:
        return bool(self.latest.all_steps())

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()
