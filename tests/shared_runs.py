"""Trained runs the whole test session shares: each built once across the xdist workers, read by every file that
needs it, copied where a test changes it.

A run is built under a file lock into `<session root>/<name>` (the root is made once by tests/conftest.py, before
the workers start, and handed to them in `LORA_KD_JAX_TEST_RUNS`); a `.complete` file written last marks it done.
The worker that takes the lock first builds it; the others wait and read it. A build that fails leaves no
`.complete`: its directory is removed and the next test that asks builds it again (and fails again, with the
build's own error). Readers must not change a shared run: a test that would copies it first.

`TEACHER`: a one-epoch LoRA run of a 3-layer, 64-wide random GPT-2 on 16 CoLA rows (seed-init factors, so the
merged kernels differ from the base's) — the teacher of tests/test_student_zoo.py and
tests/test_student_transformer.py.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock

ROOT_ENV = "LORA_KD_JAX_TEST_RUNS"
TEACHER = "teacher_3_layers"
TEACHER_LAYERS = 3


def session_root() -> Path:
    """The session's directory of shared runs (tests/conftest.py makes it; a lone `pytest -p no:xdist` run too)."""
    root = os.environ.get(ROOT_ENV)
    if not root:
        raise RuntimeError(f"{ROOT_ENV} is not set: tests/conftest.py sets it when the session starts")
    return Path(root)


def shared_run(name: str, build: Callable[[Path], object]) -> Path:
    """`<root>/<name>`, built by `build(run_dir)` the first time any worker asks for it."""
    root = session_root()
    run_dir = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (run_dir / ".complete").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)  # a build that failed half-way: start again
            build(run_dir)
            (run_dir / ".complete").write_text("built\n")
    return run_dir


def teacher_run() -> Path:
    """The shared tiny GPT-2 LoRA teacher (`TEACHER`)."""

    def build(run_dir: Path) -> None:
        from lora_kd_jax.runs import rundir
        from lora_kd_jax.training import finetune
        from tiny import tiny_config

        finetune.train_lora(tiny_config(f"model.n_layer={TEACHER_LAYERS}", "data.limit=16", "train.batch_size=16",
                                        "train.epochs=1", f"run.dir={run_dir}"), progress=False)
        rundir.detach_log(run_dir)

    return shared_run(TEACHER, build)
