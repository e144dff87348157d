"""The front door (issue 37): what a first user sees. The config reference generated from the config classes,
`lora-kd-jax config` and `--version`, packaged configs by name, runs that remember absolute data paths, the errors
a first user makes (each asserted as printed), a console without library noise, the plots' ticks and legends, help
texts that name every family, and the README's offline quick start run verbatim."""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from lora_kd_jax.assets import COLA_DIR, CONFIGS_DIR
from lora_kd_jax.commands import cli
from lora_kd_jax.commands.settings import load_named, packaged_configs
from lora_kd_jax.core.config import all_keys, reference
from tiny import XLA_CACHE, core_install_env, one_line_exit, user_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_RUN = ("data.limit=16", "train.batch_size=8", "train.epochs=1", XLA_CACHE, "--no-progress")
PACKAGED = ", ".join(packaged_configs())


def _rows(label: str, n: int, skip: int = 0) -> list[str]:
    """n CoLA training sentences with `label`, after the first `skip` of them."""
    out = [line.split("\t") for line in (COLA_DIR / "in_domain_train.tsv").read_text().splitlines()]
    return [f"{r[3]}\t{r[1]}" for r in out if r[1] == label][skip:skip + n]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny LoRA run (the smoke config, 16 rows, one epoch) trained from its own directory on table files named
    by relative paths; shared by the tests that read a finished run."""
    home = tmp_path_factory.mktemp("trained_here")
    (home / "data").mkdir()
    for name, skip in (("train", 0), ("dev", 8)):
        rows = [r for pair in zip(_rows("1", 8, skip), _rows("0", 8, skip)) for r in pair]
        (home / "data" / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    before = os.getcwd()
    os.chdir(home)
    try:
        cli.main(["train-lora", "smoke", "data.train=data/train.tsv", "data.validation=data/dev.tsv",
                  "run.dir=runs/tiny", *TINY_RUN])
    finally:
        os.chdir(before)
    return home / "runs" / "tiny"


# ------------------------------------------------------------------------------- the configuration reference


def test_every_section_and_key_has_a_doc():
    assert reference.undocumented() == []
    assert [k.key for k in reference.key_docs()] == all_keys()


def test_the_docs_page_is_what_the_classes_say_now(capsys):
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == reference.markdown(), f"docs/configuration.md is stale: run `{reference.REGENERATE}`"
    assert f"regenerate with `{reference.REGENERATE}`" in page
    assert "| `model.init` | one of `pretrained`, `random` | `pretrained` | pretrained: load the weights" in page
    assert "| `model.n_layer` | int or null | `null` | Blocks;" in page
    assert "| `student.cnn_widths` | list of int | `[3, 4, 5]` | cnn: the n-gram widths of the filters. |" in page
    cli.main(["config", "--markdown"])
    assert capsys.readouterr().out == page


# ------------------------------------------------------------------------------------ config and --version


def test_config_prints_each_keys_default_resolved_value_origin_and_doc(capsys):
    cli.main(["config", "smoke", "train.lr=3e-4"])
    out = capsys.readouterr().out
    assert out.startswith(f"config: {CONFIGS_DIR / 'smoke.yaml'} + command line (every other "
                          "key: its default)\n")
    assert "\ntrain.lr = 0.0003  [from the command line; default 0.001]\n    Adam's learning rate.\n" in out
    assert "\ntrain.epochs = 2  [from smoke.yaml; default 10]\n    Passes over the training set.\n" in out
    assert "\nmodel.init = random  [from smoke.yaml; default pretrained; one of pretrained, random]\n" in out
    assert "\nlora.alpha = 4.0  [default]\n" in out
    assert len(re.findall(r"^\S+\.\S+ = ", out, re.M)) == len(reference.key_docs())
    cli.main(["config", "smoke", "train.lr=3e-4", "--json"])
    keys = json.loads(capsys.readouterr().out)["keys"]
    assert keys["train.lr"] == {"value": 3e-4, "default": 1e-3, "set_by": "command line", "type": "float",
                                "choices": [], "doc": "Adam's learning rate."}
    assert keys["model.init"]["set_by"].endswith("smoke.yaml") and keys["model.init"]["choices"] == ["pretrained",
                                                                                                     "random"]
    cli.main(["config", "--json", "lora.rank=8"])  # no CONFIG: the defaults and the overrides
    keys = json.loads(capsys.readouterr().out)["keys"]
    assert (keys["lora.rank"]["value"], keys["model.name"]["set_by"]) == (8, "defaults")


def test_version_comes_from_the_installed_package(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"lora-kd-jax {metadata.version('lora_kd_jax')}\n"


# ------------------------------------------------------------------------------- packaged configs by name


def test_a_packaged_config_is_named_without_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_named("smoke").source == str(CONFIGS_DIR / "smoke.yaml")
    for command in ("train-lora", "distill", "train-student", "config"):  # read (and checked) before any compute
        assert one_line_exit(command, "smoke", "lora.rank=0") == "config error: command line: lora.rank: must be > " \
                                                                 "0, got 0"
    (tmp_path / "smoke").write_text("train:\n  epochs: 7\n")  # a file of that name here wins
    assert load_named("smoke").config.train.epochs == 7
    assert one_line_exit("train-lora", "smok") == (
        f"config error: config file not found: smok (from {tmp_path}); give a YAML file's path, or a packaged "
        f"config by name: {PACKAGED}")
    assert one_line_exit("distill", "configs/smoke.yaml").startswith("config error: config file not found: "
                                                                     "configs/smoke.yaml (from ")


def test_the_smoke_configs_row_limit_on_your_own_data_is_said_in_one_line(caplog):
    caplog.set_level(logging.INFO)
    smoke = CONFIGS_DIR / "smoke.yaml"
    cfg = load_named("smoke", ["data.train=mine.tsv", "data.validation=dev.tsv"]).config
    assert cfg.data.limit == 256  # kept, and said
    assert [r.getMessage() for r in caplog.records] == [
        f"data.limit=256 (set by {smoke}) keeps only the first 256 rows of each file of data.train=mine.tsv; pass "
        "data.limit=0 to use every row"]
    caplog.clear()
    load_named("smoke", ["data.train=mine.tsv", "data.validation=dev.tsv", "data.limit=0"])
    load_named("smoke", ["data.limit=100"])
    load_named("smoke")
    assert caplog.records == []


# ------------------------------------------------------------------------------ the errors a first user makes


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1e-4", "unknown config key 'train.learning_rate'; did you mean 'train.lr'?"),
    ("train.num_epochs=3", "unknown config key 'train.num_epochs'; did you mean 'train.epochs'?"),
    ("data.batch_size=8", "unknown config key 'data.batch_size'; did you mean 'train.batch_size'?"),
    ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    ("lr=1e-4", "override 'lr=1e-4': key must look like section.key; did you mean train.lr=1e-4?"),
    ("epochs=3", "override 'epochs=3': key must look like section.key; did you mean train.epochs=3?"),
    ("train.dropout=0.1", "unknown config key 'train.dropout'; did you mean 'model.dropout', 'lora.dropout' or "
                          "'student.dropout'?"),
    ("lora.rank=0", "lora.rank: must be > 0, got 0"),
])
def test_an_override_error_names_the_command_line_and_the_key_meant(override, message):
    assert one_line_exit("train-lora", "smoke", override) == f"config error: command line: {message}"


def test_a_file_error_names_the_file_and_a_mixed_one_both(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("train:\n  learning_rate: 1.0e-4\n")
    assert one_line_exit("train-lora", str(bad)) == (
        f"config error: {bad}: unknown config key 'train.learning_rate'; did you mean 'train.lr'?")
    assert one_line_exit("train-lora", "smoke", "model.n_head=5") == (
        f"config error: {CONFIGS_DIR / 'smoke.yaml'} + command line: model.n_embd (64) must be "
        "divisible by model.n_head (5)")


@pytest.mark.parametrize("argv, meant", [
    (["--epochs", "3"], "--epochs is not an option of train-lora; config keys are set as section.key=value: did "
                        "you mean train.epochs=3?"),
    (["--learning-rate=1e-4"], "--learning-rate is not an option of train-lora; config keys are set as "
                               "section.key=value: did you mean train.lr=1e-4?"),
    (["--batch_size", "8"], "--batch_size is not an option of train-lora; config keys are set as section.key=value: "
                            "did you mean train.batch_size=8?"),
])
def test_a_flag_from_another_trainer_names_the_override_it_means(argv, meant):
    assert one_line_exit("train-lora", "smoke", "train.lr=1e-3", *argv) == f"usage error: {meant}"


def test_a_student_key_of_the_packaged_config_is_dropped_for_another_student(caplog, tmp_path):
    caplog.set_level(logging.INFO)
    cfg = load_named("distil_rnn_gpt2", ["student.arch=bilstm"]).config
    assert (cfg.student.arch, cfg.student.pooling) == ("bilstm", "last_token")
    assert [r.getMessage() for r in caplog.records] == [
        f"{CONFIGS_DIR / 'distil_rnn_gpt2.yaml'} sets student.pooling=last_step, which only the "
        "rnn student reads: dropped for student.arch=bilstm"]
    assert one_line_exit("distill", "distil_rnn_gpt2", "student.arch=bilstm", "student.pooling=last_step") == (
        "config error: command line: student.pooling=last_step with student.arch=bilstm: only the rnn student reads "
        "it (the bilstm student has its own fixed shape); drop it (the value that works: student.pooling=last_token, "
        "its default) or set student.arch=rnn")


def test_bad_rows_are_all_counted_and_named_before_any_model_is_built(tmp_path, monkeypatch):
    from lora_kd_jax.training import finetune

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(finetune, "dry_run", no_model)
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    train.write_text("sentence,label\nfine,pos\n ,neg\nok,pos\nyes,\n,pos\ngood,neg\n")
    dev.write_text("sentence,label\nhm,meh\nsure,pos\n,neg\nno,meh\n")
    message = one_line_exit("train-lora", "smoke", f"data.train={train}", f"data.validation={dev}",
                            f"run.dir={tmp_path / 'run'}", XLA_CACHE)
    assert message == (
        f"data error: 6 bad rows in {train}, {dev} (checked before any model was built): "
        f"{train}:3 (column 'sentence'): empty text; every row needs non-blank text in data.text; "
        f"{train}:5 (column 'label'): empty label; every row needs one; "
        f"{train}:6 (column 'sentence'): empty text; every row needs non-blank text in data.text; "
        f"{dev}:2 (column 'label'): label 'meh' is not in the training label set (neg, pos); "
        f"{dev}:4 (column 'sentence'): empty text; every row needs non-blank text in data.text; "
        "and 1 more; fix or remove them")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------- a run read from any directory


def test_a_run_records_absolute_paths_and_is_evaluated_from_another_directory(tiny_run, tmp_path, monkeypatch,
                                                                              capsys):
    from lora_kd_jax.core.config import load_config
    from lora_kd_jax.data.cola import HUB
    from lora_kd_jax.runs import rundir

    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())["data"]
    home = tiny_run.parent.parent
    assert (saved["train"], saved["validation"]) == (str(home / "data/train.tsv"), str(home / "data/dev.tsv"))
    assert (saved["dir"], saved["tokenizer"]) == ("", "")  # the packaged CoLA and tokenizer stay named as such
    monkeypatch.chdir(tmp_path)
    cli.main(["evaluate", str(tiny_run), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["sets"]["validation"]["files"] == [str(home / "data/dev.tsv")]
    assert record["sets"]["validation"]["rows"] == 16
    cfg = rundir.recorded_config(load_config(None, [
        "model.path=ckpt", "data.dir=cola", "data.tokenizer=gpt2", "data.report=[a.tsv,/x/b.tsv]",
        "distill.teacher=runs/t", "distill.unlabeled=~/u.txt"]))
    assert (cfg.model.path, cfg.data.dir, cfg.data.tokenizer) == (str(tmp_path / "ckpt"), str(tmp_path / "cola"),
                                                                  "gpt2")  # a hub name stays one
    assert cfg.data.report == [str(tmp_path / "a.tsv"), "/x/b.tsv"] and cfg.distill.teacher == str(tmp_path / "runs/t")
    assert cfg.distill.unlabeled == os.path.expanduser("~/u.txt")
    cfg = rundir.recorded_config(load_config(None, ["data.dir=hub", "data.tokenizer=./tok"]))
    assert (cfg.data.dir, cfg.data.tokenizer) == (rundir.HUB, str(tmp_path / "tok"))
    assert rundir.HUB == HUB


# -------------------------------------------------------------------------------------- a quiet console


def test_predict_prints_no_library_noise(tiny_run, tmp_path):
    """`predict` as a user of the core install runs it (JAX probing its backends; no PyTorch, so transformers would
    announce that it found none): stderr holds lora_kd_jax's own log lines and nothing else; and it draws nothing, so
    it never imports matplotlib (made unimportable here: ~0.5 s of every command's start)."""
    env = core_install_env({k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}, never=["matplotlib"])
    done = subprocess.run([str(BIN / "lora-kd-jax"), "predict", str(tiny_run), "The cat sat on the mat."],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r"[01] +0\.\d{4}  The cat sat on the mat\.\n", done.stdout), done.stdout
    for noise in ("Unable to initialize backend", "Resetting cache", "CheckpointManagerOptions", "read only",
                  "save_interval_steps", " jax.", " absl", " orbax", "PyTorch"):
        assert noise not in done.stderr, done.stderr
    ours = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ lora_kd_jax\.[\w.]+: ")
    assert all(ours.match(line) for line in done.stderr.splitlines()), done.stderr


# ------------------------------------------------------------------------------------------------- plots


def _history(best_mcc_epoch: int = 3) -> list[dict]:
    acc = {1: 0.60, 2: 0.70, 3: 0.65}
    return [{"epoch": e, "train": {"accuracy": 0.5 + e / 10, "loss": 1 - e / 10, "lr": 1e-3, "grad_norm": 1.0},
             "val": {"accuracy": acc[e], "mcc": 0.1 * (e == best_mcc_epoch), "loss": 1 - acc[e]},
             "reported": {"out_of_domain": {"accuracy": acc[e] - 0.1, "loss": 1.0}}} for e in (1, 2, 3)]


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]


def _whole_epochs(fig) -> bool:
    return all(float(x).is_integer() for ax in fig.axes for x in ax.get_xticks())


def test_plots_count_whole_epochs_mark_the_best_and_name_every_line(tmp_path):
    import matplotlib.pyplot as plt

    from lora_kd_jax.runs import plots

    figs = plots.curve_figures(_history(), "LoRA")
    assert list(figs) == ["accuracy", "loss"] and all(_whole_epochs(f) for f in figs.values())
    assert _legend(figs["accuracy"]) == ["train", "val", "out-of-domain", "best epoch 2 (val accuracy)"]
    star = figs["loss"].axes[0].get_lines()[-1]
    assert (list(star.get_xdata()), list(star.get_ydata()), star.get_marker()) == ([2], [pytest.approx(0.3)], "*")
    assert _legend(plots.curve_figures(_history(), select="mcc")["accuracy"])[-1] == "best epoch 3 (val mcc)"
    study = plots.val_accuracy_figure({"LoRA gpt2": _history(), "RNN from scratch": _history()[:2]},
                                      {"LoRA gpt2": 0.7006, "RNN from scratch": 0.6913})
    assert _whole_epochs(study) and _legend(study) == [
        "LoRA gpt2", "best epoch (each run)", "LoRA gpt2: reference 0.7006", "RNN from scratch",
        "RNN from scratch: reference 0.6913"]
    assert _whole_epochs(plots.optimizer_figure({"train": _history()}))
    assert _whole_epochs(next(iter(plots.seed_curve_figures({0: _history(), 1: _history()}).values())))
    # a regression draws pearson.png in place of accuracy.png, alone and over seeds (most tests' runs draw no PNG:
    # run.plots=false in tests/tiny.py)
    regression = [{**h, **{s: {"pearson": h[s]["accuracy"], "loss": h[s]["loss"]} for s in ("train", "val")},
                   "reported": {}} for h in _history()]
    assert list(plots.curve_figures(regression)) == list(plots.seed_curve_figures({0: regression})) == [
        "pearson", "loss"]
    assert _legend(plots.curve_figures(regression)["pearson"]) == ["train", "val", "best epoch 2 (val pearson)"]
    plt.close("all")
    written = plots.plot_curves(_history(), tmp_path) + [plots.plot_val_accuracy({"a": _history()}, tmp_path / "r.png")]
    assert [p.name for p in written] == ["accuracy.png", "loss.png", "r.png"] and all(p.is_file() for p in written)


# -------------------------------------------------------------------------- help texts and the description


def test_help_and_the_package_description_cover_the_families_tables_variants_and_students():
    parser, commands = cli.build_parser()
    top = parser.format_help()
    assert " ".join(top.split()).startswith(
        "usage: lora-kd-jax [-h] [--debug] [--version] COMMAND ... LoRA fine-tuning of GPT-2, BERT, RoBERTa, Llama, "
        "Qwen3 and ModernBERT classifiers (LoRA, rsLoRA, DoRA, LoRA+, PiSSA, OLoRA; QLoRA's NF4 or int8 base) on "
        "CoLA, a GLUE task or your own tables (TSV, CSV, "
        "JSONL, Parquet), and knowledge distillation into small students (the study's RNN, a BiLSTM, a CNN, a "
        "smaller transformer), in JAX."), top
    for name, p in commands.items():
        assert "GPT-2 on CoLA" not in p.format_help() and "into the RNN student" not in p.format_help(), name
    for name, words in (("train-lora", "LoRA fine-tuning of a GPT-2, BERT, RoBERTa, Llama, Qwen3 or ModernBERT "
                                       "classifier on CoLA, a GLUE task or your own table files"),
                        ("distill", "into a student: the study's RNN, a BiLSTM, a CNN or a smaller transformer"),
                        ("evaluate", "CoLA's dev sets or any table file")):
        assert words in " ".join(commands[name].format_help().split()), name
    description = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["description"]
    assert all(w in description for w in ("GPT-2", "BERT", "RoBERTa", "Llama", "Qwen3", "ModernBERT", "QLoRA", "tables",
                                          "students")), description


# ------------------------------------------------------------------------------ the README's quick start


def test_the_readme_offline_quick_start_runs_verbatim(tmp_path):
    """Each line of the README's <!-- offline-quickstart --> block, run with bash in an empty directory outside the
    repository, exits 0; the run dirs (run.dir=) and the PEFT exports it names are there afterwards."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- offline-quickstart -->\n```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- offline-quickstart --> block"
    lines = [l for l in block.group(1).replace("\\\n", " ").splitlines() if l.strip() and not l.startswith("#")]
    env = user_env(tmp_path / "home")  # a home of its own whose default XLA cache is the session's
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    work = tmp_path / "work"
    work.mkdir()
    made = []
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        words = shlex.split(line, comments=True)
        made += [work / w.split("=", 1)[1] / "metrics.json" for w in words if w.startswith("run.dir=")]
        if words[1:2] == ["export-peft"]:
            made.append(work / words[3] / "adapter_config.json")
    assert made and all(p.is_file() for p in made), made
