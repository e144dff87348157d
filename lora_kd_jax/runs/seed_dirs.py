"""Where each seed of a seeded run lives: `RUN_DIR/seed_<k>/`, in exactly the layout of a single run (config.yaml,
metrics.json, checkpoints/best, plots), so evaluate, predict, export and distillation read one seed like any run;
`RUN_DIR/metrics.json` holds the aggregate (`core.seed_stats`)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from lora_kd_jax.core.keys import base_seed

SEED_DIR_PREFIX = "seed_"


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
