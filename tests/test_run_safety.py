"""Nothing lost, nothing mixed: the run-dir lock, overwrite that starts clean, checkpoint writes that cannot leave
a lie (cut off, corrupted), config that matches what ran, and every user error in one line with nothing left
behind that blocks the corrected rerun."""
from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from lora_kd_jax.commands import cli
from lora_kd_jax.runs.checkpoint import CheckpointStore
from test_reliability import assert_same_run

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
FAST = ["data.limit=48", "train.batch_size=16", "lora.dropout=0.1", "run.compilation_cache=", "--no-progress"]


def run_cli(*argv: str) -> None:
    cli.main(["train-lora", SMOKE, *FAST, *argv])


def one_line_exit(*argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    message = str(e.value.code)
    assert e.value.code not in (0, None) and "\n" not in message and "Traceback" not in message
    return message


# ------------------------------------------------------------------------------------------------- the lock


def test_a_second_run_into_a_locked_dir_stops_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from lora_kd_jax.runs import rundir\nwith rundir.lock(Path(sys.argv[1])):\n"
                               "    print('locked', flush=True); time.sleep(120)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ((), ("run.overwrite=true",)):
            message = one_line_exit("train-lora", SMOKE, *FAST, f"run.dir={run}", *extra)
            assert message.startswith("run dir error: ") and "in use by another run" in message
            assert f"pid {holder.pid}" in message
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run_cli("train.epochs=1", f"run.dir={run}")  # the dead holder's lock is taken over
    assert (run / "metrics.json").is_file()


def test_overwrite_starts_clean_nothing_of_the_old_run_mixes_in(tmp_path):
    run = tmp_path / "run"
    run_cli("train.epochs=2", f"run.dir={run}")
    run_cli("train.epochs=1", "train.lr=0.01", "run.overwrite=true", f"run.dir={run}")
    record = json.loads((run / "metrics.json").read_text())
    assert len(record["epochs"]) == 1
    assert "lr: 0.01" in (run / "config.yaml").read_text()
    for which in ("latest", "best"):
        assert sorted(p.name for p in (run / "checkpoints" / which).iterdir()) == ["3"]  # 48 rows / 16: 3 steps
    assert "epoch 2/2" not in (run / "log.txt").read_text()


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run: what every faulted and resumed run must end as."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_cli("train.epochs=3", f"run.dir={run}")
    return run


def _fail_saves(monkeypatch, *, which: str, at_step: int) -> None:
    """A full disk, injected: the `which` manager's save of `at_step` raises ENOSPC after writing half a step."""
    real = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if Path(self.directory).name == which and step == at_step:
            (Path(self.directory) / f"{step}.orbax-checkpoint-tmp-1").mkdir(parents=True, exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


@pytest.mark.parametrize("which", ["best", "latest"])
def test_a_cut_off_save_is_one_line_and_resuming_gives_the_uninterrupted_run(which, reference, tmp_path,
                                                                              monkeypatch):
    faulty = tmp_path / "faulty"
    best_step = json.loads((reference / "metrics.json").read_text())["summary"]["best_epoch"] * 3
    at_step = best_step if which == "best" else 6  # cut off the best save itself, or epoch 2's latest
    if which == "best" and best_step == 3:
        at_step = 3
    with monkeypatch.context() as m:
        _fail_saves(m, which=which, at_step=at_step)
        message = one_line_exit("train-lora", SMOKE, *FAST, "train.epochs=3", f"run.dir={faulty}")
    assert message.startswith("file system error: ") and "No space left on device" in message
    if (faulty / "config.yaml").exists():  # a checkpoint was written before the fault: continue the run
        run_cli("train.epochs=3", f"run.dir={faulty}", "--resume")
    else:  # the fault hit the first save: nothing was left behind, so the same command starts again
        run_cli("train.epochs=3", f"run.dir={faulty}")
    assert_same_run(faulty, reference)
    assert not list((faulty / "checkpoints").rglob("*orbax-checkpoint-tmp*"))
    best = CheckpointStore(faulty / "checkpoints", read_only=True).restore_best()
    ref_best = CheckpointStore(reference / "checkpoints", read_only=True).restore_best()
    assert best[2] == ref_best[2]  # the same best step, whole


def test_a_corrupted_newest_step_is_moved_aside_and_the_run_finishes_as_uninterrupted(reference, tmp_path):
    damaged = tmp_path / "damaged"
    run_cli("train.epochs=2", f"run.dir={damaged}")
    for f in (damaged / "checkpoints" / "latest" / "6" / "state").rglob("*"):
        if f.is_file() and f.name != "_METADATA":
            f.write_bytes(b"garbage")
    run_cli("train.epochs=3", f"run.dir={damaged}", "--resume")
    assert_same_run(damaged, reference)
    assert [p.name.split("-")[:2] for p in (damaged / "checkpoints" / "corrupt").iterdir()] == [["latest", "6"]]


# ---------------------------------------------------------------------------------------- config vs reality


def test_model_path_decides_the_architecture(tmp_path):
    from lora_kd_jax.core.config import load_config
    from lora_kd_jax.models import gpt2

    ckpt = tmp_path / "ckpt"
    gpt2.save_random_checkpoint(load_config(SMOKE).model, ckpt)  # 2 layers, 64 wide
    path_args = ["model.init=pretrained", f"model.path={ckpt}", "train.epochs=1"]
    message = one_line_exit("train-lora", SMOKE, *FAST, *path_args, "model.n_layer=4", "model.n_embd=128",
                            f"run.dir={tmp_path / 'bad'}")
    assert message.startswith("model error: model.n_layer=4, but the checkpoint") and "n_layer=2" in message
    assert not (tmp_path / "bad").exists()
    message = one_line_exit("train-lora", SMOKE, *FAST, f"model.path={ckpt}", f"run.dir={tmp_path / 'bad'}")
    assert message.startswith("config error: ") and "model.init=random" in message
    run = tmp_path / "run"
    cli.main(["train-lora", SMOKE, *FAST, *path_args, "model.name=gpt2", "model.n_layer=null", "model.n_embd=null",
              "model.n_head=null", f"run.dir={run}"])
    stored = load_config(run / "config.yaml").model
    assert (stored.n_layer, stored.n_embd, stored.n_head) == (2, 64, 4)  # what ran, not gpt2's 12/768/12
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    assert summary["total_params"] < 5_000_000


# --------------------------------------------------------------------------------------- one line, no debris


def _write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


@pytest.mark.parametrize("case", [
    "max_length", "lr_nan", "batch_vs_data", "empty_config", "list_config", "dir_config", "nul_byte", "run_dir_file",
    "lora_target", "model_path_file", "model_path_empty", "model_path_truncated", "tokenizer_empty_dir",
    "tokenizer_cut_vocab", "tokenizer_missing", "data_missing",
])
def test_every_user_error_is_one_line_and_leaves_nothing_behind(case, tmp_path):
    from lora_kd_jax.assets import COLA_DIR, TOKENIZER_DIR

    run = tmp_path / "run"
    config, extra, expect = SMOKE, [], ""
    if case == "max_length":
        extra, expect = ["data.max_length=2000"], "config error: .*data.max_length=2000 exceeds"
    elif case == "lr_nan":
        extra, expect = ["train.lr=.nan"], "config error: .*train.lr: must be a finite number"
    elif case == "batch_vs_data":
        extra, expect = ["train.batch_size=100000"], "data error: train.batch_size=100000 exceeds the 48 training rows"
    elif case == "empty_config":
        config, expect = _write(tmp_path / "empty.yaml", ""), "config error: .*empty.yaml is empty"
    elif case == "list_config":
        config, expect = _write(tmp_path / "list.yaml", "- a\n- b\n"), "config error: .*expected a mapping"
    elif case == "dir_config":
        config, expect = str(tmp_path), "config error: .* is a directory"
    elif case == "nul_byte":
        d = tmp_path / "cola"
        for name in ("in_domain_train.tsv", "in_domain_dev.tsv"):
            _write(d / name, (COLA_DIR / name).read_bytes())
        _write(d / "in_domain_dev.tsv", "gj04\t1\t\tThe cat\x00 sat.\n" * 60)
        extra, expect = [f"data.dir={d}"], r"data error: .*in_domain_dev.tsv:1: NUL byte"
    elif case == "run_dir_file":
        _write(run, "not a dir")
        expect = "run dir error: run.dir=.* is a file"
    elif case == "lora_target":
        extra, expect = ["lora.targets=attn.c_nope"], "config error: .*attn.c_nope"
    elif case in ("model_path_file", "model_path_empty", "model_path_truncated"):
        ckpt = tmp_path / "ckpt"
        if case == "model_path_file":
            _write(ckpt, "x")
        elif case == "model_path_empty":
            ckpt.mkdir()
        else:
            from lora_kd_jax.core.config import load_config
            from lora_kd_jax.models import gpt2

            gpt2.save_random_checkpoint(load_config(SMOKE).model, ckpt)
            weights = ckpt / "flax_model.msgpack"
            weights.write_bytes(weights.read_bytes()[:1000])
        extra, expect = ["model.init=pretrained", f"model.path={ckpt}"], f"model error: .*{ckpt}"
    elif case == "tokenizer_empty_dir":
        (tmp_path / "tok").mkdir()
        extra, expect = [f"data.tokenizer={tmp_path / 'tok'}"], "data error: .*no tokenizer files"
    elif case == "tokenizer_cut_vocab":
        _write(tmp_path / "tok" / "vocab.json", (TOKENIZER_DIR / "vocab.json").read_bytes()[:5000])
        _write(tmp_path / "tok" / "merges.txt", (TOKENIZER_DIR / "merges.txt").read_bytes())
        extra, expect = [f"data.tokenizer={tmp_path / 'tok'}"], "data error: .*vocab.json"
    elif case == "tokenizer_missing":
        extra, expect = [f"data.tokenizer={tmp_path / 'no_tok'}"], "data error: .*no_tok: no such directory"
    elif case == "data_missing":
        extra, expect = [f"data.dir={tmp_path / 'no_data'}"], "data error: .*no_data: not a directory"
    before = sorted(p.name for p in tmp_path.iterdir())
    message = one_line_exit("train-lora", config, *FAST, "train.epochs=1", f"run.dir={run}", *extra)
    import re

    assert re.match(expect, message), message
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before, "a failed start leaves nothing behind"  # (run_dir_file: the file was there before)


def test_an_unfinished_teacher_is_used_with_a_warning(tmp_path, caplog):
    from lora_kd_jax.distill.teacher import check_teacher
    from lora_kd_jax.core.config import load_config

    teacher = tmp_path / "teacher"
    run_cli("train.epochs=1", f"run.dir={teacher}")
    record = json.loads((teacher / "metrics.json").read_text())
    cfg_text = (teacher / "config.yaml").read_text().replace("epochs: 1", "epochs: 6")
    (teacher / "config.yaml").write_text(cfg_text)  # as if it had been stopped after 1 of 6 epochs
    assert len(record["epochs"]) == 1
    with caplog.at_level("WARNING"):
        check_teacher(str(teacher), load_config(REPO / "configs" / "distil_rnn_gpt2.yaml"))
    assert "finished 1 of its 6 epochs" in caplog.text


def test_a_missing_best_of_the_latest_step_is_rewritten_on_resume(tmp_path, caplog):
    """A run dir where `best` lost its newest step (a save cut off by an older version, or a hand deletion) while
    `latest` holds that state: resuming writes it back rather than reporting a best that is not on disk."""
    import shutil

    run = tmp_path / "run"
    run_cli("train.epochs=1", f"run.dir={run}")
    shutil.rmtree(run / "checkpoints" / "best" / "3")
    (run / "checkpoints" / "best" / "3.orbax-checkpoint-tmp-9").mkdir()  # what the cut-off save left
    with caplog.at_level("WARNING"):
        run_cli("train.epochs=2", f"run.dir={run}", "--resume")
    assert "best checkpoint (step 3) was missing; rewritten" in caplog.text
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    best = CheckpointStore(run / "checkpoints", read_only=True).restore_best()
    assert best[2] == summary["best_epoch"] * 3  # the best the run reports is the best on disk
    assert not list((run / "checkpoints").rglob("*orbax-checkpoint-tmp*"))
