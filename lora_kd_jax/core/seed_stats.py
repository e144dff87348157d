"""Many seeds' results as one: mean, std (sample), min and max of each seed's numbers, per epoch and at the best
epoch, and the aggregate in words. What a seeded run's metrics.json and `reproduce --seeds` report."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from lora_kd_jax.core.selection import SCORES

STATS = ("mean", "std", "min", "max")


def stats(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample, n-1; 0 for one value), min, max."""
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def aggregate(summaries: Mapping[int, Mapping[str, Any]], keys: Sequence[str] | None = None) -> dict[str, dict]:
    """{key: stats over seeds} for every numeric key the seeds' summaries share (or the given `keys`)."""
    first = next(iter(summaries.values()))
    keys = keys or [k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and all(isinstance(s.get(k), (int, float)) for s in summaries.values())]
    return {k: stats([s[k] for s in summaries.values()]) for k in keys  # a key a run lacks (no out-of-domain set)
            if all(k in s and math.isfinite(float(s[k])) for s in summaries.values())}  # is left out


def epoch_stats(histories: Sequence[Sequence[Mapping]]) -> list[dict]:
    """Per epoch, stats over seeds of each split's loss and scores (accuracy, MCC, ...; a regression's mse, pearson,
    spearman): [{'epoch', 'train': {'accuracy': stats, ...}, 'val': ..., 'reported': {name: ...}}] (the aggregate
    metrics.json of a seeded run)."""
    def split_stats(per_seed: Sequence[Mapping]) -> dict:
        return {m: stats([r[m] for r in per_seed]) for m in ("loss", *SCORES) if all(m in r for r in per_seed)}

    out = []
    for rows in zip(*histories):
        entry: dict[str, Any] = {"epoch": rows[0]["epoch"]}
        for split in ("train", "val"):
            entry[split] = split_stats([r[split] for r in rows])
        names = rows[0].get("reported", {})
        if names:
            entry["reported"] = {n: split_stats([r["reported"][n] for r in rows]) for n in names}
        out.append(entry)
    return out


def format_stat(s: Mapping[str, float], scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std (min–max)' of a `stats` dict, e.g. 69.26 ± 0.41 (68.75–69.83) with scale=100."""
    return (f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f} "
            f"({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})")


def seed_headline(stats: Mapping[str, Mapping[str, float]], select: str = "accuracy") -> str:
    """A seeded run's aggregate in words: the selected metric (and MCC for a classifier) as mean ± std (min–max),
    in % for the classification metrics."""
    shown = [select] + (["mcc"] if select != "mcc" and "val_mcc_at_best" in stats else [])
    parts = []
    for m in shown:
        s = stats[f"best_val_{m}"] if m == select else stats[f"val_{m}_at_best"]
        pct = m not in ("mse", "pearson", "spearman")
        parts.append(f"{'best ' if m == select else ''}val {m} {format_stat(s, 100 if pct else 1, 2 if pct else 4)}"
                     f"{'%' if pct else ''}")
    return ", ".join(parts)
