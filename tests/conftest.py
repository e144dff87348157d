"""pytest set-up: a CPU suite, torch in fp32, and fixtures over the helpers in tests/tiny.py."""
from __future__ import annotations

import os
import sys

import pytest

# The suite is a CPU suite: on a GPU host "auto" dtypes would resolve to bf16 and the fp32 parity tolerances
# would not apply. Set JAX_PLATFORMS yourself to run it elsewhere (test_precision then skips what is CPU-only).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole test session, cached whatever the compile time (workers and the
# subprocesses the tests start inherit it; runs get it as run.compilation_cache=XLA_CACHE of tests/tiny.py, since
# run.compilation_cache="" turns caching off): the tiny models' steps are compiled by dozens of tests, and a hit
# returns the same executable, so results do not change, only the time. A fresh directory per session, so no test
# ever sees a cache from another version.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora_kd_jax_tests_xla_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# The trained runs many files read (tests/shared_runs.py), built once per session across the workers.
if "LORA_KD_JAX_TEST_RUNS" not in os.environ:
    import tempfile

    os.environ["LORA_KD_JAX_TEST_RUNS"] = tempfile.mkdtemp(prefix="lora_kd_jax_tests_runs_")

from tiny import make_mixed_length_batch, parity_config  # noqa: E402  (test helpers live in tests/tiny.py)

def pytest_report_header(config):
    """Which lora_kd_jax the suite tests: the installed package (CI: PYTHONSAFEPATH=1) or the source tree."""
    import lora_kd_jax

    return f"lora_kd_jax under test: {os.path.dirname(lora_kd_jax.__file__)}"


_COST: dict[str, list[float]] = {}  # test file -> [seconds of setup + call + teardown, tests run]


def pytest_runtest_logreport(report):
    """What each file costs (on the controller, summed over the xdist workers): docs/testing.md's cost column."""
    cost = _COST.setdefault(report.nodeid.split("::")[0], [0.0, 0])
    cost[0] += report.duration
    cost[1] += report.when == "call"


def pytest_terminal_summary(terminalreporter):
    """Each file's cost, most first, and the total: worker-seconds (on 2 workers the wall time is about half)."""
    if not _COST or terminalreporter.config.option.collectonly:
        return
    total = sum(c for c, _ in _COST.values())
    terminalreporter.write_sep("-", f"worker-seconds per test file: {total:.0f} s in all")
    for name, (seconds, tests) in sorted(_COST.items(), key=lambda kv: -kv[1][0]):
        terminalreporter.write_line(f"{seconds:8.1f} s  {tests:4d} tests  {name}")


def pytest_runtest_setup(item):
    """torch (a test extra, imported only by the tests that need it) computes in fp32 in every test."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_default_dtype(torch.float32)


@pytest.fixture
def tiny_cfg(tmp_path):
    """Config for the tiny random GPT-2; run.dir in tmp_path, the session's compilation cache."""
    return parity_config(run_dir=tmp_path / "run")


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
