"""The training kit around the loop: early stopping (train.patience, train.max_steps) that a resume remembers, the
learning rate and gradient norm per epoch in metrics.json, TensorBoard event files read back by tensorboard's own
reader, the --profile trace, plots when due (run.plots), W&B refused in one line when it is not installed."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from lora_kd_jax.distill import trainer as distill
from lora_kd_jax.runs import rundir
from lora_kd_jax.runs.tensorboard import read_scalars
from lora_kd_jax.training import finetune
from shared_runs import shared_run
from tiny import PLOTTED, assert_resumed, log_messages, tiny_config

# the RNN baseline at its smallest: 32 rows in batches of 16 (2 steps an epoch); a rate too small to change a
# prediction, so the first epoch stays the best and every later one counts against the patience
STALL = ("data.limit=32", "train.batch_size=16", "train.lr=1e-9", "student.embed_dim=16", "student.hidden_dim=16")


def metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.mark.parametrize("seeds", [[], [0, 1]])
def test_patience_stops_after_that_many_epochs_without_a_better_score(seeds, tmp_path, caplog):
    """Best at epoch 1, then epochs 2, 3, 4 without a better one: stopped after epoch 4 of 8 (a seeded run when
    every seed has run out, here all at once)."""
    with caplog.at_level("INFO", logger="lora_kd_jax.training.loop"):
        summary = distill.train_rnn(tiny_config(*STALL, "train.epochs=8", "train.patience=3", f"train.seeds={seeds}",
                                                f"run.dir={tmp_path}"), progress=False)
    who = "every seed's" if seeds else "the"
    message = f"train.patience=3: {who} validation accuracy has not improved for 3 epoch(s)"
    for lane in [tmp_path / f"seed_{k}" for k in seeds] or [tmp_path]:
        record = metrics(lane)
        assert [e["val"]["accuracy"] for e in record["epochs"]] == [record["epochs"][0]["val"]["accuracy"]] * 4
        assert record["summary"]["epochs_run"] == 4
        assert record["summary"]["stopped"] == {"reason": "patience", "epoch": 4, "step": 8, "message": message}
    assert summary["stopped"]["epoch"] == 4
    assert f"early stop after epoch 4 of 8: {message}" in caplog.messages


def test_patience_counts_from_each_new_best_and_waits_for_every_seed(tmp_path, monkeypatch):
    """Which epochs improve is scripted (the loop's `selection.improves`, per lane in turn), the counting is the
    loop's own. One run: a best at epochs 1 and 3 resets the count, so patience 2 stops after epoch 5 (a count
    that ignored the new best would stop after 4). Two seeds: seed 1 improves every epoch, so the run goes on to
    the end although seed 0 ran out after epoch 3 (any seed out, rather than every seed, would stop there)."""
    from lora_kd_jax.training import loop

    def scripted(lanes: list[list[bool]]):
        calls = iter(flag for epoch in zip(*lanes) for flag in epoch)  # epoch by epoch, lane by lane
        monkeypatch.setattr(loop.selection, "improves", lambda *args: next(calls))

    scripted([[True, False, True, False, False, True]])
    one = distill.train_rnn(tiny_config(*STALL, "train.epochs=6", "train.patience=2", f"run.dir={tmp_path / 'one'}"),
                            progress=False)
    assert one["stopped"]["reason"] == "patience" and one["stopped"]["epoch"] == 5
    scripted([[True, False, False, False], [True, True, True, True]])
    two = distill.train_rnn(tiny_config(*STALL, "train.epochs=4", "train.patience=2", "train.seeds=[0,1]",
                                        f"run.dir={tmp_path / 'two'}"), progress=False)
    assert "stopped" not in two or two["stopped"] is None
    assert [len(metrics(tmp_path / "two" / f"seed_{k}")["epochs"]) for k in (0, 1)] == [4, 4]


def test_a_resumed_run_continues_the_patience_count_and_a_stopped_run_stays_stopped(tmp_path, caplog):
    """Two epochs (one without improvement), then --resume with more epochs: one epoch of patience was used
    already, so the run stops after epoch 4 as the uninterrupted run does (a count restarted at the resume would
    run to epoch 5). A second --resume trains nothing."""
    distill.train_rnn(tiny_config(*STALL, "train.epochs=2", "train.patience=3", f"run.dir={tmp_path}"),
                      progress=False)
    longer = tiny_config(*STALL, "train.epochs=8", "train.patience=3", f"run.dir={tmp_path}")
    since = (tmp_path / "log.txt").stat().st_size
    distill.train_rnn(longer, resume=True, progress=False)
    assert_resumed(log_messages(tmp_path, since), from_step=4, to_step=8)  # epochs 3 and 4, 2 steps each
    assert metrics(tmp_path)["summary"]["stopped"]["epoch"] == 4
    assert len(metrics(tmp_path)["epochs"]) == 4
    with caplog.at_level("INFO", logger="lora_kd_jax.training.loop"):
        again = distill.train_rnn(longer, resume=True, progress=False)
    assert again["epochs_run"] == 4 and again["stopped"]["reason"] == "patience"
    assert any(m.startswith("the run had stopped at epoch 4") for m in caplog.messages)


def test_max_steps_stops_mid_epoch_and_the_schedule_spans_those_steps(tmp_path):
    """3 steps of 2-step epochs: the second epoch is scored on its one step; a linear decay reaches 0 at step 3."""
    summary = distill.train_rnn(tiny_config(*STALL, "train.lr=1e-3", "train.epochs=5", "train.max_steps=3",
                                            "train.schedule=linear", f"run.dir={tmp_path}"), progress=False)
    record = metrics(tmp_path)
    assert [e["train"]["count"] for e in record["epochs"]] == [32, 16]
    assert summary["stopped"] == {"reason": "max_steps", "epoch": 2, "step": 3,
                                  "message": "train.max_steps=3 reached at step 3"}
    # the last step (the third) used the rate of optax's linear schedule over 3 steps at count 2: lr * 1/3
    assert record["epochs"][-1]["train"]["lr"] == pytest.approx(1e-3 / 3, rel=1e-6)


@pytest.fixture(scope="module")
def lora_run():
    """3 epochs of 2 steps, a linear decay after one warm-up step, each batch as 2 micro-batches, 2 steps
    profiled (built once per session: tests/shared_runs.py; read only)."""
    def build(run_dir):
        cfg = tiny_config("data.limit=32", "train.batch_size=16", "train.epochs=3", "train.schedule=linear",
                          "train.warmup=1", "train.accumulate=2", PLOTTED, f"run.dir={run_dir}")
        finetune.train_lora(cfg, progress=False, profile=2)
        rundir.detach_log(run_dir)

    return shared_run("training_kit_lora", build)


def test_tensorboard_holds_every_step_and_every_epoch_metric(lora_run):
    scalars = read_scalars(lora_run)
    history = metrics(lora_run)["epochs"]
    for tag in ("step/loss", "step/lr", "step/grad_norm", "step/time_s"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4, 5, 6], tag
    # the rate of each update: warm-up 0 at the first, then linear from 1e-3 to 0 over the 5 steps after it
    np.testing.assert_allclose([v for _, v in scalars["step/lr"]], [0, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4], rtol=1e-6,
                               atol=1e-12)
    losses = [v for _, v in scalars["step/loss"]]
    for e, entry in enumerate(history):  # the epoch's loss is its two (full) batches' mean
        assert entry["train"]["loss"] == pytest.approx(np.mean(losses[2 * e:2 * e + 2]), rel=1e-6)
        norms = [v for _, v in scalars["step/grad_norm"]][2 * e:2 * e + 2]
        assert entry["train"]["grad_norm"] == pytest.approx(np.mean(norms), rel=1e-6)
        assert entry["train"]["lr"] == pytest.approx(scalars["step/lr"][2 * e + 1][1], rel=1e-6, abs=1e-12)
    for split in ("train", "val", "out_of_domain"):
        for metric in ("loss", "accuracy", "mcc", "f1", "macro_f1"):  # every metric metrics.json holds
            got = scalars[f"epoch/{split}/{metric}"]
            assert [s for s, _ in got] == [2, 4, 6]
            want = [(h["reported"][split] if split == "out_of_domain" else h[split])[metric] for h in history]
            np.testing.assert_allclose([v for _, v in got], want, rtol=1e-6)
    assert all(math.isfinite(v) and v > 0 for _, v in scalars["step/grad_norm"])
    assert (lora_run / "optimizer.png").is_file()


def test_the_profile_trace_is_written(lora_run):
    traces = [p for p in (lora_run / "profile").rglob("*") if p.is_file()]
    assert traces and all(p.stat().st_size > 0 for p in traces)
    assert any(p.name.endswith(".xplane.pb") for p in traces)


def test_a_seeded_run_writes_each_seed_and_the_mean(tmp_path):
    distill.train_rnn(tiny_config(*STALL, "train.lr=1e-3", "train.epochs=1", "train.seeds=[0,1]",
                                  f"run.dir={tmp_path}"), progress=False)
    scalars = read_scalars(tmp_path)
    for tag in ("step/loss", "step/grad_norm", "epoch/val/accuracy", "epoch/train/grad_norm"):
        seeds = [scalars[f"{tag}/seed_{k}"][-1][1] for k in (0, 1)]
        assert scalars[f"{tag}/mean"][-1][1] == pytest.approx(np.mean(seeds), rel=1e-6), tag
    for k in (0, 1):
        entry = metrics(tmp_path / f"seed_{k}")["epochs"][0]
        assert scalars[f"epoch/val/accuracy/seed_{k}"][0][1] == pytest.approx(entry["val"]["accuracy"])
        assert scalars[f"epoch/train/grad_norm/seed_{k}"][0][1] == pytest.approx(entry["train"]["grad_norm"])
    assert scalars["step/loss/seed_0"] != scalars["step/loss/seed_1"]


@pytest.mark.parametrize("plots, interval, drawn", [
    ("false", 0.0, 0),  # run.plots=false: never, whatever the clock
    ("true", 1e9, 1),  # epochs faster than the interval: once, at the end of the run
    ("true", 0.0, 3),  # the interval passed at each epoch's end (2 epochs), then the end of the run
])
def test_plots_are_drawn_when_due_and_never_with_run_plots_false(plots, interval, drawn, tmp_path, monkeypatch):
    from lora_kd_jax.runs import plots as plots_lib
    from lora_kd_jax.training import loop

    calls = []
    real = plots_lib.plot_curves
    monkeypatch.setattr(plots_lib, "plot_curves", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(loop, "PLOT_INTERVAL_S", interval)
    distill.train_rnn(tiny_config(*STALL, "train.epochs=2", f"run.plots={plots}", f"run.dir={tmp_path}"),
                      progress=False)
    assert len(calls) == drawn
    assert sorted(p.name for p in tmp_path.glob("*.png")) == (["accuracy.png", "loss.png", "optimizer.png"]
                                                              if drawn else [])
    assert len(metrics(tmp_path)["epochs"]) == 2


def test_wandb_without_the_package_is_one_line_before_any_compute(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: the message for its absence cannot be shown")
    from lora_kd_jax.runs.tensorboard import WandbMissing

    with pytest.raises(WandbMissing, match=r"run\.wandb=proj: the wandb package is not installed"):
        distill.train_rnn(tiny_config(*STALL, "run.wandb=proj", f"run.dir={tmp_path / 'r'}"), progress=False)
    assert not (tmp_path / "r").exists()


def test_with_run_wandb_every_scalar_also_goes_to_wandb(tmp_path, monkeypatch):
    """The W&B wiring, against a stand-in module (wandb itself is not installed here): the run is named after the
    run dir and keeps its files there, and each scalar arrives with its step."""
    import importlib.machinery
    import sys
    import types

    from lora_kd_jax.runs.tensorboard import EventLog

    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    events = EventLog(tmp_path, seeds=[3, 4], wandb_project="proj", config={"train": {"lr": 1e-3}})
    events.lanes("epoch/val/accuracy", [0.5, 0.7], step=6)
    events.close()
    assert calls == [("init", {"project": "proj", "name": tmp_path.name, "dir": str(tmp_path),
                               "config": {"train": {"lr": 1e-3}}}),
                     ("log", {"epoch/val/accuracy/seed_3": 0.5, "epoch/val/accuracy/seed_4": 0.7,
                              "epoch/val/accuracy/mean": pytest.approx(0.6)}, 6), ("finish",)]
    assert read_scalars(tmp_path)["epoch/val/accuracy/mean"] == [(6, pytest.approx(0.6))]


def test_the_bench_profiles_its_steps_after_the_timed_ones(tmp_path):
    from lora_kd_jax.commands import bench

    args = bench.BenchArgs(variants=["tiny"], modes=["fp32"], benches=["distill_step_cached"], batch=4, seq=16,
                           steps=1, warmup=0, profile=2, profile_dir=str(tmp_path))
    bench.run(args)
    traces = list(tmp_path.rglob("*.xplane.pb"))
    assert traces and all(p.stat().st_size > 0 for p in traces)
    assert {p.relative_to(tmp_path).parts[0] for p in traces} == {"distill_step_cached_tiny_fp32_auto"}


def test_a_negative_profile_is_refused():
    from lora_kd_jax.commands.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train-rnn", "configs/smoke.yaml", "--profile", "-2"])
    assert e.value.code == 2
