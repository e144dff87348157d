"""Shared test fixtures: a tiny random GPT-2 config with the local data paths, and mixed-length batches."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

# The suite is a CPU suite: on a GPU host "auto" dtypes would resolve to bf16 and the fp32 parity tolerances
# would not apply. Set JAX_PLATFORMS yourself to run it elsewhere (test_precision then skips what is CPU-only).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tiny import COLA_DIR, TOKENIZER_DIR  # noqa: E402, F401  (one place for the data paths)

REPO = Path(__file__).resolve().parents[1]
PAD_ID = 50256  # GPT-2 eos, used as pad (lora_kd_jax.data.PAD_ID)
VOCAB = 50257


def pytest_runtest_setup(item):
    """torch (a test extra, imported only by the tests that need it) computes in fp32 in every test."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_default_dtype(torch.float32)

TINY_OVERRIDES = ("model.name=custom", "model.init=random", "model.n_layer=2", "model.n_embd=64",
                  "model.n_head=4", "model.n_positions=64", "model.dropout=0.0", "train.batch_size=8",
                  "train.epochs=1", "run.compilation_cache=")


def tiny_config(*overrides: str, run_dir: str | Path = "runs/test"):
    """A validated Config: 2-layer, 64-wide random GPT-2 with the real vocabulary and the local CoLA files."""
    from lora_kd_jax.config import load_config

    return load_config(None, [*TINY_OVERRIDES, f"run.dir={run_dir}", *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    """Config for the tiny random GPT-2; run.dir in tmp_path, no persistent compilation cache."""
    return tiny_config(run_dir=tmp_path / "run")


def make_mixed_length_batch(lengths: Sequence[int], seq_len: int = 20, *, seed: int = 0,
                            n_labels: int = 2) -> dict[str, np.ndarray]:
    """Right-padded random ids of the given real lengths: input_ids (pad = PAD_ID), attention_mask, labels,
    weights (all 1.0) — the batch layout of lora_kd_jax.data.batch_iterator."""
    if any(not 1 <= n <= seq_len for n in lengths):
        raise ValueError(f"lengths {list(lengths)} must lie in [1, {seq_len}]")
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids = np.full((b, seq_len), PAD_ID, np.int32)
    mask = np.zeros((b, seq_len), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, PAD_ID, n)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, n_labels, b).astype(np.int32),
            "weights": np.ones(b, np.float32)}


@pytest.fixture
def mixed_length_batch():
    """The factory `make_mixed_length_batch(lengths, seq_len=20, *, seed=0)`."""
    return make_mixed_length_batch


@pytest.fixture
def highest_precision():
    """fp32 matmuls at full precision (CPU does this anyway; on GPU/TPU the default may be TF32/bf16 passes)."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield
