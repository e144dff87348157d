"""The epoch loop shared by every trainer: steps, evaluation, metrics, plots, checkpoints, resume, signals.

A trainer (LoRA, distillation, RNN baseline) supplies a `Task`: its state pytree, constants passed to every step
(frozen weights; never baked into the compiled program), two jitted step functions and its batch sources.
The loop keeps metrics on device during an epoch (one host sync per epoch), checkpoints at each epoch end
(and on SIGTERM/SIGINT mid-epoch), and resumes from the exact batch where a run stopped.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
from tqdm.auto import tqdm

from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.runs import plots
from lora_kd_jax.runs import rundir
from lora_kd_jax.training import seeds as seeds_lib
from lora_kd_jax.runs.checkpoint import CheckpointError, CheckpointStore
from lora_kd_jax.core.errors import UserError
from lora_kd_jax.training.mesh import is_main_process

log = logging.getLogger(__name__)

Batch = dict[str, Any]


@dataclasses.dataclass
class Task:
    kind: str  # lora | distill | rnn: recorded in metrics.json and checkpoints
    state: Any  # checkpointed pytree (trainable params, optimizer state, step, rng)
    consts: Any  # pytree given to every step and not checkpointed (frozen base weights)
    train_step: Callable[[Any, Any, Batch], tuple[Any, dict]]
    eval_step: Callable[[Any, Any, Batch], dict]
    train_batches: Callable[[int, int], Iterable[Batch]]  # (epoch, start_batch) -> batches
    eval_batches: Callable[[], Iterable[Batch]]
    n_train_batches: int
    epochs: int
    # further evaluation sets (e.g. {'out_of_domain': ...}) scored every epoch beside validation; never pick the best
    reported_batches: dict[str, Callable[[], Iterable[Batch]]] = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)  # params report etc., copied into the summary
    title: str = ""
    put_batch: Callable[[Batch], Batch] = jax.device_put  # host train batch -> device (sharded over the mesh)
    put_eval_batch: Callable[[Batch], Batch] | None = None  # eval batches (no seed axis); None = put_batch
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/Inf training loss does (steps skip its update either way)
    # many seeds at once (seeds.py): state, train batches and step sums carry a leading seed axis; () = one run
    seeds: tuple[int, ...] = ()
    seed_info: dict[int, dict] = dataclasses.field(default_factory=dict)  # per-seed summary entries (its teacher)


class TrainingInterrupted(UserError, RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was written at the batch reached."""
    label = "interrupted"


class NonFiniteLoss(UserError, FloatingPointError):
    """A training loss became NaN or Inf."""
    label = "non-finite loss"


def prefetch(batches: Iterable[Batch], put: Callable[[Batch], Batch] = jax.device_put,
             size: int = 2) -> Iterator[Batch]:
    """Put the next `size` batches on device while the current step runs."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps (no step is cut in half)."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _summary(history: list[dict]) -> dict:
    best = max(history, key=lambda h: h["val"]["accuracy"])  # validation alone decides; first epoch wins ties
    out = {"best_epoch": best["epoch"], "best_val_accuracy": best["val"]["accuracy"],
           "train_accuracy_at_best": best["train"]["accuracy"], "val_mcc_at_best": best["val"]["mcc"],
           "val_loss_at_best": best["val"]["loss"], "epochs_run": len(history)}
    for name, m in best.get("reported", {}).items():
        out[f"{name}_accuracy_at_best"], out[f"{name}_mcc_at_best"] = m["accuracy"], m["mcc"]
    return out


class _Lanes:
    """The loop's view of a task as one or more independent runs (lanes): a single run is one lane holding the whole
    state; a seeded task has one lane per seed, each a slice of the stacked state with its own best checkpoint in
    its seed dir."""

    def __init__(self, task: Task, run_dir: Path, store: CheckpointStore):
        self.seeds = list(task.seeds)
        self.seeded = bool(self.seeds)
        self.n = len(self.seeds) if self.seeded else 1
        self.labels = [f"seed {k}: " for k in self.seeds] if self.seeded else [""]
        self.dirs = [seeds_lib.seed_dir(run_dir, k) for k in self.seeds] if self.seeded else [run_dir]
        self.best_stores = ([CheckpointStore(d / "checkpoints", with_latest=False) for d in self.dirs]
                            if self.seeded else [store])

    def zeros(self) -> dict:
        return _zero_sums(self.seeds)

    def summarize(self, sums: dict) -> list[dict]:
        """Per-lane metrics from (stacked) sums: one device->host transfer for all lanes."""
        host = jax.device_get(sums)
        return ([metrics_lib.summarize(seeds_lib.take(host, i)) for i in range(self.n)] if self.seeded
                else [metrics_lib.summarize(host)])

    def tree(self, tree: Any, i: int) -> Any:
        return seeds_lib.take(tree, i) if self.seeded else tree

    def close(self) -> None:
        if self.seeded:
            for store in self.best_stores:
                store.close()


def _zero_sums(seeds: Sequence[int]) -> dict:
    """Empty metric sums: one set, or one per seed (stacked)."""
    return seeds_lib.stack([metrics_lib.zeros()] * len(seeds)) if seeds else metrics_lib.zeros()


def _eval_sums(task: Task, batches: Callable[[], Iterable[Batch]] | None = None) -> dict:
    sums = _zero_sums(task.seeds)
    for batch in prefetch((batches or task.eval_batches)(), task.put_eval_batch or task.put_batch):
        sums = metrics_lib.add(sums, task.eval_step(task.state, task.consts, batch))
    return sums


def train_and_evaluate(cfg: Any, build: Callable[[Any], Task], *, resume: bool = False, progress: bool = True
                       ) -> dict:
    """Any trainer's whole run into cfg.run.dir: lock and prepare the run dir, read the data, `build(splits)` the
    task, run its epochs; returns the summary written to metrics.json."""
    from lora_kd_jax import data as data_lib

    with rundir.claim(cfg, resume=resume) as run_dir:
        splits = data_lib.load_splits(cfg)
        task = build(splits.encoded)
        task.info["data"] = splits.report()
        summary = run_epochs(task, run_dir, resume=resume, progress=progress)
        if task.seeds:
            agg = summary["seed_stats"]
            log.info("%d seeds: best val accuracy %s, val MCC %s (mean ± std (min–max), %%)", len(task.seeds),
                     seeds_lib.format_stat(agg["best_val_accuracy"], 100),
                     seeds_lib.format_stat(agg["val_mcc_at_best"], 100))
        else:
            log.info("best val accuracy %.4f at epoch %d (train accuracy %.4f, val MCC %.4f)",
                     summary["best_val_accuracy"], summary["best_epoch"], summary["train_accuracy_at_best"],
                     summary["val_mcc_at_best"])
    return summary


def run_epochs(task: Task, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train task.epochs epochs (continuing a checkpointed run if `resume`); return the summary."""
    run_dir = Path(run_dir)
    store = CheckpointStore(run_dir / "checkpoints", with_best=not task.seeds)
    lanes = _Lanes(task, run_dir, store)
    if is_main_process():
        store.clean_unfinished()
        if lanes.seeded:
            for best_store in lanes.best_stores:
                best_store.clean_unfinished()
    histories: list[list[dict]] = [[] for _ in range(lanes.n)]
    best_steps: list[int | None] = [None] * lanes.n
    start_epoch, start_batch = 0, 0
    train_sums = lanes.zeros()
    wall_before = 0.0
    t0 = time.perf_counter()

    def record_for(epoch: int, next_batch: int) -> dict:
        common = {"kind": task.kind, "epoch": epoch, "next_batch": next_batch,
                  "wall_time_s": wall_before + time.perf_counter() - t0}
        if lanes.seeded:
            return {**common, "seeds": lanes.seeds, "seed_histories": histories, "best_steps": best_steps}
        return {**common, "history": histories[0], "best_step": best_steps[0]}

    def lane_record(i: int, epoch: int, next_batch: int) -> dict:
        """What lane i's best checkpoint records: a single run's record."""
        return {"kind": task.kind, "epoch": epoch, "next_batch": next_batch, "history": histories[i],
                "best_step": best_steps[i], "wall_time_s": wall_before + time.perf_counter() - t0}

    def step_number() -> int:
        if not hasattr(task.state, "step"):
            return 0
        step = jax.device_get(task.state.step)
        return int(step[0]) if lanes.seeded else int(step)

    def tree() -> dict:
        return {"state": task.state, "train_sums": train_sums}

    if resume and store.has_latest():
        restored, record, step = store.restore_latest(tree())
        if record.get("kind") != task.kind:
            raise CheckpointError(f"{run_dir}: checkpoint is a '{record.get('kind')}' run, not '{task.kind}'")
        if lanes.seeded and record.get("seeds") != lanes.seeds:
            raise CheckpointError(f"{run_dir}: the checkpoint holds seeds {record.get('seeds')}, this run "
                                  f"train.seeds={lanes.seeds}; resume with the run's own seed list")
        task.state, train_sums = restored["state"], restored["train_sums"]
        if lanes.seeded:
            histories, best_steps = record["seed_histories"], record["best_steps"]
        else:
            histories, best_steps = [record["history"]], [record.get("best_step")]
        start_epoch, start_batch = record["epoch"], record["next_batch"]
        wall_before = record.get("wall_time_s", 0.0)
        log.info("resumed from checkpoint step %d: epoch %d, batch %d", step, start_epoch + 1, start_batch)
        for i, best_step in enumerate(best_steps):
            if best_step is None or lanes.best_stores[i].has_best(best_step):
                continue
            where = lanes.dirs[i] / "checkpoints" / "best"
            if best_step != step:
                raise CheckpointError(f"{where}: the best checkpoint (step {best_step}) is missing and cannot be "
                                      "rebuilt from the latest one; start the run again with run.overwrite=true")
            # the best save was cut off: the state at hand is that best state
            lanes.best_stores[i].save(step, lanes.tree(tree(), i), lane_record(i, start_epoch, start_batch), best=True)
            log.warning("%sthe best checkpoint (step %d) was missing; rewritten from the restored state",
                        lanes.labels[i], step)
    elif resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", run_dir / "checkpoints")

    last_plot = time.perf_counter()
    with _StopFlag() as stop:
        for epoch in range(start_epoch, task.epochs):
            first = start_batch if epoch == start_epoch else 0
            if first == 0:
                train_sums = lanes.zeros()
            bar = tqdm(total=task.n_train_batches, initial=first, desc=f"{task.title} epoch {epoch + 1}/{task.epochs}",
                       disable=not (progress and is_main_process()), leave=False, mininterval=1.0)
            batch_index = first
            for batch in prefetch(task.train_batches(epoch, first), task.put_batch):
                task.state, sums = task.train_step(task.state, task.consts, batch)
                train_sums = metrics_lib.add(train_sums, sums)
                batch_index += 1
                bar.update(1)
                if stop.signal is not None:
                    bar.close()
                    store.save(step_number(), tree(), record_for(epoch, batch_index))
                    store.close()
                    lanes.close()
                    raise TrainingInterrupted(f"signal {stop.signal} at epoch {epoch + 1}, batch {batch_index}: "
                                              f"checkpoint saved in {run_dir / 'checkpoints'}; continue with --resume")
            bar.close()
            trains = lanes.summarize(train_sums)
            _check_finite(task, trains, lanes, epoch, run_dir, store)
            vals = lanes.summarize(_eval_sums(task))
            reported = {name: lanes.summarize(_eval_sums(task, batches))
                        for name, batches in task.reported_batches.items()}
            step = step_number()
            for i in range(lanes.n):
                rep = {name: per_lane[i] for name, per_lane in reported.items()}
                histories[i].append({"epoch": epoch + 1, "train": trains[i], "val": vals[i],
                                     **({"reported": rep} if rep else {})})
                is_best = vals[i]["accuracy"] > max((h["val"]["accuracy"] for h in histories[i][:-1]), default=-1.0)
                if is_best:
                    best_steps[i] = step
                    if lanes.seeded:  # best before latest, as for one run
                        lanes.best_stores[i].save(step, lanes.tree(tree(), i), lane_record(i, epoch + 1, 0),
                                                  best=True)
                log.info("%sepoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f mcc %.4f%s%s",
                         lanes.labels[i], epoch + 1, task.epochs, trains[i]["loss"], trains[i]["accuracy"],
                         vals[i]["loss"], vals[i]["accuracy"], vals[i]["mcc"],
                         "".join(f" | {name} acc {m['accuracy']:.4f} mcc {m['mcc']:.4f}" for name, m in rep.items()),
                         "  (best)" if is_best else "")
            improved_single = not lanes.seeded and best_steps[0] == step
            store.save(step, tree(), record_for(epoch + 1, 0), best=improved_single)
            due = time.perf_counter() - last_plot >= PLOT_INTERVAL_S
            _write(run_dir, task, lanes, histories, wall_before + time.perf_counter() - t0, plot=due)
            last_plot = time.perf_counter() if due else last_plot
    store.close()
    lanes.close()
    if not histories[0]:
        raise ValueError("no epochs were run (train.epochs is already reached by the checkpoint?)")
    return _write(run_dir, task, lanes, histories, wall_before + time.perf_counter() - t0, plot=True)


def _check_finite(task: Task, trains: list[dict], lanes: _Lanes, epoch: int, run_dir: Path,
                  store: CheckpointStore) -> None:
    for label, train in zip(lanes.labels, trains):
        if not train.get("nonfinite"):
            continue
        where = (f"{label}epoch {epoch + 1}: {train['nonfinite']} batch(es) had a NaN/Inf training loss, the first "
                 f"at step {train['first_nonfinite_step']}")
        if task.on_nonfinite == "stop":
            store.close()
            lanes.close()
            raise NonFiniteLoss(f"{where}; stopped without saving this epoch, the last good checkpoint is kept "
                                f"in {run_dir / 'checkpoints'} (train.on_nonfinite=skip drops such batches)")
        log.warning("%s; their updates were skipped (train.on_nonfinite=skip)", where)


# accuracy.png and loss.png are redrawn after an epoch at most this often, and always at the end of a run (drawing
# costs ~0.5 s a figure: more than a tiny model's epoch); metrics.json is rewritten after every epoch
PLOT_INTERVAL_S = 30.0


def _write(run_dir: Path, task: Task, lanes: _Lanes, histories: list[list[dict]], wall: float, *,
           plot: bool) -> dict:
    """metrics.json (and, when `plot`, the plots) of the run, or of each seed and the aggregate; returns the
    summary."""
    if not lanes.seeded:
        summary = {**_summary(histories[0]), **task.info, "wall_time_s": wall}
        if is_main_process():
            rundir.write_metrics(run_dir, {"kind": task.kind, "epochs": histories[0], "summary": summary})
            if plot:
                plots.plot_curves(histories[0], run_dir, task.title)
        return summary
    per_seed = {}
    for k, seed_dir, history in zip(lanes.seeds, lanes.dirs, histories):
        per_seed[k] = {**_summary(history), **task.info, **task.seed_info.get(k, {}), "seed": k, "wall_time_s": wall}
        if is_main_process():
            rundir.write_metrics(seed_dir, {"kind": task.kind, "epochs": history, "summary": per_seed[k]})
            if plot:
                plots.plot_curves(history, seed_dir, f"{task.title} seed {k}")
    summary = {"seeds": lanes.seeds, "seed_stats": seeds_lib.aggregate(per_seed, SEED_STAT_KEYS),
               "per_seed": {str(k): {key: s[key] for key in SEED_STAT_KEYS if key in s} for k, s in per_seed.items()},
               **task.info, "wall_time_s": wall}
    if is_main_process():
        rundir.write_metrics(run_dir, {"kind": task.kind, "seeds": lanes.seeds,
                                       "epochs": seeds_lib.epoch_stats(histories), "summary": summary})
        if plot:
            plots.plot_seed_curves(dict(zip(lanes.seeds, histories)), run_dir, task.title)
    return summary


# what the aggregate of a seeded run reports (mean, std, min, max over seeds); out-of-domain keys where present
SEED_STAT_KEYS = ("best_val_accuracy", "val_mcc_at_best", "train_accuracy_at_best", "val_loss_at_best", "best_epoch",
                  "out_of_domain_accuracy_at_best", "out_of_domain_mcc_at_best")
