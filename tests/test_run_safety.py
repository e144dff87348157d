"""Nothing lost, nothing mixed: the run-dir lock, overwrite that starts clean, checkpoint writes that cannot leave
a lie (cut off, corrupted), config that matches what ran, and every user error in one line with nothing left
behind that blocks the corrected rerun."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kd_jax.commands import cli
from lora_kd_jax.runs.checkpoint import CheckpointStore
from test_reliability import assert_same_run
from shared_runs import shared_run
from tiny import NO_PLOTS, XLA_CACHE, assert_resumed, core_install_env, log_messages, one_line_exit

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
FAST = ["data.limit=48", "train.batch_size=16", "lora.dropout=0.1", "train.seed=2", XLA_CACHE, NO_PLOTS,
        "--no-progress"]


def run_cli(*argv: str) -> None:
    cli.main(["train-lora", SMOKE, *FAST, *argv])



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
def reference() -> Path:
    """An uninterrupted 3-epoch run: what every faulted and resumed run must end as (built once per session:
    tests/shared_runs.py; read only). (train.seed=2 in FAST: each epoch is a new best, so best and latest are both
    written at steps 3, 6 and 9 and a fault at step 6 is never the run's first save.)"""
    run = shared_run("run_safety_reference", lambda run: run_cli("train.epochs=3", f"run.dir={run}"))
    accuracy = [h["val"]["accuracy"] for h in json.loads((run / "metrics.json").read_text())["epochs"]]
    assert accuracy == sorted(set(accuracy)) and len(accuracy) == 3  # a new best every epoch
    return run


def assert_resumed_to_the_reference(run: Path, reference: Path, caplog, *, epoch: int, batch: int) -> None:
    """`--resume` continues from the checkpoint the fault left (naming the epoch and batch it starts at: a run that
    started again would not) and ends as the uninterrupted run: every epoch's figures, the final state bit for
    bit, the same best step, whole, and no temporary dir left."""
    caplog.clear()
    with caplog.at_level("INFO", logger="lora_kd_jax.training.loop"):
        run_cli("train.epochs=3", f"run.dir={run}", "--resume")
    step = 3 * (epoch - 1) + batch
    assert f"resumed from checkpoint step {step}: epoch {epoch}, batch {batch}" in caplog.messages
    assert_resumed(caplog.messages, from_step=step, to_step=9)  # 3 epochs of 3 steps
    assert_same_run(run, reference)
    assert not list((run / "checkpoints").rglob("*orbax-checkpoint-tmp*"))
    best = CheckpointStore(run / "checkpoints", read_only=True).restore_best()
    ref_best = CheckpointStore(reference / "checkpoints", read_only=True).restore_best()
    assert best[2] == ref_best[2] == 9  # the same best step, whole


@pytest.fixture
def small_fs(tmp_path):
    """A real 4 MiB file system (tmpfs, mounted as root); skipped where this sandbox may not mount one."""
    mount = tmp_path / "fs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode}): the injected tensorstore "
                    "faults below stand in for it")
    yield mount
    subprocess.run(["umount", "-R", str(mount)], capture_output=True)


@pytest.mark.parametrize("when, how, resumes_at", [
    ("best:6", "fill:24576", (2, 0)),  # Orbax's metadata fits, tensorstore's array writes fail (ValueError)
    ("latest:6", "fill:0", (2, 0)),  # latest's copy of best 6 fails at its first file (OSError); best 6 is on
    # disk, latest 6 is not: the resume from latest 3 writes best 3 back
    ("metrics:2", "fill:0", (3, 0)),  # both checkpoints of epoch 2 are on disk, its metrics.json is not
])
def test_a_real_full_disk_is_one_line_and_resuming_gives_the_uninterrupted_run(when, how, resumes_at, small_fs,
                                                                               reference, caplog):
    """The real failure on a real small file system, filled just before the chosen write of a
    real `train-lora` process: exit 1, stderr holds the log and one line naming the path, no traceback; after
    freeing the space `--resume` continues from the last whole checkpoint to the uninterrupted run."""
    run = small_fs / "run"
    faulted = subprocess.run([sys.executable, str(REPO / "tests" / "disk_fault.py"), str(small_fs), when, how, "--",
                              "train-lora", SMOKE, *FAST, "train.epochs=3", f"run.dir={run}"],
                             capture_output=True, text=True, timeout=300,
                             env=core_install_env(never=["matplotlib"]))  # run.plots=false draws nothing
    target, _, step = when.partition(":")
    path = run / "metrics.json" if target == "metrics" else run / "checkpoints" / target / step
    assert faulted.returncode == 1, faulted.stderr[-3000:]
    assert "Traceback" not in faulted.stderr and "Logging error" not in faulted.stderr, faulted.stderr[-3000:]
    not_log = [line for line in faulted.stderr.splitlines() if "INFO" not in line]
    assert not_log == [f"disk_fault: {how} before {when}", f"file system error: {path}: No space left on device"], not_log
    (small_fs / "filler").unlink()
    assert_resumed_to_the_reference(run, reference, caplog, epoch=resumes_at[0], batch=resumes_at[1])


class _TensorstoreFault:
    """Orbax's handle on tensorstore with `open` failing for the arrays of one checkpoint step, raising what
    tensorstore raises for an OS error: ValueError, the status name, the file, strerror and the errno payload."""
    STATUS = {errno.ENOSPC: "RESOURCE_EXHAUSTED", errno.EDQUOT: "RESOURCE_EXHAUSTED", errno.EROFS: "PERMISSION_DENIED",
              errno.EACCES: "PERMISSION_DENIED", errno.EIO: "UNKNOWN"}

    def __init__(self, real, where: str, code: int):
        self.real, self.where, self.code, self.raised = real, where, code, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    async def open(self, spec, *args, **kwargs):
        text = json.dumps(spec.to_json()) if hasattr(spec, "to_json") else str(spec)
        if kwargs.get("create") and self.where in text:
            self.raised += 1
            file = f"{self.where}orbax-checkpoint-tmp/state/ocdbt.process_0/d/0"
            raise ValueError(f'{self.STATUS[self.code]}: Error opening "zarr" driver: Error writing local file "{file}": '
                             f"Failed to write 174 bytes to file 6: {os.strerror(self.code)} "
                             f"[os_error_code='{self.code}']")
        return await self.real.open(spec, *args, **kwargs)


def _fail_tensorstore(monkeypatch, where: str, code: int) -> _TensorstoreFault:
    from orbax.checkpoint._src.serialization import serialization

    fault = _TensorstoreFault(serialization.ts, where, code)
    monkeypatch.setattr(serialization, "ts", fault)
    return fault


def test_tensorstore_failing_a_save_is_one_line_and_resuming_gives_the_uninterrupted_run(reference, tmp_path,
                                                                                         monkeypatch, caplog, capfd):
    """Where no small file system can be mounted: tensorstore's own exception (ValueError: RESOURCE_EXHAUSTED ...
    [os_error_code='28']) raised at its write of step 6's arrays, in process. (Step 6 is a new best: best is the
    Orbax save, latest a copy of it, whose full disk the real-file-system test above meets.)"""
    faulty, which = tmp_path / "faulty", "best"
    with monkeypatch.context() as m:
        fault = _fail_tensorstore(m, f"/{which}/6.", errno.ENOSPC)
        message = one_line_exit("train-lora", SMOKE, *FAST, "train.epochs=3", f"run.dir={faulty}")
    assert fault.raised >= 1
    assert message == f"file system error: {faulty / 'checkpoints' / which / '6'}: No space left on device"
    assert "Traceback" not in capfd.readouterr().err
    assert_resumed_to_the_reference(faulty, reference, caplog, epoch=2, batch=0)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO])
def test_every_file_system_error_tensorstore_reports_is_one_line_naming_the_step(code, tmp_path, monkeypatch, capfd):
    """Each errno tensorstore can report at a checkpoint write becomes OSError(errno, strerror, step dir), which
    the command line ends with in one line; the steps written before stay restorable and the step is written once
    the file system is back."""
    import jax.numpy as jnp

    from lora_kd_jax.runs.checkpoint import os_error_code

    store = CheckpointStore(tmp_path / "checkpoints")
    tree = {"w": jnp.arange(3.0)}
    store.save(1, tree, {"epoch": 1}, best=True)
    with monkeypatch.context() as m:
        _fail_tensorstore(m, "/latest/2.", code)
        with pytest.raises(SystemExit) as e, cli.clean_exit():
            store.save(2, {"w": jnp.arange(3.0) + 1}, {"epoch": 2})
    assert e.value.code == f"file system error: {tmp_path / 'checkpoints' / 'latest' / '2'}: {os.strerror(code)}"
    assert os_error_code(e.value.__context__) == code
    assert "Traceback" not in capfd.readouterr().err
    store.clean_unfinished()
    restored, record, step = store.restore_latest()
    assert (step, record["epoch"]) == (1, 1) and list(restored["w"]) == [0.0, 1.0, 2.0]
    store.save(2, {"w": jnp.arange(3.0) + 1}, {"epoch": 2})
    assert store.restore_latest()[2] == 2
    store.close()


def test_a_read_only_run_dir_is_one_line_and_left_as_it_was(reference, tmp_path):
    """--resume into a run dir on a read-only file system (a read-only bind mount of the finished reference run)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    made = subprocess.run(["mount", "--bind", "-o", "ro", str(reference), str(ro)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot bind-mount here ({made.stderr.strip() or made.returncode})")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        before = sorted(str(p.relative_to(ro)) for p in ro.rglob("*"))
        message = one_line_exit("train-lora", SMOKE, *FAST, "train.epochs=4", f"run.dir={ro}", "--resume")
        assert message.startswith(f"file system error: {ro}") and message.endswith("Read-only file system"), message
        assert sorted(str(p.relative_to(ro)) for p in ro.rglob("*")) == before
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_a_corrupted_newest_step_is_moved_aside_and_the_run_finishes_as_uninterrupted(reference, tmp_path):
    damaged = tmp_path / "damaged"
    run_cli("train.epochs=2", f"run.dir={damaged}")
    for f in (damaged / "checkpoints" / "latest" / "6" / "state").rglob("*"):
        if f.is_file() and f.name != "_METADATA":
            f.write_bytes(b"garbage")
    since = (damaged / "log.txt").stat().st_size
    run_cli("train.epochs=3", f"run.dir={damaged}", "--resume")
    assert_resumed(log_messages(damaged, since), from_step=3, to_step=9)  # from the step before the damaged one
    assert_same_run(damaged, reference)
    assert [p.name.split("-")[:2] for p in (damaged / "checkpoints" / "corrupt").iterdir()] == [["latest", "6"]]


# ---------------------------------------------------------------------------------------- config vs reality


def test_model_path_decides_the_architecture(tmp_path):
    from lora_kd_jax.core.config import load_config
    from tiny import save_random_checkpoint

    ckpt = tmp_path / "ckpt"
    save_random_checkpoint(load_config(SMOKE), ckpt)  # 2 layers, 64 wide
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
            from tiny import save_random_checkpoint

            save_random_checkpoint(load_config(SMOKE), ckpt)
            weights = ckpt / "model.safetensors"
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
    caplog.clear()
    with caplog.at_level("INFO"):
        run_cli("train.epochs=2", f"run.dir={run}", "--resume")
    assert "best checkpoint (step 3) was missing; rewritten" in caplog.text
    assert_resumed(caplog.messages, from_step=3, to_step=6)
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    best = CheckpointStore(run / "checkpoints", read_only=True).restore_best()
    assert best[2] == summary["best_epoch"] * 3  # the best the run reports is the best on disk
    assert not list((run / "checkpoints").rglob("*orbax-checkpoint-tmp*"))


def test_a_plot_on_a_full_disk_names_its_file(small_fs):
    """matplotlib's own ENOSPC names no file; the one-line error must say which PNG could not be written."""
    from disk_fault import fill

    from lora_kd_jax.runs import plots

    history = [{"epoch": 1, "train": {"accuracy": 0.5, "loss": 1.0}, "val": {"accuracy": 0.5, "loss": 1.0}}]
    fill(small_fs, 0)
    with pytest.raises(OSError) as e:
        plots.plot_curves(history, small_fs)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(small_fs / "accuracy.png")


def test_after_a_failed_write_the_writes_it_left_unrun_print_nothing():
    """A failed save leaves write coroutines in Orbax's closed event loop that never run; Python prints a
    RuntimeWarning for each when it drops them (seen at random after the real full disk above, at exit). Once a
    write has failed, those warnings are not printed."""
    import warnings

    from lora_kd_jax.runs import checkpoint

    async def write_fragment():  # what Orbax's array write leaves unawaited
        pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_fragment()  # created, never awaited, dropped
        assert [str(w.message) for w in caught] == [
            "coroutine 'test_after_a_failed_write_the_writes_it_left_unrun_print_nothing.<locals>.write_fragment' "
            "was never awaited"]  # the probe: what a user would see
        caught.clear()
        checkpoint._silence_leftovers()  # what a failed write calls
        write_fragment()
        assert [str(w.message) for w in caught] == []


def test_a_bug_raised_while_handling_a_file_error_is_not_called_a_file_system_error():
    """Only an explicit `raise ... from` chain (or the error itself) counts: a TypeError that happens while Orbax
    handles a FileNotFoundError is a bug and keeps its type and traceback."""
    from lora_kd_jax.runs.checkpoint import os_error_code

    try:
        try:
            raise FileNotFoundError(2, "No such file or directory", "/probe")
        except FileNotFoundError:
            raise TypeError("unsupported leaf")
    except TypeError as e:
        assert os_error_code(e) is None
    try:
        raise RuntimeError("write failed") from ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")
    except RuntimeError as e:
        assert os_error_code(e) == errno.ENOSPC
