"""scripts/reproduce_seed.py: the five-run study in --tiny mode end to end, reuse of finished runs, and the configs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_kd_jax.commands import reproduce
from lora_kd_jax.core.config import ConfigError, load_config
from tiny import XLA_CACHE

REPO = Path(__file__).resolve().parents[1]

FAST = ["data.limit=48", "train.epochs=1",  # no data keys: the packaged CoLA and tokenizer
        "train.batch_size=16", XLA_CACHE]
KINDS = {"lora_gpt2": "lora", "lora_gpt2_medium": "lora", "distil_rnn_gpt2": "distill",
         "distil_rnn_gpt2_medium": "distill", "rnn_scratch": "rnn"}


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[1:]]  # without the header


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from lora_kd_jax.commands.cli import main_reproduce

    root = tmp_path_factory.mktemp("study")
    main_reproduce(["--tiny", "--no-progress", *FAST, f"run.dir={root}"])
    return root


def test_tiny_study_writes_results_for_five_runs(study):
    md = (study / "results.md").read_text()
    rows = table_rows(md)
    assert [r[0] for r in rows] == [e.label for e in reproduce.EXPERIMENTS]
    assert "tiny" in md and "79.32%" in md and "69.26%" in md  # mode, reference numbers, reference majority
    for row in rows:
        assert row[2].endswith("%") and 0 <= float(row[2][:-1]) <= 100  # best val accuracy
        assert row[6] != "" and row[10].count("M") == 2  # MCC, trainable / total params
        assert row[7].endswith("%") and -1 <= float(row[8]) <= 1  # out-of-domain accuracy and MCC (packaged data)
        assert -1 <= float(row[9]) <= 1  # GLUE-dev MCC (both dev sets, from the best checkpoint)
    png = (study / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_each_run_has_the_standard_run_dir(study):
    for name, kind in KINDS.items():
        run_dir = study / name
        record = json.loads((run_dir / "metrics.json").read_text())
        assert record["kind"] == kind and len(record["epochs"]) == 1
        for f in ("config.yaml", "accuracy.png", "loss.png", "checkpoints/best", "checkpoints/latest"):
            assert (run_dir / f).exists(), f"{name}/{f}"
    cfg = load_config(study / "distil_rnn_gpt2_medium" / "config.yaml")
    assert Path(cfg.distill.teacher) == study / "lora_gpt2_medium"  # the study's own teacher
    assert (cfg.student.embed_dim, cfg.student.hidden_dim) == (64, 64)
    teacher = load_config(study / "lora_gpt2_medium" / "config.yaml")
    assert (teacher.model.init, teacher.model.n_layer, teacher.model.n_embd) == ("random", 2, 128)
    summary = json.loads((study / "distil_rnn_gpt2" / "metrics.json").read_text())["summary"]
    assert summary["teacher_total_params"] > summary["total_params"]


def test_rerun_reuses_finished_runs(study):
    outcomes = reproduce.run_study([*FAST, f"run.dir={study}"], tiny=True, progress=False)
    assert [o.reused for o in outcomes] == [True] * 5
    assert (study / "results.md").read_text().count("(reused)") == 5


def test_full_study_uses_the_reference_hyperparameters(tmp_path):
    root, plan = reproduce.study_configs([f"run.dir={tmp_path}"])
    got = {e.name: (c.train.epochs, c.train.batch_size, c.train.lr) for e, c in plan}
    assert got == {"lora_gpt2": (10, 128, 1e-3), "lora_gpt2_medium": (7, 128, 1e-3), "distil_rnn_gpt2": (4, 128, 1e-3),
                   "distil_rnn_gpt2_medium": (4, 128, 1e-3), "rnn_scratch": (4, 128, 1e-3)}
    cfgs = {e.name: c for e, c in plan}
    assert cfgs["lora_gpt2"].model.name == "gpt2" and cfgs["lora_gpt2"].model.init == "pretrained"
    assert cfgs["lora_gpt2_medium"].model.name == "gpt2-medium"
    for name in ("distil_rnn_gpt2", "distil_rnn_gpt2_medium", "rnn_scratch"):
        s = cfgs[name].student
        assert (s.vocab_size, s.embed_dim, s.hidden_dim, s.cell, s.pooling) == (50257, 768, 768, "rnn", "last_step")
    assert cfgs["distil_rnn_gpt2"].distill.teacher == str(tmp_path / "lora_gpt2")
    assert (cfgs["distil_rnn_gpt2"].distill.temperature, cfgs["distil_rnn_gpt2"].distill.alpha) == (2.0, 0.0)
    assert all(Path(c.run.dir).parent == tmp_path for c in cfgs.values())
    assert not list(tmp_path.iterdir())  # planning writes nothing


def test_tiny_switch_replaces_the_teachers_and_overrides_reach_every_run():
    _, plan = reproduce.study_configs(["train.epochs=2", "student.cell=gru"], tiny=True)
    cfgs = {e.name: c for e, c in plan}
    assert all(c.train.epochs == 2 for c in cfgs.values())
    assert cfgs["lora_gpt2"].model.init == "random" and cfgs["lora_gpt2"].model.n_embd == 64
    assert cfgs["rnn_scratch"].student.cell == "gru" and cfgs["rnn_scratch"].student.embed_dim == 64
    assert str(cfgs["lora_gpt2"].run.dir).startswith(reproduce.DEFAULT_TINY_ROOT)


def test_a_zoo_student_reaches_the_student_rows_and_names_them():
    _, plan = reproduce.study_configs(["student.arch=cnn", "student.pooling=last_token"], tiny=True)
    rows = {e.name: (e.label, c.student.arch) for e, c in plan}
    assert rows["distil_rnn_gpt2"] == ("Distil CNN, gpt2 teacher", "cnn")
    assert rows["rnn_scratch"] == ("CNN from scratch", "cnn")
    assert rows["lora_gpt2"][0] == "LoRA gpt2, rank 4"
    _, plan = reproduce.study_configs([], tiny=True)  # the study's own rows keep their names
    assert [e.label for e, _ in plan] == [e.label for e in reproduce.EXPERIMENTS]


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "train.lrr"),
    ("student.cell=transformer", "student.cell"),
    ("distill.teacher=/elsewhere", "reproduce sets each teacher itself"),
])
def test_bad_overrides_fail_before_anything_runs(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        reproduce.run_study([override, f"run.dir={tmp_path / 'study'}"], tiny=True, progress=False)
    assert not (tmp_path / "study").exists()


def test_reproduce_cli_reports_config_errors(tmp_path):
    from lora_kd_jax.commands.cli import main_reproduce

    with pytest.raises(SystemExit, match="config error: .*train.lrr"):
        main_reproduce(["--tiny", "train.lrr=1", f"run.dir={tmp_path}"])


@pytest.mark.parametrize("script", ["distill.py", "train_rnn.py", "reproduce_seed.py"])
def test_scripts_are_thin_wrappers_with_help(script):
    path = REPO / "scripts" / script
    code = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert sum(1 for line in code if not line.startswith(('"""', "usage", " "))) <= 4  # import, if, call (+ doc)
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage" in out.stdout
    if script == "reproduce_seed.py":
        assert "--tiny" in out.stdout


def test_table_scores_come_from_the_best_checkpoint(study):
    """In-domain and out-of-domain numbers scored again by `commands.evaluation` are the run's own validation numbers; the
    GLUE-dev MCC is the MCC of both sets' confusion counts summed."""
    from lora_kd_jax.core.metrics import matthews

    rows = table_rows((study / "results.md").read_text())
    for exp, row in zip(reproduce.EXPERIMENTS, rows):
        summary = json.loads((study / exp.name / "metrics.json").read_text())["summary"]
        sets = json.loads((study / exp.name / "evaluation.json").read_text())["sets"]
        assert sets["in_domain"]["rows"] == sets["out_of_domain"]["rows"] == 48  # data.limit=48 cuts both
        assert (sets["in_domain"]["accuracy"], sets["in_domain"]["mcc"]) == (summary["best_val_accuracy"],
                                                                             summary["val_mcc_at_best"])
        assert (sets["out_of_domain"]["accuracy"], sets["out_of_domain"]["mcc"]) == (
            summary["out_of_domain_accuracy_at_best"], summary["out_of_domain_mcc_at_best"])
        both = [sum(sets[s]["confusion"][k] for s in ("in_domain", "out_of_domain")) for k in ("tp", "fp", "tn", "fn")]
        assert sum(both) == 96 and row[9] == f"{matthews(*both):.4f}"
