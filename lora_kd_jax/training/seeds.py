"""Many seeds in one program: the seed axis, the per-seed run dirs, and the mean ± std of their results.

With `train.seeds = [k0, k1, ...]` a trainer stacks N independent trainable states (parameters, Adam state, step,
dropout key) on a leading axis and runs the single-seed step under `jax.vmap`; the frozen base is one shared
argument. Each seed k keeps the keys and data order of a single run with `train.seed = k`, and writes its results
to `RUN_DIR/seed_<k>/` in exactly the layout of a single run (config.yaml, metrics.json, checkpoints/best, plots),
so evaluate, predict, export and distillation read one seed like any run. `RUN_DIR/metrics.json` holds the
aggregate.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lora_kd_jax.core.keys import base_seed

SEED_DIR_PREFIX = "seed_"
STATS = ("mean", "std", "min", "max")


def is_seeded(cfg: Any) -> bool:
    """True when the config asks for many seeds at once (train.seeds non-empty)."""
    return bool(cfg.train.seeds)


def seed_dir(run_dir: str | os.PathLike, seed: int) -> Path:
    return Path(run_dir) / f"{SEED_DIR_PREFIX}{seed}"


def seed_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The seed_<k> dirs under a run dir, in seed order."""
    found = [p for p in Path(run_dir).glob(f"{SEED_DIR_PREFIX}*")
             if p.is_dir() and p.name[len(SEED_DIR_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(SEED_DIR_PREFIX):]))


def seed_config(cfg: Any, seed: int) -> Any:
    """The config of seed `seed` of a seeded run, as a single run: train.seed=seed, no seed list, run.dir its seed
    dir, and model.base_seed fixed to the shared base's seed (so re-reading it rebuilds the same random base)."""
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, seed=seed, seeds=[]),
        model=dataclasses.replace(cfg.model, base_seed=base_seed(cfg)),
        run=dataclasses.replace(cfg.run, dir=str(seed_dir(cfg.run.dir, seed))))


def stack(trees: Sequence[Any]) -> Any:
    """N pytrees of equal structure -> one pytree whose leaves carry a leading axis of size N."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def take(tree: Any, i: int) -> Any:
    """Seed i's slice of a stacked pytree."""
    import jax

    return jax.tree.map(lambda x: x[i], tree)


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
    from lora_kd_jax.core.selection import SCORES

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
