"""Tiny-model builders shared by the LoRA/training tests (2 layers, 64 wide, real 50,257 vocabulary)."""
from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np

from lora_kd_jax.config import Config, load_config

from lora_kd_jax.assets import COLA_DIR, TOKENIZER_DIR  # noqa: F401  (the packaged files; tests name them here)

TINY = ["model.name=custom", "model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
        "lora.dropout=0.0", "run.compilation_cache="]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])  # data: the packaged CoLA and tokenizer (the defaults)


def random_batch(seed: int, batch: int = 8, length: int = 12, vocab: int = 50257) -> dict[str, np.ndarray]:
    """Right-padded ids of mixed lengths (1..length), labels and unit weights."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length  # at least one full row
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(0, vocab - 1, size=(batch, length)), 50256).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, 2, size=batch).astype(np.int32),
            "weights": np.ones(batch, np.float32), "index": np.arange(batch, dtype=np.int32)}


def key(seed: int = 0) -> jax.Array:
    return jax.random.key(seed)


def config_only_run(run_dir: Path, dest: Path) -> Path:
    """`dest`, a new dir holding only `run_dir`'s config.yaml: a run that never finished an epoch (no checkpoint,
    no metrics.json)."""
    dest.mkdir()
    shutil.copyfile(run_dir / "config.yaml", dest / "config.yaml")
    return dest
