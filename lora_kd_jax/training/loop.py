"""The epoch loop shared by every trainer: steps, evaluation, metrics, plots, checkpoints, resume, signals.

A trainer (LoRA, distillation, RNN baseline) supplies a `Task`: its state pytree, constants passed to every step
(frozen weights; never baked into the compiled program), two jitted step functions and its batch sources.
The loop keeps metrics on device during an epoch (one host sync per epoch), checkpoints at each epoch end
(and on SIGTERM/SIGINT mid-epoch), and resumes from the exact batch where a run stopped.

`run_epochs` composes the pieces: `restore` (a fresh start, or the latest checkpoint and a repair of a best
checkpoint cut off), then per epoch `train_one_epoch` (the steps; a stop signal saves and ends the run) and
`end_of_epoch` (scores, best per lane, log lines, early stopping, best-then-latest saves, metrics.json, plots and
TensorBoard). A single run and many seeds go through the same pieces; `progress.Lanes` holds what differs.

Early stopping (`RunOptions`): train.patience=P ends the run after P epochs in a row without a better validation
accuracy; in a seeded run each seed counts its own epochs and the run (one program) stops when every seed has run
out (a seed that ran out trains on with the others; its best checkpoint stays its best epoch's). train.max_steps=N
ends it after N optimizer steps, mid-epoch if need be (that epoch is scored on the steps it ran). The counts and the
stop are in the checkpoint record: a resumed run goes on counting, and a stopped run stays stopped.
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

from lora_kd_jax import data as data_lib
from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.core import seed_stats, selection
from lora_kd_jax.core.config import to_dict
from lora_kd_jax.core.errors import UserError
from lora_kd_jax.models.tokenizers import tokenizer_for
from lora_kd_jax.runs import rundir
from lora_kd_jax.runs.checkpoint import CheckpointError
from lora_kd_jax.runs.tensorboard import EventLog, check_wandb
from lora_kd_jax.training.mesh import is_main_process
from lora_kd_jax.training.progress import Lanes, RunProgress
from lora_kd_jax.training.records import PLOT_INTERVAL_S, log_epoch, write_metrics
from lora_kd_jax.training.trace import ProfileWindow, StepTrace

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
    # many seeds at once (runs.seed_dirs): state, train batches and step sums carry a leading seed axis; () = one run
    seeds: tuple[int, ...] = ()
    seed_info: dict[int, dict] = dataclasses.field(default_factory=dict)  # per-seed summary entries (its teacher)
    select: str = "accuracy"  # the validation metric that picks the best epoch (train.select, `config.select_metric`)
    n_outputs: int = 2  # the head's outputs: which metric sums its steps give (`metrics.zeros`)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run may stop early and what it records besides its metrics (cfg.train, cfg.run, the CLI's flags)."""
    patience: int = 0  # train.patience: epochs without a better validation score before the run stops; 0 = off
    max_steps: int = 0  # train.max_steps: optimizer steps after which the run stops; 0 = off
    profile: int = 0  # --profile: steps traced by jax.profiler into RUN_DIR/profile after the first one
    wandb: str = ""  # run.wandb: a W&B project beside TensorBoard
    config: dict | None = None  # the run's settings, for W&B
    plots: bool = True  # run.plots: the PNGs of the curves (at most every PLOT_INTERVAL_S, and at the run's end)

    @staticmethod
    def of(cfg: Any, profile: int = 0) -> RunOptions:
        return RunOptions(cfg.train.patience, cfg.train.max_steps, profile, cfg.run.wandb, to_dict(cfg),
                          cfg.run.plots)


@dataclasses.dataclass
class Recording:
    """What watches the steps: their scalars (on device until the epoch's end), the event files (process 0; None
    elsewhere), the profiler window; `t0` is when the current epoch began."""
    trace: StepTrace
    events: EventLog | None
    window: ProfileWindow
    t0: float = 0.0
    _steps: dict = dataclasses.field(default_factory=dict)  # the last `collect`ed steps, until `write`

    def collect(self, run: RunProgress) -> None:
        """Fetch the buffered steps (one transfer) for their tags and keep the epoch's sums in `run`."""
        self._steps = self.trace.collect()
        run.step_stats = self.trace.state()

    def write(self, entries: list[dict] | None = None, step: int = 0) -> None:
        """The collected steps' tags, and with `entries` the epoch's (written once the epoch is saved, so a run
        stopped by a NaN before its first save leaves no event file behind)."""
        if self.events is None:
            return
        self.events.steps(self._steps)
        self._steps = {}
        if entries is not None:
            self.events.epoch(entries, step, time.perf_counter() - self.t0)

    def close(self) -> None:
        self.window.stop(None)  # a run that failed inside the window: end the trace, without waiting on the state
        if self.events is not None:
            self.events.close()


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


def train_and_evaluate(cfg: Any, build: Callable[[Any], Task], *, resume: bool = False, progress: bool = True,
                       profile: int = 0) -> dict:
    """Any trainer's whole run into cfg.run.dir: lock and prepare the run dir, read the data, `build(splits)` the
    task, run its epochs (`profile`: steps to trace); returns the summary written to metrics.json."""
    check_wandb(cfg.run.wandb)
    with rundir.claim(cfg, resume=resume) as run_dir:
        splits = data_lib.load_splits(cfg, tokenizer_for(cfg))
        task = build(splits.encoded)
        task.info["data"] = splits.report()
        log.info("curves: tensorboard --logdir %s", run_dir)  # once data and model are in place: the dir stays
        summary = run_epochs(task, run_dir, resume=resume, progress=progress, options=RunOptions.of(cfg, profile))
        if task.seeds:
            log.info("%d seeds: %s (mean ± std (min–max))", len(task.seeds),
                     seed_stats.seed_headline(summary["seed_stats"], task.select))
        elif task.select != "accuracy":
            log.info("%s", selection.headline(summary))
        else:
            log.info("best val accuracy %.4f at epoch %d (train accuracy %.4f, val MCC %.4f)",
                     summary["best_val_accuracy"], summary["best_epoch"], summary["train_accuracy_at_best"],
                     summary["val_mcc_at_best"])
    return summary


def run_epochs(task: Task, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
               options: RunOptions = RunOptions()) -> dict:
    """Train task.epochs epochs (continuing a checkpointed run if `resume`), or until `options` stop the run;
    return the summary."""
    run_dir = Path(run_dir)
    lanes = Lanes.of(task, run_dir)
    run = restore(task, lanes, resume=resume)
    run.last_plot = time.perf_counter()
    trace = StepTrace(lanes.n)
    trace.load(run.step_stats if run.start_batch else None)
    events = EventLog(run_dir, seeds=lanes.seeds, wandb_project=options.wandb,
                      config=options.config) if is_main_process() else None
    rec = Recording(trace, events, ProfileWindow(options.profile, run_dir / "profile"))
    if run.stopped:
        log.info("the run had stopped at epoch %d: %s; nothing to resume", run.stopped["epoch"],
                 run.stopped["message"])
    try:
        with _StopFlag() as stop:
            for epoch in range(run.start_epoch, task.epochs):
                if run.stopped:
                    break
                train_one_epoch(task, lanes, run, epoch, stop, rec, options, progress=progress)
                end_of_epoch(task, lanes, run, epoch, rec, options)
        rec.window.stop(task.state)
    finally:
        rec.close()
    last_step = lanes.step(task.state)
    log.info("this process trained steps %d to %d (%d steps)", run.first_step + 1, last_step,
             last_step - run.first_step)  # what a resumed run ran (tests/tiny.py: assert_resumed)
    lanes.close()
    if not run.histories[0]:
        raise ValueError("no epochs were run (train.epochs is already reached by the checkpoint?)")
    return write_metrics(task, lanes, run, plot=options.plots)


def _tree(task: Task, run: RunProgress) -> dict:
    """What a checkpoint holds: the state and the epoch's running metric sums (an epoch resumes mid-way)."""
    return {"state": task.state, "train_sums": run.train_sums}


def restore(task: Task, lanes: Lanes, *, resume: bool) -> RunProgress:
    """A fresh run's progress, or with `resume` the latest checkpoint's: its state goes into task.state, and a best
    checkpoint whose save was cut off is rewritten from it."""
    run = RunProgress(histories=[[] for _ in range(lanes.n)], best_steps=[None] * lanes.n, train_sums=lanes.zeros(),
                      waits=[0] * lanes.n)
    if resume and lanes.store.has_latest():
        restored, record, step = lanes.store.restore_latest(_tree(task, run))
        lanes.read_record(record, run)
        task.state, run.train_sums = restored["state"], restored["train_sums"]
        run.first_step = step
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


def train_one_epoch(task: Task, lanes: Lanes, run: RunProgress, epoch: int, stop: _StopFlag, rec: Recording,
                    options: RunOptions, *, progress: bool) -> None:
    """The training steps of `epoch` (from the resumed batch; up to train.max_steps), metrics summed and step
    scalars kept on device. A stop signal between steps saves the latest checkpoint at the batch reached and raises
    TrainingInterrupted."""
    first = run.start_batch if epoch == run.start_epoch else 0
    if first == 0:
        run.train_sums = lanes.zeros()
        rec.trace.reset()
    rec.t0 = time.perf_counter()
    rec.trace.start_clock()
    bar = tqdm(total=task.n_train_batches, initial=first, desc=f"{task.title} epoch {epoch + 1}/{task.epochs}",
               disable=not (progress and is_main_process()), leave=False, mininterval=1.0)
    batch_index = first
    for batch in prefetch(task.train_batches(epoch, first), task.put_batch):
        rec.window.before_step()
        task.state, sums = task.train_step(task.state, task.consts, batch)
        rec.window.after_step(task.state)
        run.train_sums = metrics_lib.add(run.train_sums, sums)
        batch_index += 1
        step = epoch * task.n_train_batches + batch_index  # the state's step, counted on the host
        rec.trace.add(step, sums)
        bar.update(1)
        if options.max_steps and step >= options.max_steps:
            break
        if stop.signal is not None:
            bar.close()
            rec.collect(run)
            lanes.store.save(lanes.step(task.state), _tree(task, run), lanes.record(run, epoch, batch_index))
            lanes.close()
            rec.write()
            raise TrainingInterrupted(f"signal {stop.signal} at epoch {epoch + 1}, batch {batch_index}: "
                                      f"checkpoint saved in {lanes.store.directory}; continue with --resume")
    bar.close()


def end_of_epoch(task: Task, lanes: Lanes, run: RunProgress, epoch: int, rec: Recording, options: RunOptions
                 ) -> None:
    """Score the epoch (training sums, validation, reported sets, the steps' gradient norm and rate), append it to
    each lane's history, log it, decide an early stop, save each improved lane's best and then the latest
    checkpoint, write metrics.json (plots when due) and the epoch's TensorBoard tags."""
    rec.collect(run)
    entries = _score_epoch(task, lanes, run, epoch)
    step = lanes.step(task.state)
    for i, entry in enumerate(entries):
        entry["train"].update(rec.trace.epoch_stats(i))
        run.histories[i].append(entry)
        is_best = selection.improves(entry, run.histories[i][:-1], task.select)
        run.waits[i] = 0 if is_best else run.waits[i] + 1
        if is_best:
            run.best_steps[i] = step
            lanes.save_best(i, step, _tree(task, run), run, epoch + 1)
        log_epoch(lanes.labels[i], task.epochs, entry, is_best, task.select)
    run.stopped = _early_stop(task, lanes, run, epoch, step, options)
    run.step_stats = None  # the epoch is complete: a resume starts the next one from zero
    lanes.save_latest(step, _tree(task, run), run, epoch + 1)
    due = options.plots and (time.perf_counter() - run.last_plot >= PLOT_INTERVAL_S or run.stopped is not None)
    write_metrics(task, lanes, run, plot=due)
    run.last_plot = time.perf_counter() if due else run.last_plot
    rec.write(entries, step)


def _early_stop(task: Task, lanes: Lanes, run: RunProgress, epoch: int, step: int, options: RunOptions
                ) -> dict | None:
    """The stop record when train.max_steps is reached or every lane has run out of train.patience before
    train.epochs; None to go on."""
    if options.max_steps and options.max_steps <= step < task.epochs * task.n_train_batches:
        message = f"train.max_steps={options.max_steps} reached at step {step}"
        reason = "max_steps"
    elif options.patience and epoch + 1 < task.epochs and all(w >= options.patience for w in run.waits):
        who = "every seed's" if lanes.seeded else "the"
        message = (f"train.patience={options.patience}: {who} validation {task.select} has not improved for "
                   f"{options.patience} epoch(s)")
        reason = "patience"
    else:
        return None
    log.info("early stop after epoch %d of %d: %s", epoch + 1, task.epochs, message)
    return {"reason": reason, "epoch": epoch + 1, "step": step, "message": message}


def _score_epoch(task: Task, lanes: Lanes, run: RunProgress, epoch: int) -> list[dict]:
    """Each lane's history entry for `epoch`: training metrics (checked for NaN/Inf first), validation, the
    reported sets."""
    trains = lanes.summarize(run.train_sums)
    _check_finite(task, lanes, trains, epoch)
    vals = lanes.summarize(*_eval_sums(task, lanes))
    reported = {name: lanes.summarize(*_eval_sums(task, lanes, batches))
                for name, batches in task.reported_batches.items()}
    entries = []
    for i in range(lanes.n):
        rep = {name: per_lane[i] for name, per_lane in reported.items()}
        entries.append({"epoch": epoch + 1, "train": trains[i], "val": vals[i], **({"reported": rep} if rep else {})})
    return entries


def _eval_sums(task: Task, lanes: Lanes, batches: Callable[[], Iterable[Batch]] | None = None
               ) -> tuple[dict, list[dict]]:
    """(the set's metric sums, a regression's per-batch rows for Spearman's rho; [] for a classifier), on device."""
    sums, ranked = lanes.zeros(), []
    for batch in prefetch((batches or task.eval_batches)(), task.put_eval_batch or task.put_batch):
        out = task.eval_step(task.state, task.consts, batch)
        if metrics_lib.RANKED in out:
            ranked.append(out[metrics_lib.RANKED])
        sums = metrics_lib.add(sums, out)
    return sums, ranked


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
