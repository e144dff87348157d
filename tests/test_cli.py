"""The one command line: every command has --help, and every command ends a user's mistake with one line and a
non-zero status (no traceback), leaving nothing behind that blocks the corrected rerun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kd_jax.commands import cli
from tiny import NO_PLOTS, XLA_CACHE, one_line_exit

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("train-lora", "distill", "train-student", "train-rnn", "reproduce", "export-peft", "import-peft", "merge", "bench",
            "evaluate", "predict", "config")
TINY = ["model.name=custom", "model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
        "data.limit=32", "train.batch_size=16", "train.epochs=1", XLA_CACHE, NO_PLOTS]  # no test here reads a PNG


def test_help_lists_every_command_and_each_has_an_example():
    _, commands = cli.build_parser()
    assert tuple(commands) == COMMANDS
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
    out = subprocess.run([sys.executable, "-m", "lora_kd_jax", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and all(name in out.stdout for name in COMMANDS)


def test_the_console_command_is_installed():
    script = Path(sys.executable).parent / "lora-kd-jax"
    assert script.is_file(), "pip install puts the `lora-kd-jax` command beside the interpreter"
    out = subprocess.run([str(script), "train-lora", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "example: lora-kd-jax train-lora" in out.stdout



def test_a_lora_run_into_a_dir_holding_another_run_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    cli.main(["train-lora", str(REPO / "configs" / "smoke.yaml"), *TINY, f"run.dir={run}", "--no-progress"])
    config_before = (run / "config.yaml").read_text()
    message = one_line_exit("train-lora", str(REPO / "configs" / "smoke.yaml"), *TINY, "train.lr=0.01",
                            f"run.dir={run}")
    assert message.startswith("run dir error: ") and "different run" in message and "train.lr" in message
    assert (run / "config.yaml").read_text() == config_before  # the existing run is untouched
    # overrides may follow the flags: --resume with the same settings continues the finished run
    cli.main(["train-lora", str(REPO / "configs" / "smoke.yaml"), "--resume", *TINY, "train.epochs=2",
              f"run.dir={run}", "--no-progress"])
    assert "epoch 2/2" in (run / "log.txt").read_text()


@pytest.mark.parametrize("argv, start", [
    (["distill", "configs/distil_rnn_gpt2.yaml", "distill.teacher=/no/such/run"], "run error: distill.teacher"),
    (["train-rnn", "configs/rnn_scratch.yaml", "train.lrr=1"], "config error: "),
    (["reproduce", "--tiny", "student.cell=transformer", "run.dir={out}"], "config error: "),
    (["export-peft", "/no/such/run", "{out}"], "run error: "),
    (["import-peft", "/no/such/adapter", "configs/smoke.yaml", "--out", "{out}"], "export error: "),
    (["merge", "/no/such/run", "{out}"], "run error: "),
    (["bench", "--variants", "gpt3"], "usage error: --variants"),
    (["train-lora", "configs/no_such.yaml"], "config error: "),
])
def test_each_command_ends_a_user_error_in_one_line(argv, start, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"  # where the command would write: nothing may appear there
    message = one_line_exit(*[a.format(out=out) for a in argv])
    assert message.startswith(start), message
    assert not out.exists()


def test_an_empty_compilation_cache_setting_turns_off_a_cache_from_the_environment(tmp_path):
    """run.compilation_cache="" disables JAX's persistent cache even when JAX_COMPILATION_CACHE_DIR set one (and a
    directory given afterwards turns it on again there)."""
    env_cache, own_cache = tmp_path / "from_env", tmp_path / "own"
    code = ("import jax, jax.numpy as jnp, sys; from pathlib import Path; from lora_kd_jax.training import runtime\n"
            "runtime.enable_compilation_cache('')\n"
            "jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(5)).block_until_ready()\n"
            "print(len(list(Path(sys.argv[1]).glob('*'))))\n"
            "runtime.enable_compilation_cache(sys.argv[2])\n"
            "jax.jit(lambda x: jnp.cos(x) * 5)(jnp.ones(5)).block_until_ready()\n"
            "print(len(list(Path(sys.argv[2]).glob('*-cache'))))\n")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(env_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = subprocess.run([sys.executable, "-c", code, str(env_cache), str(own_cache)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "1"], out.stdout  # nothing written to the environment's cache; one entry


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.chdir(REPO)
    from lora_kd_jax.core.config import ConfigError

    with pytest.raises(ConfigError):
        cli.main(["--debug", "train-rnn", "configs/rnn_scratch.yaml", "train.lrr=1"])
