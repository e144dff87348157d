"""`lora-kd-jax evaluate` / `predict` and `lora_kd_jax.commands.evaluation` on tiny trained runs of every kind.

The runs train on the first 256 rows of CoLA's training file (a CoLA dir of their own) but validate on the full
in-domain dev file (527 rows) and report the full out-of-domain one (516), byte-identical copies of the packaged
files: so `evaluate` on the named sets must give back exactly what each run recorded for its best checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_kd_jax.training.restore import open_run
from lora_kd_jax.commands import evaluation
from lora_kd_jax.commands import cli
from lora_kd_jax.runs import rundir
from lora_kd_jax.runs import reader as runs
from lora_kd_jax.data import encode, read_cola_rows

from tiny import NO_PLOTS, XLA_CACHE, COLA_DIR, config_only_run, one_line_exit

REPO = Path(__file__).resolve().parents[1]
LONG = "The " + "very " * 30 + "old cat that the dog that the man owned chased sat on the mat."
SENTENCES = ["The cat sat on the mat.", "Cat the mat on sat.", LONG, "Who do you think that left?"]


@pytest.fixture(scope="module")
def cola(tmp_path_factory) -> Path:
    """A raw-layout CoLA dir: 256 training rows, the packaged dev files unchanged."""
    d = tmp_path_factory.mktemp("cola")
    lines = (COLA_DIR / "in_domain_train.tsv").read_bytes().split(b"\n")
    (d / "in_domain_train.tsv").write_bytes(b"\n".join(lines[:256]) + b"\n")
    for name in ("in_domain_dev.tsv", "out_of_domain_dev.tsv"):
        shutil.copyfile(COLA_DIR / name, d / name)
    return d


def _train(command: str, config: str, run_dir: Path, *overrides: str) -> Path:
    cli.main([command, str(REPO / "configs" / config), *overrides, f"run.dir={run_dir}", XLA_CACHE,
              NO_PLOTS, "--no-progress"])
    rundir.detach_log(run_dir)  # training in this process left its log.txt attached to the root logger
    return run_dir


@pytest.fixture(scope="module")
def lora_run(cola, tmp_path_factory) -> Path:
    """Two epochs (so best and latest can differ), lr 1e-2: far enough from the majority class to predict both."""
    return _train("train-lora", "smoke.yaml", tmp_path_factory.mktemp("runs") / "lora", f"data.dir={cola}",
                  "data.limit=0", "train.lr=1e-2", "train.batch_size=32", "train.eval_batch_size=64",
                  "train.epochs=2", "lora.dropout=0.0")


@pytest.fixture(scope="module")
def distill_run(cola, lora_run, tmp_path_factory) -> Path:
    """A 32/32 student of the LoRA run; last_token pooling with length buckets (the bucketed evaluation path)."""
    return _train("distill", "distil_rnn_gpt2.yaml", tmp_path_factory.mktemp("runs") / "distill",
                  f"distill.teacher={lora_run}", f"data.dir={cola}", "student.embed_dim=32", "student.hidden_dim=32",
                  "student.pooling=last_token", "data.buckets=10,20", "train.batch_size=32", "train.epochs=1")


@pytest.fixture(scope="module")
def rnn_run(cola, tmp_path_factory) -> Path:
    """The baseline as configured: last_step pooling (reads the last padded position), a 32/32 student."""
    return _train("train-rnn", "rnn_scratch.yaml", tmp_path_factory.mktemp("runs") / "rnn", f"data.dir={cola}",
                  "student.embed_dim=32", "student.hidden_dim=32", "train.batch_size=32", "train.eval_batch_size=100",
                  "train.epochs=1")


RUNS = ("lora_run", "distill_run", "rnn_run")
_classifiers: dict = {}


@pytest.fixture
def clf(request):
    """One Predictor per run and module (compiled once)."""
    name = request.param
    if name not in _classifiers:
        _classifiers[name] = evaluation.Predictor.from_run(request.getfixturevalue(name))
    return _classifiers[name]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("clf", RUNS, indirect=True)
def test_evaluate_gives_back_the_runs_recorded_numbers(clf):
    """In-domain: exactly the best val accuracy, MCC and loss of metrics.json; out-of-domain: exactly what the run
    reported at that epoch. Both sets are scored whole (527 and 516 rows), and the model predicts both labels."""
    record = _summary(clf.run.path)
    s = record["summary"]
    inside, outside = clf.evaluate("in_domain"), clf.evaluate("out_of_domain")
    assert (inside.rows, outside.rows) == (527, 516) == (s["data"]["rows_used"]["validation"],
                                                        s["data"]["rows_used"]["out_of_domain"])
    assert (inside.accuracy, inside.mcc, inside.loss) == (s["best_val_accuracy"], s["val_mcc_at_best"],
                                                          s["val_loss_at_best"])
    assert (outside.accuracy, outside.mcc) == (s["out_of_domain_accuracy_at_best"], s["out_of_domain_mcc_at_best"])
    assert inside.truncated == s["data"]["truncated"]["validation"]
    for r in (inside, outside):
        predicted_acceptable = r.confusion["tp"] + r.confusion["fp"]
        assert 0 < predicted_acceptable < r.rows, f"{clf.kind}: a one-class predictor would make this check weak"
        assert sum(r.confusion.values()) == r.rows
        assert sum(v["rows"] for v in r.per_source.values()) == r.rows
        assert sum(v["correct"] for v in r.per_source.values()) == r.confusion["tp"] + r.confusion["tn"]
    assert set(inside.per_source) >= {"gj04", "bc01", "ks08"} and set(outside.per_source) >= {"clc95", "swb04"}
    print(f"{clf.kind}: in-domain acc {inside.accuracy:.4f} mcc {inside.mcc:.4f}, out-of-domain acc "
          f"{outside.accuracy:.4f} mcc {outside.mcc:.4f} (= metrics.json)")


@pytest.mark.parametrize("clf", RUNS, indirect=True)
def test_glue_is_both_dev_sets_together(clf):
    glue, inside, outside = clf.evaluate("glue"), clf.evaluate("in_domain"), clf.evaluate("out_of_domain")
    assert glue.rows == 1043 and glue.files == inside.files + outside.files
    assert {k: glue.confusion[k] for k in glue.confusion} == {
        k: inside.confusion[k] + outside.confusion[k] for k in inside.confusion}
    assert glue.mcc == pytest.approx(evaluation.combined_mcc([inside.confusion, outside.confusion]), abs=1e-12)
    np.testing.assert_allclose(glue.logits, np.concatenate([inside.logits, outside.logits]), atol=1e-5)


@pytest.mark.parametrize("clf", RUNS, indirect=True)
def test_predict_equals_the_evaluate_path(clf):
    """Each sentence's logits from `predict`/`logits` alone equal that sentence's row of `evaluate` (tolerance
    1e-5: the same program, other batch neighbours and, with buckets, another padded length)."""
    report = clf.evaluate("in_domain")
    rows = read_cola_rows(COLA_DIR / "in_domain_dev.tsv")
    picks = [0, 1, 17, 300, 526]
    for i in picks:
        alone = clf.logits([rows.sentences[i]])[0]
        np.testing.assert_allclose(alone, report.logits[i], atol=1e-5, rtol=0)
        (p,) = clf.predict(rows.sentences[i])
        assert p.label_id == int(np.argmax(report.logits[i]))
        z = np.exp(report.logits[i] - report.logits[i].max())
        assert p.probability == pytest.approx(z[p.label_id] / z.sum(), abs=1e-5)
    together = clf.logits([rows.sentences[i] for i in picks])  # several at once: the same rows, in input order
    np.testing.assert_allclose(together, report.logits[picks], atol=1e-5, rtol=0)


@pytest.mark.parametrize("clf", RUNS, indirect=True)
def test_predict_keeps_input_order_and_flags_truncation(clf):
    out = clf.predict(SENTENCES)
    for sentence, together in zip(SENTENCES, out):
        (alone,) = clf.predict(sentence)
        assert (alone.label, alone.truncated) == (together.label, together.truncated)
        assert alone.probability == pytest.approx(together.probability, abs=1e-5)
    assert [p.truncated for p in out] == [False, False, True, False]
    assert all(p.label in ("acceptable", "unacceptable") and 0.5 <= p.probability <= 1 for p in out)


@pytest.mark.parametrize("clf", ["distill_run", "rnn_run"], indirect=True)
def test_students_match_the_flax_student_applied_directly(clf):
    """The student module applied to the whole encoded set at once (no jit, no batching, no buckets) gives the
    same logits (tolerance 1e-5) and the same accuracy on the out-of-domain set."""
    run = open_run(clf.run.path)
    rows = read_cola_rows(COLA_DIR / "out_of_domain_dev.tsv")
    split = encode(rows.sentences, rows.labels, clf.tokenizer, run.config.data.max_length)
    direct = np.asarray(run.model.logits(run.params, split.input_ids, split.attention_mask))
    report = clf.evaluate("out_of_domain")
    np.testing.assert_allclose(report.logits, direct, atol=1e-5, rtol=0)
    assert report.accuracy == float(np.mean(direct.argmax(-1) == rows.labels))
    print(f"{run.kind}: |evaluation - flax apply| = {np.abs(report.logits - direct).max():.1e}")


@pytest.mark.parametrize("clf", ["lora_run"], indirect=True)
def test_lora_out_of_domain_matches_pytorch_on_the_merged_export(clf, tmp_path):
    """The run's `merge` export loaded by PyTorch's GPT2ForSequenceClassification, on the same 516 token sequences:
    logits within 1e-4 of ours and the same accuracy (no prediction is nearer a tie than the logit difference)."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2ForSequenceClassification

    out = tmp_path / "merged"
    cli.main(["merge", str(clf.run.path), str(out)])
    model = GPT2ForSequenceClassification.from_pretrained(str(out)).eval()
    rows = read_cola_rows(COLA_DIR / "out_of_domain_dev.tsv")
    split = encode(rows.sentences, rows.labels, clf.tokenizer, clf.max_length)
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(split.input_ids.astype(np.int64)),
                       attention_mask=torch.from_numpy(split.attention_mask.astype(np.int64))).logits.numpy()
    report = clf.evaluate("out_of_domain")
    err = float(np.abs(theirs - report.logits).max())
    margin = float(np.abs(report.logits[:, 1] - report.logits[:, 0]).min())
    print(f"PyTorch vs evaluate on 516 out-of-domain sentences: max |logit diff| {err:.1e}, smallest margin "
          f"{margin:.1e}")
    assert err < 1e-4 and margin > 2 * err
    assert float(np.mean(theirs.argmax(-1) == rows.labels)) == report.accuracy


def test_latest_checkpoint_gives_back_the_last_epoch(lora_run):
    record = _summary(lora_run)
    last = record["epochs"][-1]
    report = evaluation.Predictor.from_run(lora_run, "latest").evaluate("in_domain")
    assert (report.accuracy, report.mcc) == (last["val"]["accuracy"], last["val"]["mcc"])


def test_a_tsv_file_and_a_limit(rnn_run, tmp_path):
    clf = evaluation.Predictor.from_run(rnn_run)
    full = clf.evaluate("in_domain")
    lines = (COLA_DIR / "in_domain_dev.tsv").read_text().splitlines()[:40]
    path = tmp_path / "mine.tsv"
    path.write_text("\n".join(lines) + "\n")
    mine, cut = clf.evaluate(path), clf.evaluate("in_domain", limit=40)
    assert mine.rows == cut.rows == 40 and mine.name == str(path) and cut.limit == 40
    assert mine.confusion == cut.confusion and mine.per_source == cut.per_source
    np.testing.assert_allclose(mine.logits, full.logits[:40], atol=1e-6)


def test_the_batch_size_changes_no_number(rnn_run):
    default = evaluation.Predictor.from_run(rnn_run).evaluate("out_of_domain")
    odd = evaluation.Predictor.from_run(rnn_run, batch_size=7).evaluate("out_of_domain")
    assert odd.confusion == default.confusion
    np.testing.assert_allclose(odd.logits, default.logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- the commands


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")}


def test_evaluate_command_prints_a_table_and_writes_evaluation_json(rnn_run, capsys):
    cli.main(["evaluate", str(rnn_run)])
    out = capsys.readouterr().out
    s = _summary(rnn_run)["summary"]
    assert "in_domain" in out and "out_of_domain" in out and "(both: glue)" in out and "accuracy per source" in out
    assert f"{s['best_val_accuracy']:.4f}" in out and "gold acceptable" in out
    record = json.loads((rnn_run / "evaluation.json").read_text())
    assert record["kind"] == "rnn" and record["which"] == "best" and record["epoch"] == 1
    assert record["sets"]["in_domain"]["accuracy"] == s["best_val_accuracy"]
    assert record["sets"]["out_of_domain"]["mcc"] == s["out_of_domain_mcc_at_best"]


def test_evaluate_json_goes_to_stdout_and_writes_nothing(distill_run, capsys):
    before = _snapshot(distill_run)
    cli.main(["evaluate", str(distill_run), "--data", "glue", "in_domain", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert list(record["sets"]) == ["glue", "in_domain"] and record["sets"]["glue"]["rows"] == 1043
    assert record["sets"]["in_domain"]["accuracy"] == _summary(distill_run)["summary"]["best_val_accuracy"]
    assert _snapshot(distill_run) == before


def test_predict_command_in_input_order(distill_run, tmp_path, capsys):
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    cli.main(["predict", str(distill_run), "--file", str(path), "--json"])
    got = json.loads(capsys.readouterr().out)
    assert [g["sentence"] for g in got] == SENTENCES and [g["truncated"] for g in got] == [False, False, True, False]
    cli.main(["predict", str(distill_run), *SENTENCES[:2]])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.split()[0] in ("acceptable", "unacceptable") for line in lines)
    assert lines[0].endswith(SENTENCES[0]) and lines[1].endswith(SENTENCES[1])


def test_help_of_evaluate_and_predict(capsys):
    for name in ("evaluate", "predict"):
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0 and f"example: lora-kd-jax {name}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0


# ----------------------------------------------------------------------------------------- bad inputs



@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    rows = (COLA_DIR / "in_domain_dev.tsv").read_text().splitlines()[:2]
    files = {"bad.tsv": "\n".join([*rows, "gj04\t1\tthe third row has three fields"]) + "\n",
             "empty.txt": "", "blank_line.txt": "The cat sat.\n\nThe dog ran.\n", "ok.txt": "The cat sat.\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return {name.replace(".", "_").removesuffix("_txt"): tmp_path / name for name in [*files, "missing.txt"]}


@pytest.mark.parametrize("argv, start", [
    (["evaluate", "{not_a_run}"], "run error: {not_a_run} is not a run directory"),
    (["predict", "{not_a_run}", "The cat sat."], "run error: {not_a_run} is not a run directory"),
    (["evaluate", "/no/such/run"], "run error: /no/such/run does not exist"),
    (["evaluate", "{untrained}"], "run error: {untrained} has no best checkpoint"),
    (["predict", "{untrained}", "The cat sat."], "run error: {untrained} has no best checkpoint"),
    (["predict", "{run}", "The cat sat.", ""], "input error: sentence 2 is empty"),
    (["predict", "{run}", "   "], "input error: sentence 1 is empty"),
    (["predict", "{run}", "--file", "{missing}"], "input error: {missing}: file not found"),
    (["predict", "{run}", "--file", "{empty}"], "input error: {empty}: no sentences"),
    (["predict", "{run}", "--file", "{blank_line}"], "input error: {blank_line}:2: empty line"),
    (["predict", "{run}"], "usage error: no sentences"),
    (["predict", "{run}", "The cat sat.", "--file", "{ok}"], "usage error: give the sentences"),
    (["evaluate", "{run}", "--data", "{bad_tsv}"], "data error: {bad_tsv}:3: missing column"),
    (["evaluate", "{run}", "--data", "in_domain", "{missing}"], "data error: {missing}: file not found"),
    (["evaluate", "{run}", "--data", "in_domian"], "input error: unknown evaluation set 'in_domian'"),
    (["evaluate", "{run}", "--limit", "-1"], "usage error: --limit -1"),
])
def test_bad_inputs_end_in_one_line_and_write_nothing(argv, start, rnn_run, bad_files, tmp_path):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    untrained = config_only_run(rnn_run, tmp_path / "untrained")
    names = {"run": rnn_run, "not_a_run": not_a_run, "untrained": untrained, **bad_files}
    fill = lambda text: text.format(**{k: str(v) for k, v in names.items()})  # noqa: E731
    before = {d: _snapshot(names[d]) for d in ("run", "untrained", "not_a_run")}
    message = one_line_exit(*[fill(a) for a in argv])
    assert message.startswith(fill(start)), message
    assert {d: _snapshot(names[d]) for d in before} == before  # nothing written into any run dir


def test_the_python_api_raises_user_errors(rnn_run, tmp_path):
    clf = evaluation.Predictor.from_run(rnn_run)
    for bad, match in (([], "no sentences"), ([""], "sentence 1 is empty"), (["ok", 3], "sentence 2 is a int"),
                       ("\t", "sentence 1 is empty")):
        with pytest.raises(evaluation.InputError, match=match):
            clf.predict(bad)
    with pytest.raises(evaluation.InputError, match="unknown evaluation set"):
        clf.evaluate("dev")
    with pytest.raises(runs.RunError, match="is not a run directory"):
        evaluation.Predictor.from_run(tmp_path)
    with pytest.raises(runs.RunError, match="has no best checkpoint"):
        evaluation.Predictor.from_run(config_only_run(rnn_run, tmp_path / "untrained"))
