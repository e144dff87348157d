"""The test helpers, in one place: tiny-model configs (2 layers, 64 wide, real 50,257 vocabulary), batches, keys."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from lora_kd_jax.assets import COLA_DIR, TOKENIZER_DIR  # noqa: F401  (the packaged files; tests name them here)
from lora_kd_jax.core.config import Config, load_config

PAD_ID = 50256  # GPT-2 eos, used as pad (lora_kd_jax.data.PAD_ID)
VOCAB = 50257

# the session's compilation cache (tests/conftest.py), named explicitly: run.compilation_cache="" turns caching off
XLA_CACHE = f"run.compilation_cache={os.environ.get('JAX_COMPILATION_CACHE_DIR', '')}"

# NO_PLOTS: a tiny run's PNGs cost about as much as its training (three matplotlib figures, ~0.35 s) and
# most tests never look at them; the tests that check plots pass run.plots=true (PLOTTED), and
# tests/test_front_door.py draws every figure for every kind of history
PLOTTED, NO_PLOTS = "run.plots=true", "run.plots=false"
# tests/test_mesh.py's loopback run (train-lora's arguments), over 2 processes and in tests/mesh_worker.py on 4 devices
LOOPBACK = [str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"), "data.limit=48", "train.batch_size=16",
            "train.epochs=1", "lora.dropout=0.1", XLA_CACHE, NO_PLOTS]
TINY = ["model.name=custom", "model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
        "lora.dropout=0.0", XLA_CACHE, NO_PLOTS]


def one_line_exit(*argv: str) -> str:
    """The message of a CLI run that must end in a user error: a non-zero exit, one line, no traceback."""
    import pytest

    from lora_kd_jax.commands import cli

    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    message = str(e.value.code)
    assert e.value.code not in (0, None) and "\n" not in message and "Traceback" not in message, message
    return message


def log_messages(run_dir: Path, since: int = 0) -> list[str]:
    """The messages of a run's log.txt from byte `since` on (what a later process appended), without the time,
    level and logger prefix."""
    text = (Path(run_dir) / "log.txt").read_bytes()[since:].decode()
    return [line.split(": ", 1)[1] for line in text.splitlines() if ": " in line]


def latest_step(run_dir: Path) -> int:
    """The step of the newest checkpoint in a run's checkpoints/latest (what a --resume starts from)."""
    return max(int(p.name) for p in (Path(run_dir) / "checkpoints" / "latest").iterdir() if p.name.isdigit())


def assert_resumed(messages: Sequence[str], *, from_step: int, to_step: int) -> None:
    """The process that wrote `messages` resumed (it did not start over): one 'resumed from checkpoint step
    from_step' line, no fresh-start warning, and it trained exactly steps from_step + 1 .. to_step. On a CPU a
    restarted run ends with the uninterrupted run's numbers, so equal numbers alone do not prove a resume."""
    resumed = [m for m in messages if m.startswith("resumed from checkpoint step ")]
    assert [m.split(":")[0] for m in resumed] == [f"resumed from checkpoint step {from_step}"], resumed
    assert not [m for m in messages if "starting from scratch" in m], "the resume started from scratch"
    trained = [m for m in messages if m.startswith("this process trained steps ")]
    assert trained == [f"this process trained steps {from_step + 1} to {to_step} ({to_step - from_step} steps)"], \
        trained


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


PARITY_OVERRIDES = ("model.name=custom", "model.init=random", "model.n_layer=2", "model.n_embd=64",
                  "model.n_head=4", "model.n_positions=64", "model.dropout=0.0", "train.batch_size=8",
                  "train.epochs=1", XLA_CACHE, NO_PLOTS)


def parity_config(*overrides: str, run_dir: str | Path = "runs/test"):
    """The parity tests' config: 2-layer, 64-wide random GPT-2 (64 positions, no GPT-2 dropout, LoRA dropout as
    configured), batch 8, one epoch, the packaged data."""
    return load_config(None, [*PARITY_OVERRIDES, f"run.dir={run_dir}", *overrides])


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


def run_python(code: str, *, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh process (what an import or an absent package does there, not here); fails the
    test with the end of its stderr unless it exits 0."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


CORE_INSTALL = Path(__file__).resolve().parent / "core_install"


def core_install_env(env: dict[str, str] | None = None, *, never: Sequence[str] = ()) -> dict[str, str]:
    """`env` (default: this process's) for a process that runs as the core install (no test extra) runs: without
    PyTorch (tests/core_install/sitecustomize.py). The commands must not need it, and such a process skips the ~2 s
    that transformers spends importing PyTorch wherever it is installed. `never`: more modules the command must not
    import (any import of them fails), e.g. matplotlib for a command that draws nothing."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(CORE_INSTALL), *filter(None, [env.get("PYTHONPATH")])])
    env["LORA_KD_JAX_TEST_UNIMPORTABLE"] = ",".join(never)
    return env


def user_env(home: Path) -> dict[str, str]:
    """The environment of a user's process for the tests that run README text verbatim: the core install's (no
    PyTorch: `core_install_env`), a home of its own (nothing written into the real one), whose default XLA cache
    (run.compilation_cache=~/.cache/lora_kd_jax/xla) is the session's, so it reuses what the other tests compiled;
    matplotlib's own cache kept."""
    import matplotlib

    (home / ".cache" / "lora_kd_jax").mkdir(parents=True, exist_ok=True)
    link = home / ".cache" / "lora_kd_jax" / "xla"
    if not link.exists():
        link.symlink_to(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return core_install_env({**os.environ, "HOME": str(home), "MPLCONFIGDIR": matplotlib.get_configdir(),
                             "JAX_PLATFORMS": "cpu"})


def sigterm_at_batch(loop_module, n: int):
    """A stand-in for `loop_module.prefetch` that raises SIGTERM as batch `n` (1-based, counted over the process)
    is handed to the step: the run checkpoints and stops there (monkeypatch it in, then restore the original)."""
    import signal

    original, seen = loop_module.prefetch, {"n": 0}

    def interrupting(batches, put=jax.device_put, size=2):
        for batch in original(batches, put, size):
            seen["n"] += 1
            if seen["n"] == n:
                signal.raise_signal(signal.SIGTERM)
            yield batch

    return interrupting


def save_random_checkpoint(cfg: Config, out_dir: Path, seed: int = 0, *, edit=None) -> dict:
    """A random base of `cfg`'s family and size, saved as a Hugging Face checkpoint (config.json +
    model.safetensors) by the library's own export writer: what `model.path` loads, no torch needed. `edit` may
    change the numpy parameters first. Returns the saved parameters (numpy)."""
    from lora_kd_jax.interop.export import save_checkpoint
    from lora_kd_jax.models.build import build_classifier

    model, params = build_classifier(cfg, jax.random.key(seed), with_lora=False)
    params = jax.tree.map(np.asarray, params)
    if edit is not None:
        params = edit(params)
    save_checkpoint(cfg, model, params, Path(out_dir))
    return params


def save_torch_gpt2(out_dir: Path, seed: int = 3, *, safe: bool = True, **sizes):
    """A random PyTorch GPT2Model (2 layers, 64 wide, 64 positions unless `sizes` say otherwise) written by
    transformers' save_pretrained (safetensors, or pytorch_model.bin with `safe=False`). Returns the torch model."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(**{"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64, "pad_token_id": 50256,
                           **sizes})
    model = GPT2Model(config).eval()
    model.save_pretrained(str(out_dir), safe_serialization=safe)
    return model
