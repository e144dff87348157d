"""What each epoch leaves: its log line, every lane's metrics.json and plots, a seeded run's aggregate over its
seeds, and the summary a run returns."""
from __future__ import annotations

import logging
from typing import Any

from lora_kd_jax.core import seed_stats, selection
from lora_kd_jax.runs import rundir
from lora_kd_jax.training.mesh import is_main_process

log = logging.getLogger("lora_kd_jax.training.loop")  # the epoch lines belong to the loop's log


def run_summary(history: list[dict], select: str = "accuracy") -> dict:
    """A run's summary from its history: the metrics at its best epoch (validation `select` alone decides; the
    first epoch wins ties)."""
    return selection.summary(history, select)


def log_epoch(label: str, epochs: int, entry: dict, is_best: bool, select: str = "accuracy") -> None:
    train, val, rep = entry["train"], entry["val"], entry.get("reported", {})
    scores = lambda m: selection.format_scores(m, select)  # noqa: E731
    log.info("%sepoch %d/%d  train loss %.4f %s | val loss %.4f %s%s%s", label, entry["epoch"], epochs,
             train["loss"], selection.format_scores(train, select, brief=True), val["loss"], scores(val),
             "".join(f" | {name} {scores(m)}" for name, m in rep.items()), "  (best)" if is_best else "")


# accuracy.png and loss.png are redrawn after an epoch at most this often, and always at the end of a run (drawing
# costs ~0.5 s a figure: more than a tiny model's epoch); metrics.json is rewritten after every epoch
PLOT_INTERVAL_S = 30.0


def write_metrics(task: Any, lanes: Any, run: Any, *, plot: bool) -> dict:
    """metrics.json (and, when `plot`, the plots) of each lane in its dir, then of a seeded run's aggregate in the
    run dir; returns the run's summary (a single run's, or the aggregate). An early stop is in every summary.
    (`task`, `lanes`, `run`: the loop's Task, Lanes and RunProgress.)"""
    if plot:  # matplotlib only when a run draws: importing pyplot costs ~0.5 s of every command's start
        from lora_kd_jax.runs import plots
    histories, wall = run.histories, run.wall()
    stopped = {"stopped": run.stopped} if run.stopped else {}
    summaries = []
    for lane_dir, title, extra, history in zip(lanes.dirs, lanes.titles, lanes.summary_extras, histories):
        summaries.append({**run_summary(history, task.select), **task.info, **extra, **stopped, "wall_time_s": wall})
        if is_main_process():
            rundir.write_metrics(lane_dir, {"kind": task.kind, "epochs": history, "summary": summaries[-1]})
            if plot:
                plots.plot_curves(history, lane_dir, title, task.select)
                plots.plot_optimizer({"train": history}, lane_dir, title)
    if not lanes.seeded:
        return summaries[0]
    per_seed = dict(zip(lanes.seeds, summaries))
    keys = selection.stat_keys(summaries[0])
    summary = {"seeds": lanes.seeds, "select": task.select, "seed_stats": seed_stats.aggregate(per_seed, keys),
               "per_seed": {str(k): {key: s[key] for key in keys if key in s} for k, s in per_seed.items()},
               **task.info, **stopped, "wall_time_s": wall}
    if is_main_process():
        rundir.write_metrics(lanes.run_dir, {"kind": task.kind, "seeds": lanes.seeds,
                                             "epochs": seed_stats.epoch_stats(histories), "summary": summary})
        if plot:
            plots.plot_seed_curves(dict(zip(lanes.seeds, histories)), lanes.run_dir, task.title)
            plots.plot_optimizer({f"seed {k}": h for k, h in zip(lanes.seeds, histories)}, lanes.run_dir,
                                 task.title)
    return summary
