"""The epoch loop shared by every trainer: steps, evaluation, metrics, plots, checkpoints, resume, signals.

A trainer (LoRA, distillation, RNN baseline) supplies a `Task`: its state pytree, constants passed to every step
(frozen weights; never baked into the compiled program), two jitted step functions and its batch sources.
The loop keeps metrics on device during an epoch (one host sync per epoch), checkpoints at each epoch end
(and on SIGTERM/SIGINT mid-epoch), and resumes from the exact batch where a run stopped.

`run_epochs` composes the pieces: `restore` (a fresh start, or the latest checkpoint and a repair of a best
checkpoint cut off), then per epoch `train_one_epoch` (the steps; a stop signal saves and ends the run) and
`end_of_epoch` (scores, best per lane, log lines, best-then-latest saves, metrics.json and plots). A single run and
many seeds go through the same pieces; `progress.Lanes` holds what differs.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
from tqdm.auto import tqdm

from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.core import selection
from lora_kd_jax.runs import plots
from lora_kd_jax.runs import rundir
from lora_kd_jax.training import seeds as seeds_lib
from lora_kd_jax.runs.checkpoint import CheckpointError
from lora_kd_jax.core.errors import UserError
from lora_kd_jax.training.mesh import is_main_process
from lora_kd_jax.training.progress import Lanes, RunProgress

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
    select: str = "accuracy"  # the validation metric that picks the best epoch (train.select, `config.select_metric`)
    n_outputs: int = 2  # the head's outputs: which metric sums its steps give (`metrics.zeros`)


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


def _summary(history: list[dict], select: str = "accuracy") -> dict:
    """A run's summary from its history: the metrics at its best epoch (validation `select` alone decides; the
    first epoch wins ties)."""
    return selection.summary(history, select)


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
        elif task.select != "accuracy":
            log.info("%s", selection.headline(summary))
        else:
            log.info("best val accuracy %.4f at epoch %d (train accuracy %.4f, val MCC %.4f)",
                     summary["best_val_accuracy"], summary["best_epoch"], summary["train_accuracy_at_best"],
                     summary["val_mcc_at_best"])
    return summary


def run_epochs(task: Task, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train task.epochs epochs (continuing a checkpointed run if `resume`); return the summary."""
    run_dir = Path(run_dir)
    lanes = Lanes.of(task, run_dir)
    run = restore(task, lanes, resume=resume)
    run.last_plot = time.perf_counter()
    with _StopFlag() as stop:
        for epoch in range(run.start_epoch, task.epochs):
            train_one_epoch(task, lanes, run, epoch, stop, progress=progress)
            end_of_epoch(task, lanes, run, epoch)
    lanes.close()
    if not run.histories[0]:
        raise ValueError("no epochs were run (train.epochs is already reached by the checkpoint?)")
    return write_metrics(task, lanes, run.histories, run.wall(), plot=True)


def _tree(task: Task, run: RunProgress) -> dict:
    """What a checkpoint holds: the state and the epoch's running metric sums (an epoch resumes mid-way)."""
    return {"state": task.state, "train_sums": run.train_sums}


def restore(task: Task, lanes: Lanes, *, resume: bool) -> RunProgress:
    """A fresh run's progress, or with `resume` the latest checkpoint's: its state goes into task.state, and a best
    checkpoint whose save was cut off is rewritten from it."""
    run = RunProgress(histories=[[] for _ in range(lanes.n)], best_steps=[None] * lanes.n, train_sums=lanes.zeros())
    if resume and lanes.store.has_latest():
        restored, record, step = lanes.store.restore_latest(_tree(task, run))
        lanes.read_record(record, run)
        task.state, run.train_sums = restored["state"], restored["train_sums"]
        log.info("resumed from checkpoint step %d: epoch %d, batch %d", step, run.start_epoch + 1, run.start_batch)
        _repair_best(task, lanes, run, step)
    elif resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", lanes.store.directory)
    return run


def _repair_best(task: Task, lanes: Lanes, run: RunProgress, step: int) -> None:
    """A lane's best checkpoint is missing: when its best is the restored step (the best save was cut off), the
    state at hand is that best state; otherwise the run cannot go on."""
    for i, best_step in enumerate(run.best_steps):
        if best_step is None or lanes.best_stores[i].has_best(best_step):
            continue
        where = lanes.dirs[i] / "checkpoints" / "best"
        if best_step != step:
            raise CheckpointError(f"{where}: the best checkpoint (step {best_step}) is missing and cannot be "
                                  "rebuilt from the latest one; start the run again with run.overwrite=true")
        # (a single run's best store is its run store: the save rewrites its latest step too, with the same state)
        lanes.best_stores[i].save(step, lanes.take(_tree(task, run), i),
                                  lanes.lane_record(run, i, run.start_epoch, run.start_batch), best=True)
        log.warning("%sthe best checkpoint (step %d) was missing; rewritten from the restored state",
                    lanes.labels[i], step)


def train_one_epoch(task: Task, lanes: Lanes, run: RunProgress, epoch: int, stop: _StopFlag, *, progress: bool
                    ) -> None:
    """The training steps of `epoch` (from the resumed batch), metrics summed on device. A stop signal between
    steps saves the latest checkpoint at the batch reached and raises TrainingInterrupted."""
    first = run.start_batch if epoch == run.start_epoch else 0
    if first == 0:
        run.train_sums = lanes.zeros()
    bar = tqdm(total=task.n_train_batches, initial=first, desc=f"{task.title} epoch {epoch + 1}/{task.epochs}",
               disable=not (progress and is_main_process()), leave=False, mininterval=1.0)
    batch_index = first
    for batch in prefetch(task.train_batches(epoch, first), task.put_batch):
        task.state, sums = task.train_step(task.state, task.consts, batch)
        run.train_sums = metrics_lib.add(run.train_sums, sums)
        batch_index += 1
        bar.update(1)
        if stop.signal is not None:
            bar.close()
            lanes.store.save(lanes.step(task.state), _tree(task, run), lanes.record(run, epoch, batch_index))
            lanes.close()
            raise TrainingInterrupted(f"signal {stop.signal} at epoch {epoch + 1}, batch {batch_index}: "
                                      f"checkpoint saved in {lanes.store.directory}; continue with --resume")
    bar.close()


def end_of_epoch(task: Task, lanes: Lanes, run: RunProgress, epoch: int) -> None:
    """Score the epoch (training sums, validation, reported sets), append it to each lane's history, log it, save
    each improved lane's best and then the latest checkpoint, and write metrics.json (plots when due)."""
    entries = _score_epoch(task, lanes, run, epoch)
    step = lanes.step(task.state)
    for i, entry in enumerate(entries):
        run.histories[i].append(entry)
        is_best = selection.improves(entry, run.histories[i][:-1], task.select)
        if is_best:
            run.best_steps[i] = step
            lanes.save_best(i, step, _tree(task, run), run, epoch + 1)
        _log_epoch(lanes.labels[i], task.epochs, entry, is_best, task.select)
    lanes.save_latest(step, _tree(task, run), run, epoch + 1)
    due = time.perf_counter() - run.last_plot >= PLOT_INTERVAL_S
    write_metrics(task, lanes, run.histories, run.wall(), plot=due)
    run.last_plot = time.perf_counter() if due else run.last_plot


def _score_epoch(task: Task, lanes: Lanes, run: RunProgress, epoch: int) -> list[dict]:
    """Each lane's history entry for `epoch`: training metrics (checked for NaN/Inf first), validation, the
    reported sets."""
    trains = lanes.summarize(run.train_sums)
    _check_finite(task, lanes, trains, epoch)
    vals = lanes.summarize(_eval_sums(task, lanes))
    reported = {name: lanes.summarize(_eval_sums(task, lanes, batches))
                for name, batches in task.reported_batches.items()}
    entries = []
    for i in range(lanes.n):
        rep = {name: per_lane[i] for name, per_lane in reported.items()}
        entries.append({"epoch": epoch + 1, "train": trains[i], "val": vals[i], **({"reported": rep} if rep else {})})
    return entries


def _eval_sums(task: Task, lanes: Lanes, batches: Callable[[], Iterable[Batch]] | None = None) -> dict:
    sums = lanes.zeros()
    for batch in prefetch((batches or task.eval_batches)(), task.put_eval_batch or task.put_batch):
        sums = metrics_lib.add(sums, task.eval_step(task.state, task.consts, batch))
    return sums


def _check_finite(task: Task, lanes: Lanes, trains: list[dict], epoch: int) -> None:
    for label, train in zip(lanes.labels, trains):
        if not train.get("nonfinite"):
            continue
        where = (f"{label}epoch {epoch + 1}: {train['nonfinite']} batch(es) had a NaN/Inf training loss, the first "
                 f"at step {train['first_nonfinite_step']}")
        if task.on_nonfinite == "stop":
            lanes.close()
            raise NonFiniteLoss(f"{where}; stopped without saving this epoch, the last good checkpoint is kept "
                                f"in {lanes.store.directory} (train.on_nonfinite=skip drops such batches)")
        log.warning("%s; their updates were skipped (train.on_nonfinite=skip)", where)


def _log_epoch(label: str, epochs: int, entry: dict, is_best: bool, select: str = "accuracy") -> None:
    train, val, rep = entry["train"], entry["val"], entry.get("reported", {})
    scores = lambda m: selection.format_scores(m, select)  # noqa: E731
    log.info("%sepoch %d/%d  train loss %.4f %s | val loss %.4f %s%s%s", label, entry["epoch"], epochs,
             train["loss"], selection.format_scores(train, select, brief=True), val["loss"], scores(val),
             "".join(f" | {name} {scores(m)}" for name, m in rep.items()), "  (best)" if is_best else "")


# accuracy.png and loss.png are redrawn after an epoch at most this often, and always at the end of a run (drawing
# costs ~0.5 s a figure: more than a tiny model's epoch); metrics.json is rewritten after every epoch
PLOT_INTERVAL_S = 30.0


def write_metrics(task: Task, lanes: Lanes, histories: list[list[dict]], wall: float, *, plot: bool) -> dict:
    """metrics.json (and, when `plot`, the plots) of each lane in its dir, then of a seeded run's aggregate in the
    run dir; returns the run's summary (a single run's, or the aggregate)."""
    summaries = []
    for lane_dir, title, extra, history in zip(lanes.dirs, lanes.titles, lanes.summary_extras, histories):
        summaries.append({**_summary(history, task.select), **task.info, **extra, "wall_time_s": wall})
        if is_main_process():
            rundir.write_metrics(lane_dir, {"kind": task.kind, "epochs": history, "summary": summaries[-1]})
            if plot:
                plots.plot_curves(history, lane_dir, title)
    if not lanes.seeded:
        return summaries[0]
    per_seed = dict(zip(lanes.seeds, summaries))
    summary = {"seeds": lanes.seeds, "seed_stats": seeds_lib.aggregate(per_seed, SEED_STAT_KEYS),
               "per_seed": {str(k): {key: s[key] for key in SEED_STAT_KEYS if key in s} for k, s in per_seed.items()},
               **task.info, "wall_time_s": wall}
    if is_main_process():
        rundir.write_metrics(lanes.run_dir, {"kind": task.kind, "seeds": lanes.seeds,
                                             "epochs": seeds_lib.epoch_stats(histories), "summary": summary})
        if plot:
            plots.plot_seed_curves(dict(zip(lanes.seeds, histories)), lanes.run_dir, task.title)
    return summary


# what the aggregate of a seeded run reports (mean, std, min, max over seeds); out-of-domain keys where present
SEED_STAT_KEYS = ("best_val_accuracy", "val_mcc_at_best", "train_accuracy_at_best", "val_loss_at_best", "best_epoch",
                  "out_of_domain_accuracy_at_best", "out_of_domain_mcc_at_best")
