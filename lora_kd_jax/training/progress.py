"""Where a run stands (`RunProgress`) and where its lanes keep it (`Lanes`): the epoch loop's bookkeeping.

A lane is one independent run inside a task. A single run is one lane holding the whole state; a seeded task
(`Task.seeds`, runs.seed_dirs) has one lane per seed, each a slice of the stacked state with its own best checkpoint and
metrics in its seed dir. `OneRun` and `SeedLanes` hold everything that differs between the two, so the loop
(loop.py) goes through the same steps for both.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.runs.checkpoint import CheckpointError, CheckpointStore
from lora_kd_jax.runs.seed_dirs import seed_dir
from lora_kd_jax.training.mesh import is_main_process
from lora_kd_jax.training.state import stack, take


@dataclasses.dataclass
class RunProgress:
    """What a checkpoint records of a run besides its state, one entry per lane, and the epoch's running sums."""
    histories: list[list[dict]]  # per lane: one metrics entry per finished epoch
    best_steps: list[int | None]  # per lane: the step of its best checkpoint (None before the first epoch ends)
    train_sums: dict  # this epoch's training metric sums so far, on device (stacked over seeds in a seeded task)
    start_epoch: int = 0  # where training (re)starts: an epoch index and the batch within it
    start_batch: int = 0
    first_step: int = 0  # the optimizer step this process starts from (the restored checkpoint's)
    wall_before: float = 0.0  # training time of the runs this one resumes
    t0: float = dataclasses.field(default_factory=time.perf_counter)  # when this run started
    last_plot: float = 0.0  # when the plots were last drawn (the loop starts this clock once restored)
    waits: list[int] = dataclasses.field(default_factory=list)  # per lane: epochs since its best (train.patience)
    stopped: dict | None = None  # why the run stopped before train.epochs: {'reason', 'epoch', 'step', 'message'}
    step_stats: dict | None = None  # the epoch's running gradient-norm and rate sums (trace.StepTrace.state)

    def wall(self) -> float:
        """Training time so far, resumed runs included."""
        return self.wall_before + time.perf_counter() - self.t0


class Lanes:
    """A task's lanes and their checkpoint stores: `store` is checkpoints/ in the run dir (the latest checkpoint of
    the whole task), `best_stores[i]` holds lane i's best. What differs between a single run and seeds is in the
    two subclasses below; `Lanes.of(task, run_dir)` picks one."""
    seeded: bool
    labels: list[str]  # per lane: the prefix of its log lines
    dirs: list[Path]  # per lane: where its metrics.json, plots and best checkpoint go
    titles: list[str]  # per lane: its plots' title
    summary_extras: list[dict]  # per lane: what its summary adds to the task's info
    best_stores: list[CheckpointStore]

    @staticmethod
    def of(task: Any, run_dir: Path) -> Lanes:
        """The task's lanes, their stores opened and cut-off checkpoint writes removed."""
        lanes = SeedLanes(task, run_dir) if task.seeds else OneRun(task, run_dir)
        if is_main_process():
            for store in lanes._stores():
                store.clean_unfinished()
        return lanes

    def __init__(self, task: Any, run_dir: Path):
        self.kind, self.run_dir, self.seeds = task.kind, run_dir, list(task.seeds)
        self.n_outputs = task.n_outputs  # which metric sums the steps give
        self.store = CheckpointStore(run_dir / "checkpoints", with_best=not self.seeded)

    @property
    def n(self) -> int:
        return len(self.dirs)

    def _stores(self) -> list[CheckpointStore]:
        return [self.store] + [s for s in self.best_stores if s is not self.store]

    def close(self) -> None:
        for store in self._stores():
            store.close()

    # --- device values: metric sums and state (stacked over seeds in SeedLanes)

    def zeros(self) -> dict:
        """Empty metric sums for all lanes."""
        raise NotImplementedError

    def take(self, tree: Any, i: int) -> Any:
        """Lane i's part of the task's pytree."""
        raise NotImplementedError

    def summarize(self, sums: dict, ranked: list[dict] = ()) -> list[dict]:
        """Per-lane metrics from the task's sums (and a regression's pearson and spearman from its eval `ranked`
        rows): one device->host transfer for all lanes."""
        host, rows = jax.device_get((sums, list(ranked)))
        out = [metrics_lib.summarize(self.take(host, i)) for i in range(self.n)]
        if rows:
            for i, metrics in enumerate(out):
                metrics.update(metrics_lib.ranked_scores([self.take(r, i) for r in rows]))
        return out

    @staticmethod
    def step(state: Any) -> int:
        """The optimizer step of the state (all seeds step together); 0 for a state without one."""
        if not hasattr(state, "step"):
            return 0
        return int(np.ravel(jax.device_get(state.step))[0])

    # --- checkpoint records and saves (a lane's best before the latest)

    def record(self, run: RunProgress, epoch: int, next_batch: int) -> dict:
        """What the latest checkpoint (the whole task) records."""
        raise NotImplementedError

    def lane_record(self, run: RunProgress, i: int, epoch: int, next_batch: int) -> dict:
        """What lane i's best checkpoint records: a single run's record."""
        return {"kind": self.kind, "epoch": epoch, "next_batch": next_batch, "history": run.histories[i],
                "best_step": run.best_steps[i], "wall_time_s": run.wall()}

    @staticmethod
    def stopping_record(run: RunProgress) -> dict:
        """What every latest record adds: the patience counts, a stop and its reason, the epoch's step sums."""
        return {"waits": run.waits, "stopped": run.stopped, "step_stats": run.step_stats}

    def read_record(self, record: dict, run: RunProgress) -> None:
        """Check a restored latest record against the task and take its progress into `run`."""
        if record.get("kind") != self.kind:
            raise CheckpointError(f"{self.run_dir}: checkpoint is a '{record.get('kind')}' run, not '{self.kind}'")
        run.histories, run.best_steps = self._lanes_progress(record)
        run.start_epoch, run.start_batch = record["epoch"], record["next_batch"]
        run.wall_before = record.get("wall_time_s", 0.0)
        run.waits = record.get("waits") or [0] * self.n  # records written before train.patience: no wait yet
        run.stopped, run.step_stats = record.get("stopped"), record.get("step_stats")

    def _lanes_progress(self, record: dict) -> tuple[list[list[dict]], list[int | None]]:
        raise NotImplementedError

    def save_best(self, i: int, step: int, tree: Any, run: RunProgress, epoch: int) -> None:
        """Lane i improved at the end of `epoch`: its best checkpoint."""
        self.best_stores[i].save(step, self.take(tree, i), self.lane_record(run, i, epoch, 0), best=True)

    def save_latest(self, step: int, tree: Any, run: RunProgress, epoch: int) -> None:
        """The latest checkpoint at the end of `epoch`."""
        self.store.save(step, tree, self.record(run, epoch, 0))


class OneRun(Lanes):
    """A single run: one lane, the whole state; its best checkpoint sits beside the latest in the run dir."""
    seeded = False

    def __init__(self, task: Any, run_dir: Path):
        super().__init__(task, run_dir)
        self.labels, self.dirs, self.titles, self.summary_extras = [""], [run_dir], [task.title], [{}]
        self.best_stores = [self.store]

    def zeros(self) -> dict:
        return metrics_lib.zeros(self.n_outputs)

    def take(self, tree: Any, i: int) -> Any:
        return tree

    def record(self, run: RunProgress, epoch: int, next_batch: int) -> dict:
        return {"kind": self.kind, "epoch": epoch, "next_batch": next_batch, "wall_time_s": run.wall(),
                "history": run.histories[0], "best_step": run.best_steps[0], **self.stopping_record(run)}

    def _lanes_progress(self, record: dict) -> tuple[list[list[dict]], list[int | None]]:
        return [record["history"]], [record.get("best_step")]

    def save_best(self, i: int, step: int, tree: Any, run: RunProgress, epoch: int) -> None:
        pass  # written by save_latest: one save of the best and then the latest

    def save_latest(self, step: int, tree: Any, run: RunProgress, epoch: int) -> None:
        self.store.save(step, tree, self.record(run, epoch, 0), best=run.best_steps[0] == step)


class SeedLanes(Lanes):
    """Many seeds in one state (runs.seed_dirs): lane i is seed k = seeds[i], a slice of the stacked state, with its
    metrics, plots and best checkpoint in RUN_DIR/seed_<k> exactly as a single run's."""
    seeded = True

    def __init__(self, task: Any, run_dir: Path):
        super().__init__(task, run_dir)
        self.labels = [f"seed {k}: " for k in self.seeds]
        self.dirs = [seed_dir(run_dir, k) for k in self.seeds]
        self.titles = [f"{task.title} seed {k}" for k in self.seeds]
        self.summary_extras = [{**task.seed_info.get(k, {}), "seed": k} for k in self.seeds]
        self.best_stores = [CheckpointStore(d / "checkpoints", with_latest=False) for d in self.dirs]

    def zeros(self) -> dict:
        return stack([metrics_lib.zeros(self.n_outputs)] * self.n)

    def take(self, tree: Any, i: int) -> Any:
        return take(tree, i)

    def record(self, run: RunProgress, epoch: int, next_batch: int) -> dict:
        return {"kind": self.kind, "epoch": epoch, "next_batch": next_batch, "wall_time_s": run.wall(),
                "seeds": self.seeds, "seed_histories": run.histories, "best_steps": run.best_steps,
                **self.stopping_record(run)}

    def _lanes_progress(self, record: dict) -> tuple[list[list[dict]], list[int | None]]:
        if record.get("seeds") != self.seeds:
            raise CheckpointError(f"{self.run_dir}: the checkpoint holds seeds {record.get('seeds')}, this run "
                                  f"train.seeds={self.seeds}; resume with the run's own seed list")
        return record["seed_histories"], record["best_steps"]
