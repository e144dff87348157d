"""A run's curves for TensorBoard (and Weights & Biases when asked): event files in RUN_DIR/tensorboard.

The writer is the `tensorboard` package's own event-file writer (the one torch's SummaryWriter uses): no
TensorFlow, and the same package reads the files back (`read_scalars`) and serves them (`tensorboard --logdir`).
Tags (x axis: the optimizer step; a seeded run writes every tag but the times once per seed, `.../seed_<k>`, and
as the mean over seeds, `.../mean`):

- per step: `step/loss`, `step/lr`, `step/grad_norm`, `step/time_s` (host time between two steps' dispatch; no
  device wait is added, so one step's value can be low or high; over an epoch they add up to about its time);
- per epoch, at the epoch's last step: `epoch/<set>/<metric>` for set train, val and every reported set (e.g.
  out_of_domain) and every metric the head gives (loss and core.selection.SCORES: accuracy, mcc, f1, macro_f1 for a
  classifier; mse, pearson, and spearman on the evaluated sets, for a regression); `epoch/train/grad_norm` (mean
  over the epoch's steps),
  `epoch/train/lr` (its last step's); `epoch/time_s` (wall time of the epoch, evaluation and checkpoint saves included).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lora_kd_jax.core.errors import UserError
from lora_kd_jax.core.selection import SCORES

TB_DIR = "tensorboard"


class EventLog:
    """Scalars of one run, written to TensorBoard event files and, with `wandb_project`, to W&B."""

    def __init__(self, run_dir: Path, *, seeds: Sequence[int] = (), wandb_project: str = "",
                 config: dict | None = None):
        self.seeds = list(seeds)
        self.run_dir, self.directory = Path(run_dir), Path(run_dir) / TB_DIR
        self._wandb_project, self._config = wandb_project, config
        self._writer: Any = None  # opened by the first write: a run that never writes leaves no file
        self._wandb: Any = None

    def _open(self) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(self.directory))
        if self._wandb_project:
            self._wandb = start_wandb(self._wandb_project, self.run_dir, self._config)

    def lanes(self, tag: str, values: Sequence[float] | np.ndarray, step: int) -> None:
        """One value per lane: the tag itself for a single run; per seed and their mean for a seeded run."""
        values = np.asarray(values, np.float64).reshape(-1)
        if not self.seeds:
            self.scalars({tag: float(values[0])}, step)
            return
        out = {f"{tag}/seed_{k}": float(v) for k, v in zip(self.seeds, values)}
        out[f"{tag}/mean"] = float(np.mean(values))
        self.scalars(out, step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if self._writer is None:
            self._open()
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
                                             for tag, v in values.items()])
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
        if self._wandb is not None:
            self._wandb.log(dict(values), step=int(step))

    def steps(self, trace: Mapping[str, np.ndarray]) -> None:
        """The per-step tags of a `StepTrace.collect()`."""
        for i, step in enumerate(trace.get("step", ())):
            for key in ("loss", "lr", "grad_norm"):
                self.lanes(f"step/{key}", trace[key][i], int(step))
            self.scalars({"step/time_s": float(trace["time_s"][i])}, int(step))

    def epoch(self, entries: Sequence[Mapping[str, Any]], step: int, wall_s: float) -> None:
        """The per-epoch tags of every lane's history entry (same epoch)."""
        first = entries[0]
        sets = {"train": lambda e: e["train"], "val": lambda e: e["val"]}
        sets.update({name: (lambda e, name=name: e["reported"][name]) for name in first.get("reported", {})})
        for name, get in sets.items():
            for metric in ("loss", *SCORES, "grad_norm", "lr"):
                if metric in get(first):
                    self.lanes(f"epoch/{name}/{metric}", [get(e)[metric] for e in entries], step)
        self.scalars({"epoch/time_s": wall_s}, step)
        self.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class WandbMissing(UserError, ImportError):
    """run.wandb names a project but the wandb package is not installed."""
    label = "config error"


def check_wandb(project: str) -> None:
    """Fail before any compute when run.wandb is set and wandb cannot be imported."""
    if not project:
        return
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise WandbMissing(f"run.wandb={project}: the wandb package is not installed; `pip install wandb`, or "
                           "leave run.wandb empty")


def start_wandb(project: str, run_dir: Path, config: dict | None) -> Any:
    """A W&B run named after the run dir, its files in the run dir (WANDB_MODE=offline works without network)."""
    check_wandb(project)
    import wandb

    return wandb.init(project=project, name=Path(run_dir).name, dir=str(run_dir), config=config or {})


def read_scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a run's event files as {tag: [(step, value), ...]}, read by tensorboard's own
    EventAccumulator (what the TensorBoard UI shows)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / TB_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
