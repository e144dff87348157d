"""What a run records of each step besides its metric sums: the loss, learning rate and gradient norm the step
returned (kept on device until the epoch's end, so the loop adds no host sync), the host time between steps, and
a `jax.profiler` trace of a window of steps (`--profile STEPS`).

Per epoch the history gets each lane's mean gradient norm and last learning rate (`epoch_stats`); the running sums
behind them travel in the checkpoint record (`state`/`load`), so a run resumed mid-epoch reports the epoch exactly
as the uninterrupted run does.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

STEP_KEYS = ("loss", "lr", "grad_norm")  # what `steps.make_train_step` returns beside the metric sums


class StepTrace:
    """This epoch's per-step scalars: device values buffered as the steps return them, fetched in one transfer
    by `collect` (at the epoch's end, or when a stop signal saves mid-epoch)."""

    def __init__(self, n_lanes: int):
        self.n_lanes = n_lanes
        self._pending: list[dict] = []
        self._steps: list[int] = []
        self._times: list[float] = []
        self._last = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        """A new epoch: the running sums start at zero."""
        self.grad_norm_sum = np.zeros(self.n_lanes)
        self.finite_steps = np.zeros(self.n_lanes)
        self.last_lr = np.full(self.n_lanes, np.nan)

    def start_clock(self) -> None:
        """The epoch's steps begin: the next step's time is counted from now (not from the last evaluation)."""
        self._last = time.perf_counter()

    def add(self, step: int, sums: dict) -> None:
        """Step number `step` returned `sums` (device arrays, untouched here: no sync)."""
        now = time.perf_counter()
        self._pending.append({k: sums[k] for k in STEP_KEYS if k in sums})
        self._steps.append(step)
        self._times.append(now - self._last)
        self._last = now

    def collect(self) -> dict[str, Any]:
        """The buffered steps as host arrays ({'step': [n], 'time_s': [n], key: [n, lanes]}), folded into the
        epoch's running sums (in step order, so a resumed epoch sums exactly as an uninterrupted one)."""
        values = jax.device_get(self._pending)
        out = {"step": np.asarray(self._steps, np.int64), "time_s": np.asarray(self._times)}
        for key in STEP_KEYS:
            out[key] = np.asarray([np.broadcast_to(np.asarray(v.get(key, np.nan), np.float64), (self.n_lanes,))
                                   for v in values]).reshape(len(values), self.n_lanes)
        for norm, lr in zip(out["grad_norm"], out["lr"]):
            finite = np.isfinite(norm)
            self.grad_norm_sum = self.grad_norm_sum + np.where(finite, norm, 0.0)
            self.finite_steps = self.finite_steps + finite
            self.last_lr = lr
        self._pending, self._steps, self._times = [], [], []
        return out

    def epoch_stats(self, lane: int) -> dict[str, float]:
        """Lane's mean gradient norm over the epoch's finite steps and the learning rate of its last step."""
        n = self.finite_steps[lane]
        return {"grad_norm": float(self.grad_norm_sum[lane] / n) if n else float("nan"),
                "lr": float(self.last_lr[lane])}

    def state(self) -> dict:
        """The epoch's running sums for the checkpoint record (JSON)."""
        return {"grad_norm_sum": self.grad_norm_sum.tolist(), "finite_steps": self.finite_steps.tolist(),
                "last_lr": self.last_lr.tolist()}

    def load(self, record: dict | None) -> None:
        """Take the running sums of a record written mid-epoch (absent in older records: start from zero)."""
        self.reset()
        if record:
            self.grad_norm_sum = np.asarray(record["grad_norm_sum"], np.float64)
            self.finite_steps = np.asarray(record["finite_steps"], np.float64)
            self.last_lr = np.asarray(record["last_lr"], np.float64)


class ProfileWindow:
    """`jax.profiler` trace of `steps` training steps into `directory`, after the first step this process runs
    (its compilation is not what a profile is for). The state is waited for before the trace stops, so the
    window's device work is in it; outside the window nothing waits."""

    def __init__(self, steps: int, directory: Path):
        self.steps, self.directory = steps, directory
        self.seen, self.active, self.done = 0, False, steps <= 0

    def before_step(self) -> None:
        if not self.done and not self.active and self.seen == 1:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active, self.started = True, self.seen

    def after_step(self, state: Any) -> None:
        self.seen += 1
        if self.active and self.seen - self.started >= self.steps:
            self.stop(state)

    def stop(self, state: Any) -> None:
        """End the trace (at the window's end, or when the run ends first)."""
        if not self.active:
            return
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active, self.done = False, True
        log.info("profile of %d step(s) written to %s (open it with TensorBoard's profile plugin or Perfetto)",
                 self.seen - self.started, self.directory)
