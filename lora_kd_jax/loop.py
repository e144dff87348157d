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
from typing import Any, Callable, Iterable, Iterator

import jax
from tqdm.auto import tqdm

from lora_kd_jax import metrics as metrics_lib
from lora_kd_jax import plots, rundir
from lora_kd_jax.checkpoint import CheckpointError, CheckpointStore
from lora_kd_jax.errors import UserError
from lora_kd_jax.mesh import is_main_process

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
    put_batch: Callable[[Batch], Batch] = jax.device_put  # host batch -> device (sharded over the mesh)
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/Inf training loss does (steps skip its update either way)


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


def evaluate(task: Task, batches: Callable[[], Iterable[Batch]] | None = None) -> dict[str, float]:
    """Loss, accuracy, MCC and count of the task's state on `batches` (default: the validation set)."""
    sums = metrics_lib.zeros()
    for batch in prefetch((batches or task.eval_batches)(), task.put_batch):
        sums = metrics_lib.add(sums, task.eval_step(task.state, task.consts, batch))
    return metrics_lib.summarize(sums)


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
        log.info("best val accuracy %.4f at epoch %d (train accuracy %.4f, val MCC %.4f)",
                 summary["best_val_accuracy"], summary["best_epoch"], summary["train_accuracy_at_best"],
                 summary["val_mcc_at_best"])
    return summary


def run_epochs(task: Task, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train task.epochs epochs (continuing a checkpointed run if `resume`); return the summary."""
    run_dir = Path(run_dir)
    store = CheckpointStore(run_dir / "checkpoints")
    if is_main_process():
        store.clean_unfinished()
    history: list[dict] = []
    start_epoch, start_batch = 0, 0
    train_sums = metrics_lib.zeros()
    wall_before = 0.0
    best_step: int | None = None
    if resume and store.has_latest():
        tree, record, step = store.restore_latest({"state": task.state, "train_sums": train_sums})
        if record.get("kind") != task.kind:
            raise CheckpointError(f"{run_dir}: checkpoint is a '{record.get('kind')}' run, not '{task.kind}'")
        task.state, train_sums = tree["state"], tree["train_sums"]
        history, start_epoch, start_batch = record["history"], record["epoch"], record["next_batch"]
        wall_before = record.get("wall_time_s", 0.0)
        best_step = record.get("best_step")
        log.info("resumed from checkpoint step %d: epoch %d, batch %d", step, start_epoch + 1, start_batch)
        if best_step is not None and not store.has_best(best_step):
            if best_step == step:  # the best save was cut off: the state at hand is that best state
                store.save(step, {"state": task.state, "train_sums": train_sums}, record, best=True)
                log.warning("the best checkpoint (step %d) was missing; rewritten from the restored state", step)
            else:
                raise CheckpointError(f"{run_dir / 'checkpoints' / 'best'}: the best checkpoint (step {best_step}) "
                                      "is missing and cannot be rebuilt from the latest one; start the run again "
                                      "with run.overwrite=true")
    elif resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", run_dir / "checkpoints")

    t0 = time.perf_counter()

    def record_for(epoch: int, next_batch: int) -> dict:
        return {"kind": task.kind, "epoch": epoch, "next_batch": next_batch, "history": history,
                "best_step": best_step, "wall_time_s": wall_before + time.perf_counter() - t0}

    def step_number() -> int:
        return int(jax.device_get(task.state.step)) if hasattr(task.state, "step") else 0

    with _StopFlag() as stop:
        for epoch in range(start_epoch, task.epochs):
            first = start_batch if epoch == start_epoch else 0
            if first == 0:
                train_sums = metrics_lib.zeros()
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
                    store.save(step_number(), {"state": task.state, "train_sums": train_sums},
                               record_for(epoch, batch_index))
                    store.close()
                    raise TrainingInterrupted(f"signal {stop.signal} at epoch {epoch + 1}, batch {batch_index}: "
                                              f"checkpoint saved in {run_dir / 'checkpoints'}; continue with --resume")
            bar.close()
            train = metrics_lib.summarize(train_sums)
            if train.get("nonfinite"):
                where = (f"epoch {epoch + 1}: {train['nonfinite']} batch(es) had a NaN/Inf training loss, the first "
                         f"at step {train['first_nonfinite_step']}")
                if task.on_nonfinite == "stop":
                    store.close()
                    raise NonFiniteLoss(f"{where}; stopped without saving this epoch, the last good checkpoint is kept "
                                        f"in {run_dir / 'checkpoints'} (train.on_nonfinite=skip drops such batches)")
                log.warning("%s; their updates were skipped (train.on_nonfinite=skip)", where)
            val = evaluate(task)
            reported = {name: evaluate(task, batches) for name, batches in task.reported_batches.items()}
            history.append({"epoch": epoch + 1, "train": train, "val": val,
                            **({"reported": reported} if reported else {})})
            is_best = val["accuracy"] > max((h["val"]["accuracy"] for h in history[:-1]), default=-1.0)
            if is_best:
                best_step = step_number()
            store.save(step_number(), {"state": task.state, "train_sums": train_sums}, record_for(epoch + 1, 0),
                       best=is_best)
            log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f mcc %.4f%s%s", epoch + 1,
                     task.epochs, train["loss"], train["accuracy"], val["loss"], val["accuracy"], val["mcc"],
                     "".join(f" | {name} acc {m['accuracy']:.4f} mcc {m['mcc']:.4f}" for name, m in reported.items()),
                     "  (best)" if is_best else "")
            _write(run_dir, task, history, wall_before + time.perf_counter() - t0)
    store.close()
    if not history:
        raise ValueError("no epochs were run (train.epochs is already reached by the checkpoint?)")
    return _write(run_dir, task, history, wall_before + time.perf_counter() - t0)


def _write(run_dir: Path, task: Task, history: list[dict], wall: float) -> dict:
    summary = {**_summary(history), **task.info, "wall_time_s": wall}
    if is_main_process():
        rundir.write_metrics(run_dir, {"kind": task.kind, "epochs": history, "summary": summary})
        plots.plot_curves(history, run_dir, task.title)
    return summary
