"""Crashes, signals, corrupted checkpoints and numerical faults: nothing lost, every error clear."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from lora_kd_jax.training import finetune
from lora_kd_jax.runs import rundir
from lora_kd_jax.runs.checkpoint import CheckpointStore
from lora_kd_jax.training.loop import NonFiniteLoss, RunOptions, run_epochs
from shared_runs import shared_run
from tiny import NO_PLOTS, XLA_CACHE, assert_resumed, core_install_env, latest_step, log_messages, tiny_config

REPO = Path(__file__).resolve().parents[1]
POISON = 50000  # a token id whose embedding the NaN tests set to NaN


def final_trainable(run_dir: Path) -> dict:
    store = CheckpointStore(run_dir / "checkpoints", read_only=True)
    tree, record, _ = store.restore_latest()
    return traverse_util.flatten_dict(tree["state"]["trainable"]), record


def assert_same_run(a: Path, b: Path) -> None:
    ma = json.loads((a / "metrics.json").read_text())["epochs"]
    mb = json.loads((b / "metrics.json").read_text())["epochs"]
    assert ma == mb  # every epoch's metrics, bit for bit
    pa, ra = final_trainable(a)
    pb, rb = final_trainable(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg="/".join(k))


def script_args(run_dir: Path, epochs: int) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "train_lora.py"), str(REPO / "configs" / "smoke.yaml"),
            "data.limit=480", "train.batch_size=16",
            f"train.epochs={epochs}", "lora.dropout=0.1", f"run.dir={run_dir}", XLA_CACHE, NO_PLOTS]


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    latest = run_dir / "checkpoints" / "latest"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir()):
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run the interrupted ones must end as (the script's config, trained in-process; built once
    per session: tests/shared_runs.py; read only)."""
    def build(run_dir):
        finetune.train_lora(_smoke_cfg(run_dir, EPOCHS), progress=False)
        rundir.detach_log(run_dir)

    return shared_run("reliability_reference", build)


EPOCHS = 3


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, reference):
    """The real script in a subprocess: SIGKILL after its first epoch's checkpoint (no chance to save), then
    --resume (here, in this process: the same train_lora the script runs)."""
    killed = tmp_path / "killed"
    proc = subprocess.Popen(script_args(killed, EPOCHS), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=core_install_env(never=["matplotlib"]))  # run.plots=false draws nothing
    try:
        wait_for_checkpoint(killed, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    metrics_file = killed / "metrics.json"  # absent if the kill landed between the first save and its metrics
    done = json.loads(metrics_file.read_text())["epochs"] if metrics_file.exists() else []
    assert len(done) < EPOCHS  # it really was interrupted
    from_step, since = latest_step(killed), (killed / "log.txt").stat().st_size
    finetune.train_lora(_smoke_cfg(killed, EPOCHS), resume=True, progress=False)  # --resume, in this process
    rundir.detach_log(killed)
    assert_resumed(log_messages(killed, since), from_step=from_step, to_step=EPOCHS * 30)  # 480 rows / 16
    assert_same_run(killed, reference)


def test_sigterm_saves_mid_epoch_and_resume_gives_the_uninterrupted_result(tmp_path, reference, monkeypatch):
    """SIGTERM during an epoch becomes a checkpoint at the batch reached and one clear message; --resume ends
    where the uninterrupted run ends (tests/test_seeds.py does the same for a seeded run)."""
    from lora_kd_jax.training import loop

    cfg = _smoke_cfg(tmp_path / "stopped", EPOCHS)
    original, seen = loop.prefetch, {"n": 0}

    def interrupting(batches, put=jax.device_put, size=2):
        for batch in original(batches, put, size):
            seen["n"] += 1
            if seen["n"] == 20:  # the 20th of epoch 1's 30 training batches
                signal.raise_signal(signal.SIGTERM)
            yield batch

    monkeypatch.setattr(loop, "prefetch", interrupting)
    with pytest.raises(loop.TrainingInterrupted, match=r"signal 15 at epoch 1, batch 20: .*continue with --resume"):
        finetune.train_lora(cfg, progress=False)
    monkeypatch.setattr(loop, "prefetch", original)
    _, record = final_trainable(tmp_path / "stopped")
    assert record["next_batch"] > 0  # a checkpoint in the middle of an epoch
    assert latest_step(tmp_path / "stopped") == 20
    since = (tmp_path / "stopped" / "log.txt").stat().st_size
    finetune.train_lora(cfg, resume=True, progress=False)
    assert_resumed(log_messages(tmp_path / "stopped", since), from_step=20, to_step=EPOCHS * 30)
    assert_same_run(tmp_path / "stopped", reference)


def _smoke_cfg(run_dir: Path, epochs: int):
    from lora_kd_jax.core.config import load_config
    return load_config(REPO / "configs" / "smoke.yaml", script_args(run_dir, epochs)[3:])


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_step(tmp_path, caplog):
    cfg = tiny_config("data.limit=32", "train.batch_size=16", "train.epochs=2", f"run.dir={tmp_path / 'r'}")
    finetune.train_lora(cfg, progress=False)
    latest = tmp_path / "r" / "checkpoints" / "latest"
    steps = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    for f in (latest / "4" / "state").rglob("*"):  # destroy the newest step's array data
        if f.is_file() and f.name != "_METADATA":
            f.write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        tree, record, step = CheckpointStore(tmp_path / "r" / "checkpoints", read_only=True).restore_latest()
    assert step == 2 and record["epoch"] == 1
    assert "restored step 2 after newer steps failed" in caplog.text


def test_unfinished_checkpoint_write_is_ignored(tmp_path):
    """Orbax writes into a *.orbax-checkpoint-tmp dir and renames it when done: a crash mid-write leaves
    the previous step as the latest one."""
    cfg = tiny_config("data.limit=16", "train.batch_size=16", "train.epochs=1", f"run.dir={tmp_path / 'r'}")
    finetune.train_lora(cfg, progress=False)
    latest = tmp_path / "r" / "checkpoints" / "latest"
    (latest / "7.orbax-checkpoint-tmp-123").mkdir()  # what a write killed half-way leaves
    _, record, step = CheckpointStore(tmp_path / "r" / "checkpoints", read_only=True).restore_latest()
    assert step == 1 and record["epoch"] == 1


def test_a_best_step_is_serialized_once_and_latest_holds_a_whole_copy_of_it(tmp_path, monkeypatch):
    """An epoch that is the best so far costs one Orbax save (to best): latest/<step> is a copy of best's step dir,
    file for file, that restores on its own; latest keeps its newest `keep` steps whichever way a step arrived, and a
    step written again replaces the old one (an epoch redone after a crash)."""
    import shutil

    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    saved, real_save = [], ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        saved.append((Path(self.directory).name, step))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep=2)
    for step, best in ((1, True), (2, False), (3, True), (4, True), (4, True)):
        store.save(step, {"w": jnp.arange(3.0) + step}, {"epoch": step}, best=best)
    store.close()
    assert saved == [("best", 1), ("latest", 2), ("best", 3), ("best", 4), ("best", 4)]
    assert sorted(p.name for p in (root / "latest").iterdir()) == ["3", "4"]
    assert sorted(p.name for p in (root / "best").iterdir()) == ["4"]

    def files(step_dir: Path) -> dict:
        return {str(p.relative_to(step_dir)): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}

    copied = files(root / "latest" / "4")
    assert copied == files(root / "best" / "4") and any(name.startswith("state/") for name in copied), sorted(copied)
    shutil.rmtree(root / "best")  # the copy stands on its own
    for step in (3, 4):
        tree, record, restored = CheckpointStore(root, read_only=True, with_best=False).restore_latest(step=step)
        assert (restored, record["epoch"], list(tree["w"])) == (step, step, [step + 0.0, step + 1.0, step + 2.0])


def _poisoned_task(cfg, bad_rows):
    from test_train import synthetic_split
    splits = {"train": synthetic_split(64, 0), "validation": synthetic_split(32, 1)}
    splits["train"].input_ids[bad_rows, 0] = POISON
    task = finetune.build_task(cfg, splits)
    frozen = task.consts["frozen"]
    wte = frozen["gpt2"]["wte"]["embedding"]
    frozen["gpt2"]["wte"]["embedding"] = wte.at[POISON].set(np.nan)
    task.consts = {**task.consts, "frozen": frozen}
    return task


def test_nan_loss_stops_naming_step_and_epoch(tmp_path):
    cfg = tiny_config("train.batch_size=16", "train.epochs=2", "lora.dropout=0.0", f"run.dir={tmp_path}")
    # shuffle=False order is needed to know the step: use the first batch of epoch 2 via the data order instead
    task = _poisoned_task(cfg, bad_rows=[5])
    order_e0 = [int(i) for b in task.train_batches(0, 0) for i in b["index"]]
    bad_step = order_e0.index(5) // 16
    with pytest.raises(NonFiniteLoss, match=rf"epoch 1: 1 batch\(es\) had a NaN/Inf training loss, the first at step "
                                            rf"{bad_step};.*last good checkpoint"):
        run_epochs(task, tmp_path, progress=False, options=RunOptions.of(cfg))
    assert not (tmp_path / "checkpoints" / "latest").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "checkpoints" / "latest").iterdir())


def test_nan_batches_can_be_skipped(tmp_path):
    cfg = tiny_config("train.batch_size=16", "train.epochs=2", "lora.dropout=0.0", "train.on_nonfinite=skip",
                      f"run.dir={tmp_path}")
    task = _poisoned_task(cfg, bad_rows=[5])
    summary = run_epochs(task, tmp_path, progress=False, options=RunOptions.of(cfg))
    record = json.loads((tmp_path / "metrics.json").read_text())
    for epoch in record["epochs"]:
        assert epoch["train"]["nonfinite"] == 1 and epoch["train"]["count"] == 64 - 16
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(task.state.trainable))
    assert np.isfinite(summary["best_val_accuracy"])


def test_a_whole_step_of_another_layout_is_refused_not_moved_aside(tmp_path):
    """A run dir from another model or optimizer layout (e.g. an older lora_kd_jax) is not corrupt: resuming says
    so in one error and leaves every step where it was (only an unreadable step is moved to corrupt/)."""
    import jax.numpy as jnp

    from lora_kd_jax.runs.checkpoint import CheckpointError

    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(1, {"state": {"a": jnp.ones(3), "b": jnp.ones(2)}}, {"kind": "lora"})
    store.close()
    store = CheckpointStore(tmp_path / "checkpoints")  # writable, as on --resume
    for other in ({"state": {"a": jnp.ones(3)}}, {"state": {"a": jnp.ones(4), "b": jnp.ones(2)}}):
        with pytest.raises(CheckpointError, match=r"step 1 holds a state of another layout.*nothing was moved"):
            store.restore_latest(other)
    store.close()
    assert (tmp_path / "checkpoints" / "latest" / "1").is_dir() and not (tmp_path / "checkpoints" / "corrupt").exists()
