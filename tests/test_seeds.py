"""Many seeds at once (train.seeds): seed k of a seeded run is the single run with train.seed=k, for LoRA,
distillation and the RNN baseline; resume is exact for all seeds; the seed dirs are ordinary runs for evaluate,
predict and export; bad seed lists fail in one line before any compute. (That the frozen base is one argument of
the compiled step, whatever the number of seeds, is measured in tests/test_bench.py.)"""
import json
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from lora_kd_jax.commands import cli
from lora_kd_jax.distill import trainer as distill
from lora_kd_jax.training import loop
from lora_kd_jax.runs import rundir
from lora_kd_jax.runs import reader as runs
from lora_kd_jax.training import finetune
from lora_kd_jax.core.config import ConfigError
from shared_runs import shared_run
from tiny import NO_PLOTS, PLOTTED, XLA_CACHE, assert_resumed, random_batch, sigterm_at_batch, tiny_config

SEEDS = [0, 1, 2]
# 96 rows, batches of 32: 3 steps per epoch, 2 epochs; LoRA dropout on, so each seed's dropout keys matter
COMMON = ("data.limit=96", "train.batch_size=32", "train.epochs=2", "lora.dropout=0.1", "student.embed_dim=64",
          "student.hidden_dim=64")
# the student runs also cut batches to length buckets: seeds whose batches land in different buckets are padded
# to a common length when stacked (exact for last-token pooling)
BUCKETS = ("data.buckets=[12]", "data.group_window=2")
SEEDED = f"train.seeds=[{','.join(map(str, SEEDS))}]"


def history(run_dir: Path) -> list[dict]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())["epochs"]


def assert_same_training(seeded: list[dict], single: list[dict]) -> None:
    """Per-epoch losses within 1e-5 relative; accuracies, MCC and counts identical."""
    assert len(seeded) == len(single)
    for a, b in zip(seeded, single):
        for split in ("train", "val"):
            np.testing.assert_allclose(a[split]["loss"], b[split]["loss"], rtol=1e-5, err_msg=split)
            for m in ("accuracy", "mcc", "count"):
                assert a[split][m] == b[split][m], (split, m)
        for name, m in a.get("reported", {}).items():
            assert m["accuracy"] == b["reported"][name]["accuracy"]


@pytest.fixture(scope="module")
def lora_runs():
    """A 3-seed LoRA run and seeds 1 and 2 alone (built once per session: tests/shared_runs.py; read only), with
    the summaries `train_lora` returned."""
    def build(root):
        seeded = finetune.train_lora(tiny_config(*COMMON, SEEDED, PLOTTED, f"run.dir={root / 'seeded'}"),
                                     progress=False)
        # seeds 1 and 2 alone: a random-init base is shared by the seeds, drawn from the first seed (model.base_seed)
        single = {k: finetune.train_lora(tiny_config(*COMMON, f"train.seed={k}", "model.base_seed=0",
                                                     f"run.dir={root / f'single{k}'}"), progress=False)
                  for k in (1, 2)}
        for d in ("seeded", "single1", "single2"):
            rundir.detach_log(root / d)
        (root / "summaries.json").write_text(json.dumps({"seeded": seeded, "single": single}))

    root = shared_run("seeds_lora", build)
    summaries = json.loads((root / "summaries.json").read_text())
    return root, summaries["seeded"], {int(k): v for k, v in summaries["single"].items()}


@pytest.fixture(scope="module")
def rnn_runs():
    """A 3-seed RNN baseline and seed 1 alone (built once per session: tests/shared_runs.py; read only)."""
    def build(root):
        for name, seeds in (("seeded", SEEDED), ("single1", "train.seed=1")):
            distill.train_rnn(tiny_config(*COMMON, *BUCKETS, seeds, f"run.dir={root / name}"), progress=False)
            rundir.detach_log(root / name)

    return shared_run("seeds_rnn", build)


def test_seed_k_of_a_seeded_lora_run_is_the_single_run_with_that_seed(lora_runs):
    """Seeds 1 and 2 of a 3-seed run, two epochs each (the second starts from the first's adapters, Adam state and
    dropout keys), against the single runs with train.seed=1 and 2."""
    root, seeded, single = lora_runs
    for k in (1, 2):
        assert len(history(root / f"single{k}")) == 2
        assert_same_training(history(root / "seeded" / f"seed_{k}"), history(root / f"single{k}"))
        assert seeded["per_seed"][str(k)]["best_val_accuracy"] == single[k]["best_val_accuracy"]
    # the seeds differ from each other (own adapters, head, dropout and data order)
    losses = {k: history(root / "seeded" / f"seed_{k}")[0]["train"]["loss"] for k in SEEDS}
    assert len(set(losses.values())) == len(SEEDS)


def test_seed_k_of_a_seeded_rnn_run_is_the_single_run_with_that_seed(rnn_runs):
    assert_same_training(history(rnn_runs / "seeded" / "seed_1"), history(rnn_runs / "single1"))


def test_seeded_distillation_gives_student_seed_k_the_teacher_of_seed_k(lora_runs, tmp_path):
    root, _, _ = lora_runs
    teacher = root / "seeded"
    cfg = tiny_config(*COMMON, SEEDED, f"distill.teacher={teacher}", f"run.dir={tmp_path / 'seeded'}")
    summary = distill.distill(cfg, progress=False)
    assert summary["teacher_per_seed"] is True
    single = tiny_config(*COMMON, "train.seed=1", f"distill.teacher={teacher / 'seed_1'}",
                         f"run.dir={tmp_path / 'single1'}")
    distill.distill(single, progress=False)
    assert_same_training(history(tmp_path / "seeded" / "seed_1"), history(tmp_path / "single1"))
    seed_summary = json.loads((tmp_path / "seeded" / "seed_1" / "metrics.json").read_text())["summary"]
    assert seed_summary["teacher"] == str(teacher / "seed_1")


def test_a_seeded_run_writes_one_run_dir_per_seed_and_the_aggregate(lora_runs):
    root, seeded, _ = lora_runs
    run = root / "seeded"
    record = json.loads((run / "metrics.json").read_text())
    assert record["seeds"] == SEEDS and len(record["epochs"]) == 2
    per_seed = {k: json.loads((run / f"seed_{k}" / "metrics.json").read_text())["summary"] for k in SEEDS}
    best = [per_seed[k]["best_val_accuracy"] for k in SEEDS]
    stats = record["summary"]["seed_stats"]["best_val_accuracy"]
    assert stats["mean"] == pytest.approx(np.mean(best)) and stats["std"] == pytest.approx(np.std(best, ddof=1))
    assert (stats["min"], stats["max"]) == (min(best), max(best))
    assert "out_of_domain_accuracy_at_best" in record["summary"]["seed_stats"]
    for name in ("accuracy.png", "loss.png"):
        assert (run / name).stat().st_size > 0 and (run / "seed_0" / name).stat().st_size > 0
    assert not (run / "checkpoints" / "best").exists()  # each seed's best lives in its seed dir
    for k in SEEDS:  # each seed dir is a single run: its own config, best checkpoint and record
        info = runs.inspect_run(run / f"seed_{k}", kind="lora")
        assert info.config.train.seed == k and info.config.train.seeds == [] and info.config.model.base_seed == 0
        assert info.summary["best_epoch"] == per_seed[k]["best_epoch"]


def test_each_seeds_best_checkpoint_scores_its_recorded_best(rnn_runs, capsys):
    """The per-seed best states are kept apart: evaluating seed k's best gives seed k's recorded validation."""
    run = rnn_runs / "seeded"
    cli.main(["evaluate", str(run), "--data", "in_domain", "--limit", "96", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["seeds"] == SEEDS
    for k in SEEDS:
        summary = json.loads((run / f"seed_{k}" / "metrics.json").read_text())["summary"]
        got = record["per_seed"][str(k)]["sets"]["in_domain"]
        assert got["accuracy"] == pytest.approx(summary["best_val_accuracy"], abs=1e-9)
        assert got["mcc"] == pytest.approx(summary["val_mcc_at_best"], abs=1e-9)
    assert not (run / "evaluation.json").exists()  # --json writes nothing
    cli.main(["evaluate", str(run), "--data", "in_domain", "--limit", "96"])  # plain: files and mean ± std
    out = capsys.readouterr().out
    accuracy = []
    for k in SEEDS:
        own = json.loads((run / f"seed_{k}" / "evaluation.json").read_text())["sets"]["in_domain"]
        assert own == record["per_seed"][str(k)]["sets"]["in_domain"]  # each seed's record in its seed dir
        assert f"seed {k}: -> {run / f'seed_{k}' / 'evaluation.json'}" in out
        accuracy.append(100 * own["accuracy"])
    mean, std = np.mean(accuracy), np.std(accuracy, ddof=1)  # computed here, not by the code under test
    assert (f"accuracy {mean:.2f} ± {std:.2f} ({min(accuracy):.2f}–{max(accuracy):.2f})%") in out, out
    assert json.loads((run / "evaluation.json").read_text())["seeds"] == SEEDS


def test_predict_and_export_read_one_seed_and_say_which(rnn_runs, lora_runs, capsys, tmp_path):
    run = rnn_runs / "seeded"
    best = max(SEEDS, key=lambda k: (json.loads((run / f"seed_{k}" / "metrics.json").read_text())
                                     ["summary"]["best_val_accuracy"], -k))
    cli.main(["predict", str(run), "The cat sat on the mat."])
    out = capsys.readouterr()
    assert f"using seed {best} of {run}: the best validation accuracy" in out.err
    cli.main(["predict", str(run), "--seed", "2", "The cat sat on the mat."])
    assert f"using seed 2 of {run}" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--seed 7: .* trained seeds \[0, 1, 2\]; pick one of them"):
        cli.main(["predict", str(run), "--seed", "7", "x"])
    lora = lora_runs[0] / "seeded"
    cli.main(["merge", str(lora), str(tmp_path / "merged"), "--seed", "1"])
    assert (tmp_path / "merged").is_dir() and "using seed 1" in capsys.readouterr().err
    from safetensors.numpy import load_file

    for k in (1, 2):  # export-peft --seed k writes seed k's adapter: the single run's best, tensor for tensor
        cli.main(["export-peft", str(lora), str(tmp_path / f"peft{k}"), "--seed", str(k), "--save-base"])
        assert f"using seed {k} of {lora}" in capsys.readouterr().err
        cli.main(["export-peft", str(lora_runs[0] / f"single{k}"), str(tmp_path / f"peft_single{k}"), "--save-base"])
        ours, single = (load_file(tmp_path / d / "adapter_model.safetensors") for d in (f"peft{k}", f"peft_single{k}"))
        assert ours.keys() == single.keys() and len(ours) > 0
        for name in ours:
            np.testing.assert_allclose(ours[name], single[name], rtol=1e-5, atol=1e-7, err_msg=name)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft1", "peft2"))
    assert any(not np.array_equal(a[n], b[n]) for n in a)  # two seeds, two adapters
    with pytest.raises(runs.RunError, match=r"holds 3 seeds .*seed_0 \(or pass --seed 0\)"):
        runs.inspect_run(lora)


def test_reproduce_tiny_seeds_gives_every_cell_mean_and_spread_and_bands(tmp_path, monkeypatch, capsys):
    """`reproduce --tiny --seeds 0,1` end to end at the smallest size that has a spread over epochs (2 epochs of 2
    steps): each ± cell of results.md against numbers computed here from the seed dirs, and results.png drawn with
    a min–max band per experiment whose edges are the seeds' own per-epoch validation accuracies."""
    import matplotlib.axes

    from lora_kd_jax.runs import plots
    from lora_kd_jax.commands import reproduce
    from lora_kd_jax.core.metrics import matthews

    bands, drawing = [], {"results": False}
    real_fill, real_plot = matplotlib.axes.Axes.fill_between, plots.plot_val_accuracy

    def fill_between(self, x, y1, y2=0, **kwargs):
        if drawing["results"]:
            bands.append((list(x), list(y1), list(y2)))
        return real_fill(self, x, y1, y2, **kwargs)

    def plot_val_accuracy(*args, **kwargs):
        drawing["results"] = True
        bands.clear()  # the last drawing (all five experiments) is the one on disk
        try:
            return real_plot(*args, **kwargs)
        finally:
            drawing["results"] = False

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", fill_between)
    monkeypatch.setattr(plots, "plot_val_accuracy", plot_val_accuracy)
    root = tmp_path / "study"
    cli.main(["reproduce", "--tiny", "--seeds", "0,1", "--no-progress", "data.limit=32", "train.batch_size=16",
              "train.epochs=2", XLA_CACHE, NO_PLOTS, f"run.dir={root}"])
    capsys.readouterr()
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in (root / "results.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [r[0] for r in rows] == [e.label for e in reproduce.EXPERIMENTS]

    def cell(values, scale=100.0):
        a = np.asarray(values, np.float64) * scale
        return f"{a.mean():.2f} ± {a.std(ddof=1):.2f} ({a.min():.2f}–{a.max():.2f})"

    assert len(bands) == len(reproduce.EXPERIMENTS)
    for exp, row, band in zip(reproduce.EXPERIMENTS, rows, bands):
        seed_dirs = [root / exp.name / f"seed_{k}" for k in (0, 1)]
        summaries = [json.loads((d / "metrics.json").read_text())["summary"] for d in seed_dirs]
        assert row[1] == "2"
        assert row[2] == cell([s["best_val_accuracy"] for s in summaries])
        assert row[4] == cell([s["train_accuracy_at_best"] for s in summaries])
        assert row[6] == cell([s["val_mcc_at_best"] for s in summaries])
        glue = []
        for d in seed_dirs:  # both dev sets' confusion counts, from each seed's best checkpoint
            sets = json.loads((d / "evaluation.json").read_text())["sets"]
            glue.append(matthews(*[sum(sets[n]["confusion"][c] for n in ("in_domain", "out_of_domain"))
                                   for c in ("tp", "fp", "tn", "fn")]))
        assert row[9] == cell(glue)
        val = np.array([[h["val"]["accuracy"] for h in history(d)] for d in seed_dirs])
        assert band == ([1, 2], list(val.min(axis=0)), list(val.max(axis=0))), exp.name
    assert (root / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_killed_seeded_run_resumes_to_the_uninterrupted_result(rnn_runs, tmp_path, monkeypatch, caplog):
    """SIGTERM in the middle of the first epoch: a checkpoint of all seeds; --resume ends where the uninterrupted
    run ended, every seed's metrics and final state bit for bit."""
    cfg = tiny_config(*COMMON, *BUCKETS, SEEDED, f"run.dir={tmp_path / 'resumed'}")
    original = loop.prefetch
    monkeypatch.setattr(loop, "prefetch", sigterm_at_batch(loop, 2))
    with pytest.raises(loop.TrainingInterrupted, match="epoch 1, batch 2"):
        distill.train_rnn(cfg, progress=False)
    monkeypatch.setattr(loop, "prefetch", original)
    from lora_kd_jax.runs.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path / "resumed" / "checkpoints", read_only=True, with_best=False)
    _, record, _ = store.restore_latest()
    store.close()
    assert (record["epoch"], record["next_batch"]) == (0, 2)  # a checkpoint in the middle of epoch 1
    caplog.clear()
    with caplog.at_level("INFO", logger="lora_kd_jax.training.loop"):
        distill.train_rnn(cfg, resume=True, progress=False)
    assert "resumed from checkpoint step 2: epoch 1, batch 2" in caplog.messages  # resumed, not restarted
    assert_resumed(caplog.messages, from_step=2, to_step=6)  # 96 rows / 32, 2 epochs
    done = rnn_runs / "seeded"
    for k in SEEDS:
        assert history(tmp_path / "resumed" / f"seed_{k}") == history(done / f"seed_{k}")
    assert history(tmp_path / "resumed") == history(done)

    def latest(run_dir):
        from lora_kd_jax.runs.checkpoint import CheckpointStore

        store = CheckpointStore(run_dir / "checkpoints", read_only=True, with_best=False)
        tree, _, _ = store.restore_latest()
        store.close()
        return traverse_util.flatten_dict(tree["state"]["trainable"])

    a, b = latest(tmp_path / "resumed"), latest(done)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg="/".join(key))


@pytest.mark.parametrize("override, message", [
    ("train.seeds=[1,2,1]", "seed(s) 1 appear more than once"),
    ("train.seeds=[0,-3]", "train.seeds: seeds must be >= 0, got -3"),
    ("train.seed=-1", "train.seed: seeds must be >= 0, got -1"),
    ("model.base_seed=-2", "model.base_seed: must be -1"),
])
def test_bad_seed_lists_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tiny_config(override)


def test_resume_with_another_seed_list_is_refused_before_anything_runs(tmp_path):
    run_dir = tmp_path / "run"
    rundir.prepare(tiny_config(*COMMON, "train.seeds=[0,1]", f"run.dir={run_dir}"))
    with pytest.raises(rundir.RunDirError, match=r"config differs in train.seeds"):
        distill.train_rnn(tiny_config(*COMMON, "train.seeds=[0,2]", f"run.dir={run_dir}"),
                                       resume=True, progress=False)


@pytest.mark.parametrize("student, message", [
    (("train.seeds=[0,1]",), r"trained seeds \[0, 1, 2\], this student trains train.seeds=\[0, 1\]"),
    (("train.seed=1",), r"this student trains one seed \(train.seed=1\).*distill.teacher=.*seed_0"),
    ((SEEDED, "distill.cache_teacher_logits=false"), "cached teacher logits"),
])
def test_a_teacher_with_another_seed_list_is_refused_before_anything_runs(lora_runs, student, message, tmp_path):
    cfg = tiny_config(*COMMON, *student, f"distill.teacher={lora_runs[0] / 'seeded'}", f"run.dir={tmp_path / 'r'}")
    with pytest.raises(runs.RunError, match=message):
        distill.distill(cfg, progress=False)
    assert not (tmp_path / "r").exists()


def test_a_failed_seeded_start_leaves_no_seed_dirs(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(Exception, match="exceeds the 16 training rows"):
        distill.train_rnn(tiny_config("data.limit=16", "train.batch_size=32", SEEDED,
                                                   f"run.dir={run_dir}"), progress=False)
    assert not run_dir.exists()


def test_stacked_batches_pad_to_the_longest_seed():
    from lora_kd_jax.data import PAD_ID, stack_batches

    a, b = random_batch(0, batch=4, length=8), random_batch(1, batch=4, length=12)
    out = stack_batches([a, b])
    assert out["input_ids"].shape == (2, 4, 12) and out["labels"].shape == (2, 4)
    np.testing.assert_array_equal(out["input_ids"][0, :, :8], a["input_ids"])
    assert (out["input_ids"][0, :, 8:] == PAD_ID).all() and (out["attention_mask"][0, :, 8:] == 0).all()
    np.testing.assert_array_equal(out["attention_mask"][1], b["attention_mask"])


def test_import_peft_refuses_a_seed_list():
    from lora_kd_jax.interop import export

    with pytest.raises(export.ExportError, match=r"import-peft writes one run from one adapter; drop train.seeds"):
        export.import_peft("/nonexistent", tiny_config("train.seeds=[0,1]"))
