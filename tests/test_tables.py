"""Your own data: table files of every format and shape, trained on, evaluated, exported; labels, pairs, metrics.

Each shape writes a dozen rows of its own (SST-2-style TSV with a header, CSV with three string labels, JSONL
sentence pairs, STS-B-style regression); one tiny LoRA run per shape (module-scoped, two epochs of three steps)
serves every check on it.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from lora_kd_jax.models.tokenizers import tokenizer_for
from lora_kd_jax import data as data_lib
from lora_kd_jax.commands import cli, evaluation
from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.core import selection
from lora_kd_jax.core.config import ConfigError, load_config
from lora_kd_jax.data.tasks import GLUE
from lora_kd_jax.runs import rundir

from tiny import NO_PLOTS, XLA_CACHE

REPO = Path(__file__).resolve().parents[1]
WORDS = "the cat dog sat ran on mat quickly a big small red blue happy sad old man saw bird house".split()


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))).capitalize() + "."


def _write(path: Path, rows: list[dict], fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",",
                               quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL, escapechar="\\")
            w.writeheader()
            w.writerows(rows)
    return path


def _rows(shape: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if shape == "sst2":
            out.append({"sentence": _sentence(rng), "label": int(i % 2)})
        elif shape == "three":
            out.append({"text": _sentence(rng) + (", with a comma" if i == 0 else ""),
                        "label": ("neg", "neu", "pos")[i % 3]})
        elif shape == "pairs":
            out.append({"premise": _sentence(rng), "hypothesis": _sentence(rng),
                        "label": ("entailment", "contradiction")[i % 2]})
        else:  # stsb
            out.append({"sentence1": _sentence(rng), "sentence2": _sentence(rng),
                        "score": round(float(rng.uniform(0, 5)), 2)})
    return out


# shape -> (format, config overrides naming its columns)
SHAPES = {
    "sst2": ("tsv", []),
    "three": ("csv", ["data.text=text"]),
    "pairs": ("jsonl", ["data.text=premise", "data.text_pair=hypothesis"]),
    "stsb": ("tsv", ["data.text=sentence1", "data.text_pair=sentence2", "data.label=score"]),
}
TRAIN = ["data.limit=0", "data.max_length=16", "train.batch_size=4", "train.eval_batch_size=8", "train.epochs=2",
         "train.lr=1e-2", "lora.dropout=0.0", XLA_CACHE, NO_PLOTS, "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    d = tmp_path_factory.mktemp("tables")
    out = {}
    for shape, (fmt, _) in SHAPES.items():
        out[shape] = {split: _write(d / f"{shape}_{split}.{fmt}", _rows(shape, n, seed), fmt)
                      for split, n, seed in (("train", 12, 0), ("validation", 8, 1))}
    return out


def _train(command: str, config: str, run_dir: Path, *overrides: str) -> Path:
    cli.main([command, str(REPO / "configs" / config), f"run.dir={run_dir}", *TRAIN, *overrides])
    rundir.detach_log(run_dir)
    return run_dir


def _data(files: dict, shape: str) -> list[str]:
    return [f"data.train={files[shape]['train']}", f"data.validation={files[shape]['validation']}",
            *SHAPES[shape][1]]


_runs: dict[str, Path] = {}


@pytest.fixture(scope="module")
def lora_runs(files, tmp_path_factory):
    def get(shape: str) -> Path:
        if shape not in _runs:
            _runs[shape] = _train("train-lora", "smoke.yaml", tmp_path_factory.mktemp("runs") / shape,
                                  *_data(files, shape))
        return _runs[shape]
    return get


def _best(run_dir: Path) -> dict:
    record = json.loads((run_dir / "metrics.json").read_text())
    best = record["epochs"][record["summary"]["best_epoch"] - 1]
    return record, best


# ------------------------------------------------------------------------------------------ runs end to end

EXPECTED = {"sst2": (2, "accuracy", ["0", "1"]), "three": (3, "accuracy", ["neg", "neu", "pos"]),
            "pairs": (2, "accuracy", ["contradiction", "entailment"]), "stsb": (1, "pearson", [])}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_lora_run_on_each_shape_and_evaluate_gives_back_its_best_epoch(shape, lora_runs):
    run = lora_runs(shape)
    cfg = load_config(run / "config.yaml")
    n, select, names = EXPECTED[shape]
    assert (data_lib.resolve_task(cfg).model.num_labels, cfg.model.num_labels, cfg.data.labels) == (n, n, names)
    record, best = _best(run)
    assert record["summary"]["select"] == select and len(record["epochs"]) == 2
    assert record["summary"][f"best_val_{select}"] == max(e["val"][select] for e in record["epochs"])
    clf = evaluation.Predictor.from_run(run)
    report = clf.evaluate("validation")
    assert report.logits.shape == (8, n)
    recorded = {k: v for k, v in best["val"].items() if k != "count"}
    assert {k: report.scores[k] for k in recorded} == recorded  # exactly: the same batches, the same sums
    if shape == "stsb":
        from scipy.stats import spearmanr
        labels = np.asarray([r["score"] for r in _rows("stsb", 8, 1)], np.float32)
        assert report.scores["spearman"] == pytest.approx(spearmanr(labels, report.logits[:, 0])[0], abs=1e-6)


def _torch_vs_evaluate(model, run: Path) -> tuple[evaluation.Predictor, float]:
    """(the run's Predictor, max |logit difference| between a PyTorch model and `evaluate` on its validation rows)."""
    import torch

    clf = evaluation.Predictor.from_run(run)
    report = clf.evaluate("validation")
    split = evaluation.load_eval_set("validation", 0, clf.run.config).encoded
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(split.input_ids.astype(np.int64)),
                       attention_mask=torch.from_numpy(split.attention_mask.astype(np.int64))).logits.numpy()
    return clf, float(np.abs(theirs - report.logits).max())


@pytest.mark.parametrize("shape", SHAPES)
def test_pytorch_on_the_merge_export_gives_the_same_logits(shape, lora_runs, tmp_path):
    pytest.importorskip("torch")
    from transformers import GPT2ForSequenceClassification

    run = lora_runs(shape)
    out = tmp_path / "merged"
    cli.main(["merge", str(run), str(out)])
    model = GPT2ForSequenceClassification.from_pretrained(str(out)).eval()
    n, _, names = EXPECTED[shape]
    assert model.config.num_labels == n
    assert model.config.problem_type == ("regression" if n == 1 else "single_label_classification")
    assert [model.config.id2label[i] for i in range(n)] == (names or ["score"])
    clf, err = _torch_vs_evaluate(model, run)
    print(f"{shape}: PyTorch vs evaluate, max |logit diff| {err:.1e}")
    assert err < 1e-4


def test_export_peft_carries_the_label_set_and_the_tokenizer(lora_runs, tmp_path):
    """A three-class run's PEFT adapter with its base: PEFT on GPT2ForSequenceClassification gives the run's logits,
    the base's config.json names the labels, the tokenizer files lie beside the adapter."""
    pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    run = lora_runs("three")
    out = tmp_path / "peft"
    cli.main(["export-peft", str(run), str(out), "--save-base"])
    base = GPT2ForSequenceClassification.from_pretrained(str(out / "base"))
    assert base.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and base.config.num_labels == 3
    model = PeftModel.from_pretrained(base, str(out)).eval()
    clf, err = _torch_vs_evaluate(model, run)
    assert err < 1e-4
    assert AutoTokenizer.from_pretrained(str(out))("The cat sat.")["input_ids"] == clf.tokenizer("The cat sat.")[
        "input_ids"]


# (table shape, student, distill.* settings): every zoo student and the transformer distil a head of 3 classes or a
# regression, with the KL or the MSE loss
DISTILLED = [("three", ("student.arch=bilstm",), ("distill.loss=mse",)),
             ("stsb", ("student.arch=cnn", "student.cnn_filters=8"), ()),
             ("three", ("student.arch=transformer", "student.layers=1"), ("distill.loss=kl",))]


def test_a_distilled_student_over_three_classes_and_over_a_regression_and_the_rnn_baseline(files, lora_runs, tmp_path):
    for i, (shape, student, loss) in enumerate(DISTILLED):
        run = _train("distill", "distil_rnn_gpt2.yaml", tmp_path / f"{shape}_{i}", f"distill.teacher={lora_runs(shape)}",
                     *_data(files, shape), "student.embed_dim=16", "student.hidden_dim=16", *student, *loss)
        record, best = _best(run)
        assert record["kind"] == "distill" and record["summary"]["student_arch"] == student[0].split("=")[1]
        report = evaluation.Predictor.from_run(run).evaluate("validation")
        assert report.logits.shape[1] == EXPECTED[shape][0]
        # evaluate gives back the recorded best epoch, every metric (pearson and spearman of a regression too)
        assert {k: report.scores[k] for k in best["val"] if k != "count"} == {
            k: v for k, v in best["val"].items() if k != "count"}
    rnn = _train("train-rnn", "rnn_scratch.yaml", tmp_path / "rnn", *_data(files, "three"), "student.embed_dim=16",
                 "student.hidden_dim=16")  # the RNN baseline over three classes
    _, best = _best(rnn)
    assert evaluation.Predictor.from_run(rnn).evaluate("validation").scores["macro_f1"] == best["val"]["macro_f1"]
    with pytest.raises(SystemExit, match=r"the teacher in .* learned the labels neg, neu, pos \(3 outputs\), this "
                       r"student's data has regression \(1 outputs\)"):
        _train("distill", "distil_rnn_gpt2.yaml", tmp_path / "mismatch", f"distill.teacher={lora_runs('three')}",
               *_data(files, "stsb"))


@pytest.mark.parametrize("shape", ["three", "stsb"])
def test_many_seeds_over_three_classes_and_over_a_regression(shape, files, tmp_path):
    """train.seeds on a three-class file and on a regression: one program, the aggregate over seeds (the selected
    metric's), each seed dir a run of its own whose recorded epoch `evaluate` gives back (Spearman's rho included:
    recorded per epoch from the eval step's rows)."""
    run = _train("train-lora", "smoke.yaml", tmp_path / "seeded", *_data(files, shape), "train.seeds=0,1",
                 "train.epochs=1")
    record = json.loads((run / "metrics.json").read_text())
    select = EXPECTED[shape][1]
    assert record["seeds"] == [0, 1] and set(record["summary"]["seed_stats"][f"best_val_{select}"]) >= {"mean", "std"}
    seed1 = run / "seed_1"
    _, best = _best(seed1)
    report = evaluation.Predictor.from_run(seed1).evaluate("validation")
    metric = "macro_f1" if shape == "three" else "spearman"
    assert report.scores[metric] == best["val"][metric]
    assert record["epochs"][0]["val"][metric]["max"] >= best["val"][metric] >= record["epochs"][0]["val"][metric]["min"]


def test_the_pipeline_reads_a_merge_export_alone(files, lora_runs, tmp_path):
    """`pipeline("text-classification", model=DIR)` with no other argument: the run's label names and predict's
    probabilities, for a string-label task and for CoLA."""
    pytest.importorskip("torch")
    from transformers import pipeline

    cola = _train("train-lora", "smoke.yaml", tmp_path / "cola", "data.limit=16")
    for run, sentences in ((lora_runs("three"), ["The cat sat.", "A big red dog ran quickly."]),
                           (cola, ["The cat sat on the mat.", "Cat the mat on sat."])):
        out = tmp_path / f"merged_{run.name}"
        cli.main(["merge", str(run), str(out)])
        clf = evaluation.Predictor.from_run(run)
        ours = clf.predict(sentences)
        theirs = pipeline("text-classification", model=str(out), device="cpu")(sentences)
        assert [t["label"] for t in theirs] == [p.label for p in ours]
        np.testing.assert_allclose([t["score"] for t in theirs], [p.probability for p in ours], atol=1e-5)
    config = json.loads((tmp_path / "merged_cola" / "config.json").read_text())
    assert config["id2label"] == {"0": "unacceptable", "1": "acceptable"}  # CoLA: 1 = acceptable
    assert config["problem_type"] == "single_label_classification"


def test_predict_and_evaluate_commands_on_table_runs(lora_runs, files, tmp_path, capsys):
    run = lora_runs("pairs")
    clf = evaluation.Predictor.from_run(run)
    out = clf.predict(["The cat sat.", "A dog ran."], pairs=["The cat is sitting.", "Nothing moved."])
    assert [p.label in ("contradiction", "entailment") for p in out] == [True, True]
    assert all(0.5 <= p.probability <= 1 for p in out)
    capsys.readouterr()
    cli.main(["predict", str(run), "--pair", "The cat sat.", "The cat is sitting.", "--pair", "A dog ran.",
              "Nothing moved.", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert [(p["sentence"], p["pair"], p["label"]) for p in printed] == [
        ("The cat sat.", "The cat is sitting.", out[0].label), ("A dog ran.", "Nothing moved.", out[1].label)]
    assert [p["probability"] for p in printed] == [p.probability for p in out]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("The cat sat.\tThe cat is sitting.\nno tab here\n")
    with pytest.raises(SystemExit, match=r"pairs.txt:2: expected two non-blank texts separated by one tab"):
        cli.main(["predict", str(run), "--file", str(pairs)])
    with pytest.raises(SystemExit, match=r"trained on sentence pairs .*--pair FIRST SECOND"):
        cli.main(["predict", str(run), "The cat sat."])
    three, stsb = lora_runs("three"), lora_runs("stsb")  # trained (and their lines printed) before the commands
    capsys.readouterr()
    cli.main(["evaluate", str(three), "--json"])
    record = json.loads(capsys.readouterr().out)["sets"]["validation"]
    _, best = _best(lora_runs("three"))
    assert record["scores"]["macro_f1"] == best["val"]["macro_f1"] and len(record["confusion"]["matrix"]) == 3
    cli.main(["evaluate", str(stsb), "--data", str(files["stsb"]["train"])])
    table = capsys.readouterr().out
    assert "pearson" in table and "spearman" in table and "stsb_train" in table


# ----------------------------------------------------------------------------------------- GLUE presets


def test_glue_presets_map_the_columns_of_files_in_glues_layout(tmp_path):
    mnli = tmp_path / "mnli"
    mnli.mkdir()
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    rows = [("The cat sat.", "A cat sat.", "entailment"), ("A dog ran.", "Nothing ran.", "contradiction"),
            ('He said "hi".', "He spoke.", "neutral")]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (mnli / name).write_text(head + "".join(f"{i}\t0\t0\tfiction\t{a}\t{b}\t{g}\t{g}\n"
                                                for i, (a, b, g) in enumerate(rows)))
    cfg = data_lib.resolve_task(load_config(None, [f"data.dir={mnli}", "data.task=mnli"]))
    assert (cfg.data.text, cfg.data.text_pair, cfg.data.label) == ("sentence1", "sentence2", "gold_label")
    assert cfg.data.labels == ["entailment", "neutral", "contradiction"] and cfg.model.num_labels == 3
    splits = data_lib.load_splits(cfg, tokenizer_for(cfg)).encoded
    assert list(splits) == ["train", "validation", "dev_mismatched"]  # matched picks, mismatched is reported
    np.testing.assert_array_equal(splits["validation"].labels, [0, 2, 1])
    assert cfg.train.select == "accuracy"
    assert data_lib.resolve_task(cfg).data.report == cfg.data.report  # a resolved config resolves to itself

    stsb = tmp_path / "stsb"
    stsb.mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for name in ("train.tsv", "dev.tsv"):
        (stsb / name).write_text(head + "0\tnews\tx\t2012\t0\ta\tb\tA man sat.\tA man is sitting.\t4.25\n"
                                        "1\tnews\tx\t2012\t1\ta\tb\tA dog ran.\tThe sky is blue.\t0.5\n")
    cfg = data_lib.resolve_task(load_config(None, [f"data.dir={stsb}", "data.task=stsb"]))
    assert (cfg.data.problem, cfg.model.num_labels, cfg.train.select) == ("regression", 1, "pearson")
    np.testing.assert_array_equal(data_lib.load_splits(cfg, tokenizer_for(cfg)).encoded["validation"].labels,
                                  np.asarray([4.25, 0.5], np.float32))

    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (sst2 / name).write_text("sentence\tlabel\nit 's a charming journey . \t1\nbad , \"dull\" film\t0\n")
    cfg = data_lib.resolve_task(load_config(None, [f"data.dir={sst2}", "data.task=sst2", "train.select=mcc"]))
    assert cfg.data.labels == ["negative", "positive"] and cfg.train.select == "mcc"  # train.select wins
    assert data_lib.load_splits(cfg, tokenizer_for(cfg)).encoded["train"].labels.tolist() == [1, 0]
    cola = data_lib.resolve_task(load_config(None, ["data.task=cola"]))
    assert cola.train.select == "mcc" and not data_lib.is_table_run(cola)  # the CoLA reader, GLUE's metric


# task -> (GLUE's header, a row's cells by row: (text, pair, label as the file holds it), the label ids expected)
PAIR_PRESETS = {
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", lambda a, b, y: f"{y}\t1\t2\t{a}\t{b}",
             ("1", "0", "1"), [1, 0, 1]),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", lambda a, b, y: f"7\t1\t2\t{a}\t{b}\t{y}",
            ("0", "1", "1"), [0, 1, 1]),
    "qnli": ("index\tquestion\tsentence\tlabel", lambda a, b, y: f"3\t{a}\t{b}\t{y}",
             ("not_entailment", "entailment", "not_entailment"), [1, 0, 1]),
    "rte": ("index\tsentence1\tsentence2\tlabel", lambda a, b, y: f"3\t{a}\t{b}\t{y}",
            ("entailment", "not_entailment", "entailment"), [0, 1, 0]),
    "wnli": ("index\tsentence1\tsentence2\tlabel", lambda a, b, y: f"3\t{a}\t{b}\t{y}", ("1", "0", "0"),
             [1, 0, 0]),
}


@pytest.mark.parametrize("task", list(PAIR_PRESETS))
def test_the_pair_presets_read_glues_files_with_glues_label_ids(task, tmp_path):
    """mrpc, qqp, qnli, rte and wnli in GLUE's own TSV layout: the text and pair from their columns (the pair
    encoded after the first text, the eos between), the labels as the hub's ClassLabel ids."""
    header, row, labels, ids = PAIR_PRESETS[task]
    pairs = [("The cat sat.", "A cat sat down."), ("A dog ran.", "Nothing moved."), ("He left.", "He went away.")]
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / name).write_text(header + "\n" + "".join(row(a, b, y) + "\n" for (a, b), y in zip(pairs, labels)))
    cfg = data_lib.resolve_task(load_config(None, [f"data.dir={tmp_path}", f"data.task={task}"]))
    preset = GLUE[task]
    assert cfg.data.labels == list(preset.names) and cfg.model.num_labels == 2
    assert cfg.train.select == preset.metric
    tok = tokenizer_for(cfg)
    split = data_lib.load_splits(cfg, tok).encoded["validation"]
    assert split.labels.tolist() == ids
    eos = tok.eos_token_id
    first = [int(t) for t, m in zip(split.input_ids[0], split.attention_mask[0]) if m]
    assert first == tok.encode(pairs[0][0]) + [eos] + tok.encode(pairs[0][1])


def test_label_ids_are_the_sorted_names_not_the_order_rows_come_in(tmp_path):
    """String labels get ids in sorted order whatever order the rows bring them in (here pos, neg, neu: a
    first-seen order would give pos 0); integer labels are ids as they stand, more than two classes and a class
    absent from the file included (model.num_labels = the largest + 1)."""
    rows = [{"text": f"Sentence number {i}.", "label": y} for i, y in enumerate(["pos", "neg", "neu", "pos", "neg"])]
    train = _write(tmp_path / "train.csv", rows, "csv")
    cfg = data_lib.resolve_task(load_config(None, [f"data.train={train}", f"data.validation={train}", "data.text=text"]))
    assert cfg.data.labels == ["neg", "neu", "pos"] and cfg.model.num_labels == 3
    split = data_lib.load_splits(cfg, tokenizer_for(cfg)).encoded["train"]
    assert split.labels.tolist() == [2, 0, 1, 2, 0]
    ints = [{"sentence": f"Row {i}.", "label": y} for i, y in enumerate([4, 0, 2, 4, 1])]  # 3 never appears
    train = _write(tmp_path / "train.tsv", ints, "tsv")
    cfg = data_lib.resolve_task(load_config(None, [f"data.train={train}", f"data.validation={train}"]))
    assert cfg.model.num_labels == 5 and cfg.data.labels == ["0", "1", "2", "3", "4"]
    assert data_lib.load_splits(cfg, tokenizer_for(cfg)).encoded["train"].labels.tolist() == [4, 0, 2, 4, 1]


def test_parquet_reads_like_the_others_and_cola_needs_no_datasets(files, tmp_path, monkeypatch):
    import pandas as pd

    rows = _rows("three", 6, 0)
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    jsonl = _write(tmp_path / "t.jsonl", rows, "jsonl")
    assert data_lib.read_table(tmp_path / "t.parquet").columns == data_lib.read_table(jsonl).columns
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # `import datasets` now raises ImportError
    cfg = data_lib.resolve_task(load_config(None, ["data.limit=8"]))  # the packaged CoLA: no table, no datasets
    assert cfg.data.labels == [] and list(data_lib.load_splits(cfg, tokenizer_for(cfg)).encoded) == ["train", "validation",
                                                                                "out_of_domain"]


def test_a_glue_task_from_the_hub_maps_its_columns(monkeypatch):
    """data.dir=hub data.task=mnli reads nyu-mll/glue's columns (premise, hypothesis, ClassLabel ids) and both
    validation sets; the hub itself is out of reach offline, so `datasets.load_dataset` answers with a copy in
    memory of the hub's layout."""
    import datasets

    part = {"premise": ["The cat sat.", "A dog ran."], "hypothesis": ["A cat sat.", "Nothing ran."], "label": [0, 2]}
    asked = []

    def fake_load(name, config):
        asked.append((name, config))
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(part) for s in
                                     ("train", "validation_matched", "validation_mismatched")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = data_lib.resolve_task(load_config(None, ["data.dir=hub", "data.task=mnli"]))
    assert (cfg.data.text, cfg.data.text_pair, cfg.data.labels) == ("premise", "hypothesis",
                                                                    ["entailment", "neutral", "contradiction"])
    splits = data_lib.load_splits(cfg, tokenizer_for(cfg)).encoded
    assert asked == [("nyu-mll/glue", "mnli")] and list(splits) == ["train", "validation", "validation_mismatched"]
    assert splits["validation"].labels.tolist() == [0, 2]


# ------------------------------------------------------------------------------------------- bad input


def _error(tmp_path: Path, name: str, text: str, *overrides: str, validation: str | None = None) -> str:
    train = tmp_path / name
    train.write_text(text)
    val = tmp_path / f"val_{name}"
    val.write_text(validation or text)
    cfg = load_config(None, [f"data.train={train}", f"data.validation={val}", *overrides])
    with pytest.raises(data_lib.DataError) as e:
        data_lib.load_splits(data_lib.resolve_task(cfg), tokenizer_for(cfg))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_is_one_line_naming_file_line_and_column(tmp_path):
    msg = _error(tmp_path, "a.tsv", "sentence\tlabel\nfine\t1\nok\t0\n", "data.text=text")
    assert "a.tsv: no column 'text' (data.text); the file has columns 'sentence', 'label'" in msg
    msg = _error(tmp_path, "b.csv", "sentence,label\nfine,1\n   ,0\n")
    assert "b.csv:3 (column 'sentence'): empty text" in msg
    msg = _error(tmp_path, "b2.tsv", "sentence\tlabel\nfine\t1\n\nok\t0\n\t\n", validation="sentence\tlabel\n\nx\t7\n")
    assert "val_b2.tsv:3 (column 'label'): label 7 is outside" in msg  # blank lines skipped, lines still counted
    msg = _error(tmp_path, "c.csv", "sentence,label\nfine,pos\nok,neg\n", validation="sentence,label\nhm,meh\n")
    assert "val_c.csv:2 (column 'label'): label 'meh' is not in the training label set (neg, pos)" in msg
    msg = _error(tmp_path, "d.csv", "sentence,label\na,pos\nb,neg\nc,1\n")
    assert "d.csv:4 (column 'label'): label '1' mixes label types" in msg
    msg = _error(tmp_path, "e.jsonl", '{"sentence": "a", "label": 0.5}\n{"sentence": "b", "label": "high"}\n',
                 "data.problem=regression")
    assert "e.jsonl:2 (column 'label'): regression label 'high' is not a number" in msg
    msg = _error(tmp_path, "f.tsv", "sentence\tlabel\na\t0\nb\t1\n", validation="sentence\tlabel\nc\t2\n")
    assert "val_f.tsv:2 (column 'label'): label 2 is outside the training label set" in msg
    with pytest.raises(ConfigError, match=r"data.task: 'glu' is not one of .*sst2"):
        load_config(None, ["data.task=glu"])


def test_pairs_share_the_length_budget_fairly_and_count_cuts():
    assert data_lib.encoding.fair_split(3, 4, 9) == (3, 4)  # both fit
    assert data_lib.encoding.fair_split(10, 2, 9) == (7, 2)  # the short one whole, the long one the rest
    assert data_lib.encoding.fair_split(2, 10, 9) == (2, 7)
    assert data_lib.encoding.fair_split(10, 10, 9) == (5, 4)  # half each, the first the odd token
    tok = data_lib.load_tokenizer("")
    split = data_lib.encode_pairs(["a b c d e f g h", "hi"], ["x y z w v u", "yo"], np.zeros(2, np.int32), tok, 8)
    assert split.n_truncated == 1 and split.truncated_rows.tolist() == [True, False]
    first = tok("a b c d e f g h")["input_ids"][:4] + [data_lib.PAD_ID] + tok("x y z w v u")["input_ids"][:3]
    assert split.input_ids[0].tolist() == first and split.attention_mask[1].sum() == 3


# ---------------------------------------------------------------------------------------------- metrics


def _sums(logits: np.ndarray, labels: np.ndarray, batch: int = 5) -> dict:
    """Summed on-device counts over batches of `batch` rows, padded with weight-0 rows as the loop does (and a
    regression's Spearman's rho from the batches' rows, as the loop computes it per epoch)."""
    sums, ranked = metrics_lib.zeros(logits.shape[1]), []
    for i in range(0, len(labels), batch):
        lg, lb = logits[i:i + batch], labels[i:i + batch]
        w = np.ones(batch, np.float32)
        w[len(lb):] = 0
        lg = np.pad(lg, ((0, batch - len(lg)), (0, 0)))
        lb = np.pad(lb, (0, batch - len(lb)))
        out = metrics_lib.eval_sums(lg, {"labels": lb, "weights": w})
        ranked += [out[metrics_lib.RANKED]] if metrics_lib.RANKED in out else []
        sums = metrics_lib.add(sums, out)
    return {**metrics_lib.summarize(sums), **(metrics_lib.ranked_scores(ranked) if ranked else {})}


@pytest.mark.parametrize("n_classes", [2, 3, 5])
@pytest.mark.parametrize("case", ["random", "one_class_predicted", "one_class_gold", "absent_class"])
def test_classification_metrics_match_sklearn(n_classes, case):
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes, 37).astype(np.int32)
    logits = rng.normal(size=(37, n_classes)).astype(np.float32)
    if case == "one_class_predicted":
        logits[:, 1] += 100.0
    if case == "one_class_gold":
        labels[:] = 0
    if case == "absent_class":  # classes 3.. neither gold nor predicted: not in the macro mean, as sklearn
        labels %= 3
        logits[:, 3:] -= 100.0
    pred = logits.argmax(-1)
    got = _sums(logits, labels)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-6)
    assert got["mcc"] == pytest.approx(matthews_corrcoef(labels, pred), abs=1e-6)
    assert got["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0), abs=1e-6)
    if n_classes == 2:
        assert got["f1"] == pytest.approx(f1_score(labels, pred, zero_division=0), abs=1e-6)
    if case == "one_class_predicted":
        assert got["mcc"] == 0.0  # sklearn's value when a marginal is one class


@pytest.mark.parametrize("case", ["random", "constant_output", "ties", "large"])
def test_regression_metrics_match_scipy(case):
    """Pearson's r and Spearman's rho equal scipy's (float64) to 1e-7, also on a set where summed float32 moments
    lose digits ('large': 3,000 rows of scores near 1,000)."""
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    n, offset = (3000, 1000.0) if case == "large" else (41, 0.0)
    labels = (offset + rng.uniform(0, 5, n)).astype(np.float32)
    out = (labels + rng.normal(0, 1.5, n)).astype(np.float32)
    if case == "constant_output":
        out[:] = 2.5
    if case == "ties":
        labels, out = np.round(labels), np.round(out)
    got = _sums(out[:, None], labels, batch=64 if case == "large" else 5)
    assert got["mse"] == pytest.approx(float(np.mean((out - labels) ** 2)), rel=1e-5)
    y, p = labels.astype(np.float64), out.astype(np.float64)
    if case == "constant_output":  # scipy says NaN (no variance); we define both as 0
        assert got["pearson"] == 0.0 and got["spearman"] == 0.0
    else:
        assert got["pearson"] == pytest.approx(pearsonr(y, p)[0], abs=1e-7)
        assert got["spearman"] == pytest.approx(spearmanr(y, p)[0], abs=1e-9)
    if case == "large":  # what the summed float32 moments give: off by more than the tolerance above
        moments = metrics_lib.summarize(metrics_lib.eval_sums(out[:, None], {"labels": labels,
                                                                              "weights": np.ones(n, np.float32)}))
        assert abs(moments["pearson"] - pearsonr(y, p)[0]) > 1e-5


def test_the_selected_metric_picks_the_best_epoch():
    history = [{"epoch": 1, "train": {"accuracy": 0.5}, "val": {"loss": 1.0, "accuracy": 0.8, "mcc": 0.1}},
               {"epoch": 2, "train": {"accuracy": 0.6}, "val": {"loss": 0.9, "accuracy": 0.7, "mcc": 0.3}},
               {"epoch": 3, "train": {"accuracy": 0.7}, "val": {"loss": 0.8, "accuracy": 0.8, "mcc": math.nan}}]
    assert selection.best_entry(history)["epoch"] == 1  # accuracy; the first wins a tie
    assert selection.best_entry(history, "mcc")["epoch"] == 2  # NaN never wins
    s = selection.summary(history, "mcc")
    assert (s["best_epoch"], s["best_val_mcc"], s["best_val_accuracy"], s["select"]) == (2, 0.3, 0.7, "mcc")
