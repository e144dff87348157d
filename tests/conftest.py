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
# XLA:CPU's code generation is most of the suite's time: it compiles thousands of tiny programs and runs each only a
# few times. So the tests compile with JAX's jax_disable_most_optimizations (LLVM without its optimisation passes),
# XLA's loop emitters instead of its newer fusion emitters, and each program in one piece: the same HLO programs (XLA's
# HLO passes all run), a quarter of the compile time (tests/test_accumulate.py: 29 s of compiling -> 7 s; the suite:
# 16 min -> 10). Users' runs keep XLA's defaults. Float32 results may differ from the default code generation in the
# last bits; the one test whose bound is tighter than that takes the `xla_default_codegen` fixture below.
# LORA_KD_JAX_TEST_XLA_DEFAULTS=1 runs the whole suite as users compile. A jaxlib that does not know an XLA flag
# does not get it (an unknown flag would abort XLA).
FAST_CODEGEN = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def _flags_jaxlib_knows(flags):
    """The flags whose names XLA's library (jaxlib/libjax_common.so) holds."""
    import importlib.util
    import mmap

    spec = importlib.util.find_spec("jaxlib")
    library = os.path.join(os.path.dirname(spec.origin), "libjax_common.so") if spec and spec.origin else ""
    if not os.path.exists(library):
        return []
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as text:
        return [flag for flag in flags if text.find(b"\0" + flag[2:].split("=")[0].encode() + b"\0") >= 0]


FAST_COMPILES = os.environ.get("LORA_KD_JAX_TEST_XLA_DEFAULTS") != "1"
if FAST_COMPILES and "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ:  # set once, in the xdist controller
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # workers and subprocesses inherit both
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_flags_jaxlib_knows(FAST_CODEGEN)]).strip()
# One OpenMP thread per process (PyTorch's references, NumPy's BLAS): the suite runs one xdist worker per core, and
# OpenMP's threads spin while they wait, on the core the other worker needs (tests/test_variants.py, test_families.py,
# test_parity_lora.py and test_family_variants.py on 2 workers: 180 -> 151 CPU-seconds, wall 98 -> 84 s, medians of
# 4 runs each way). XLA's own thread pool does not read it. Set OMP_NUM_THREADS yourself to choose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The trained runs many files read (tests/shared_runs.py), built once per session across the workers.
if "LORA_KD_JAX_TEST_RUNS" not in os.environ:
    import tempfile

    os.environ["LORA_KD_JAX_TEST_RUNS"] = tempfile.mkdtemp(prefix="lora_kd_jax_tests_runs_")

from tiny import make_mixed_length_batch, parity_config  # noqa: E402  (test helpers live in tests/tiny.py)

def pytest_report_header(config):
    """Which lora_kd_jax the suite tests (the installed package, CI: PYTHONSAFEPATH=1, or the source tree) and how
    it compiles."""
    import lora_kd_jax

    codegen = ("fast (jax_disable_most_optimizations; XLA_FLAGS=" + os.environ.get("XLA_FLAGS", "") + ")"
               if os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1" else "XLA's defaults")
    return [f"lora_kd_jax under test: {os.path.dirname(lora_kd_jax.__file__)}", f"XLA code generation: {codegen}"]


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
    terminalreporter.write_sep("-", f"worker-seconds per test file: {total:.0f} s in all, on {_cpu()}")
    for name, (seconds, tests) in sorted(_COST.items(), key=lambda kv: -kv[1][0]):
        terminalreporter.write_line(f"{seconds:8.1f} s  {tests:4d} tests  {name}")


def _cpu() -> str:
    """The CPU the suite ran on (its model and widest vector unit): its time and its float32 rounding vary with it."""
    model, flags = "an unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "an unknown CPU":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{model} ({vector}, {os.cpu_count()} cores)" if vector else f"{model} ({os.cpu_count()} cores)"


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
def xla_default_codegen(monkeypatch):
    """One test compiled as users compile: LLVM's optimisation passes back on and XLA's fusion emitters instead of
    the loop emitters (FAST_CODEGEN above, which XLA_FLAGS fixed for the whole process, is overridden per compile),
    its caches cleared before and after so that no program compiled the suite's faster way is reused: for a bound
    tighter than the two code generations' float32 rounding differs by (how much depends on the CPU)."""
    import jax
    from jax._src import compiler

    defaults = {"xla_cpu_use_fusion_emitters": True, "xla_cpu_parallel_codegen_split_count": 32}  # XLA's own
    defaults = {name: value for name, value in defaults.items()
                if any(flag[2:].startswith(name + "=") for flag in os.environ.get("XLA_FLAGS", "").split())}
    get_compile_options = compiler.get_compile_options

    def as_users_compile(*args, env_options_overrides=None, **kwargs):
        return get_compile_options(*args, env_options_overrides={**defaults, **(env_options_overrides or {})},
                                   **kwargs)

    monkeypatch.setattr(compiler, "get_compile_options", as_users_compile)
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1")
        jax.clear_caches()


@pytest.fixture
def highest_precision():
    """fp32 matmuls at full precision (CPU does this anyway; on GPU/TPU the default may be TF32/bf16 passes)."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield
