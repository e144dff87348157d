"""Which epoch is a run's best (`train.select`), what its summary says about it, and an epoch's scores in words.

Why apart from the loop: the selected metric (accuracy for the CoLA study, the task's metric for other data) is
a question about metrics, not about stepping; the epoch loop asks it in one line each time.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

SCORES = ("accuracy", "mcc", "f1", "macro_f1", "mse", "pearson", "spearman")  # what an epoch's entry may hold, in log order


def score(metrics: Mapping[str, float], select: str) -> float:
    """The selected metric of one set's metrics (higher is better); NaN counts as the worst."""
    value = metrics.get(select, math.nan)
    return -math.inf if value is None or math.isnan(value) else float(value)


def best_entry(history: Sequence[Mapping], select: str = "accuracy") -> Mapping:
    """The epoch whose validation `select` is highest; the first wins ties."""
    return max(history, key=lambda h: score(h["val"], select))


def improves(entry: Mapping, earlier: Sequence[Mapping], select: str = "accuracy") -> bool:
    """Whether `entry` beats every earlier epoch on validation `select` (the first epoch always does)."""
    return score(entry["val"], select) > max((score(h["val"], select) for h in earlier), default=-math.inf)


def summary(history: Sequence[Mapping], select: str = "accuracy") -> dict:
    """A run's summary: the epoch `select` picks and its metrics (`best_val_<select>`, `val_<metric>_at_best`, and
    per reported set `<set>_<metric>_at_best`); the CoLA study's keys (best_val_accuracy, val_mcc_at_best,
    train_accuracy_at_best, ...) keep their names."""
    best = best_entry(history, select)
    val, train = best["val"], best["train"]
    out = {"best_epoch": best["epoch"], "select": select, f"best_val_{select}": val.get(select)}
    if "accuracy" in val:
        out.update(best_val_accuracy=val["accuracy"], train_accuracy_at_best=train.get("accuracy"))
    out.update({f"val_{m}_at_best": val[m] for m in SCORES if m in val and m != select and m != "accuracy"})
    out.update(val_loss_at_best=val["loss"], epochs_run=len(history))
    for name, m in best.get("reported", {}).items():
        out.update({f"{name}_{k}_at_best": m[k] for k in SCORES if k in m})
    return out


def headline(summary: Mapping) -> str:
    """The summary's best epoch in words, for the end of a run's log."""
    select = summary.get("select", "accuracy")
    more = ", ".join(f"{k.removeprefix('val_').removesuffix('_at_best')} {v:.4f}" for k, v in summary.items()
                     if k.startswith("val_") and k.endswith("_at_best") and k != "val_loss_at_best")
    return f"best val {select} {summary[f'best_val_{select}']:.4f} at epoch {summary['best_epoch']} ({more})"


def format_scores(metrics: Mapping[str, float], select: str = "accuracy", *, brief: bool = False) -> str:
    """One set's metrics for an epoch's log line: 'acc 0.8123 mcc 0.4012' for a classifier (the selected metric
    after them when it is another), 'mse 0.5012 pearson 0.8100' for a regression; `brief`: the first only."""
    names = {"accuracy": "acc", "mcc": "mcc", "f1": "f1", "macro_f1": "macro-f1", "mse": "mse", "pearson": "pearson",
             "spearman": "spearman"}
    shown = [m for m in ("accuracy", "mcc", "mse", "pearson", "spearman") if m in metrics]
    if select not in shown and select in metrics:
        shown.append(select)
    if brief:
        shown = shown[:1]
    return " ".join(f"{names[m]} {metrics[m]:.4f}" for m in shown)


def stat_keys(summary: Mapping) -> list[str]:
    """The keys of a run's summary that describe its best epoch (best_epoch, best_val_*, *_at_best): what the
    aggregate of a seeded run reports over its seeds, whatever the head and the selected metric."""
    return [k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and (k == "best_epoch" or k.startswith("best_val_") or k.endswith("_at_best"))]
