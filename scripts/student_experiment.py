#!/usr/bin/env python
"""A distillation experiment that needs no pretrained weights (issue 26): a synthetic task with a known rule.

Sentences come from a small template grammar, "the ADJ NOUN VERB the ADJ NOUN [and was ADJ]"; the label is 1 when
the sentence has more positive adjectives than negative ones. A tiny random-init GPT-2 with LoRA (the teacher)
learns the rule from a large labelled set; the RNN student is given only a small labelled subset of it, and is
trained on those labels alone, distilled on that subset, or distilled on Tang et al.'s augmented transfer set
made from that subset (KL and MSE each). `--students` adds the other students of the zoo (bilstm, cnn,
transformer), each small and each in two conditions: labels only and distilled on the transfer set with KL.
Held-out accuracy and agreement with the teacher (the fraction of held-out rows where the student's argmax is the
teacher's) are reported as mean ± std over the student seeds.

usage: scripts/student_experiment.py OUT_DIR [--seeds 0,1,2,3,4] [--student-rows 64] [--augment 20] [--student-epochs 30]
                                     [--students rnn,bilstm,cnn,transformer] [--rnn-conditions all|zoo]
                                     [--zoo-epochs N]

Writes OUT_DIR/data/*.tsv, the runs under OUT_DIR/runs/, OUT_DIR/results.json, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

POSITIVE = ("good", "great", "nice", "happy", "kind", "warm", "bright", "calm", "brave", "clever", "fresh", "proud")
NEGATIVE = ("bad", "poor", "sad", "cruel", "cold", "dark", "weak", "rude", "dull", "grim", "harsh", "sick")
NEUTRAL = ("big", "small", "old", "new", "red", "blue", "tall", "short")
NOUNS = ("man", "dog", "cat", "girl", "boy", "bird", "king", "child", "woman", "horse")
VERBS = ("saw", "met", "liked", "found", "helped", "called", "followed", "heard")

TINY_TEACHER = ["model.name=custom", "model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
                "model.dropout=0.0", "lora.rank=8", "lora.dropout=0.0", "train.batch_size=32", "train.lr=3e-3"]
SMALL_STUDENT = ["student.embed_dim=32", "student.hidden_dim=64", "student.cell=rnn", "student.pooling=last_token",
                 "train.batch_size=32", "train.lr=3e-3"]
# The zoo's students, as small as the RNN (embed 32, hidden 64). The transformer distilled from the 2-layer teacher
# is its default: 1 block, the teacher's merged block 0, 64 wide with the teacher's embeddings; its labels-only
# counterpart (no teacher to start from) is a random 1-block GPT-2 of the same sizes (64 wide, 4 heads).
ZOO_STUDENTS = {
    "bilstm": ["student.arch=bilstm", "student.embed_dim=32", "student.hidden_dim=64", "student.relu_dim=64"],
    "cnn": ["student.arch=cnn", "student.embed_dim=32", "student.cnn_widths=[2,3,4]", "student.cnn_filters=32"],
    "transformer": ["student.arch=transformer", "student.layers=1"],
}
ZOO_LABELS_ONLY = {"transformer": ["student.embed_dim=64", "student.heads=4"]}  # the teacher fixes these otherwise
STUDENTS = ("rnn", *ZOO_STUDENTS)


def rule(adjectives: list[str]) -> int:
    """The task's label: 1 when more of the adjectives are positive than negative, else 0."""
    score = sum(a in POSITIVE for a in adjectives) - sum(a in NEGATIVE for a in adjectives)
    return int(score > 0)


def generate(n: int, seed: int) -> list[tuple[str, int]]:
    """`n` (sentence, label) rows of the template grammar, drawn by one seeded numpy Generator (deterministic)."""
    rng = np.random.default_rng(seed)
    groups = (POSITIVE, NEGATIVE, NEUTRAL)

    def adjective() -> str:
        group = groups[rng.choice(3, p=(0.4, 0.4, 0.2))]
        return str(group[rng.integers(len(group))])

    def word(pool: tuple[str, ...]) -> str:
        return str(pool[rng.integers(len(pool))])

    rows = []
    for _ in range(n):
        adjectives = [adjective(), adjective()]
        words = ["the", adjectives[0], word(NOUNS), word(VERBS), "the", adjectives[1], word(NOUNS)]
        if rng.random() < 0.5:
            adjectives.append(adjective())
            words += ["and", "was", adjectives[2]]
        rows.append((" ".join(words), rule(adjectives)))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return path


def make_data(out: Path, teacher_rows: int, student_rows: int, validation_rows: int, test_rows: int,
              unlabeled_rows: int = 0) -> dict:
    """The files: the teacher's labelled set, the student's subset of it (its first rows), validation, test, and
    a text file of unlabeled sentences of the grammar."""
    train = generate(teacher_rows, seed=1)
    files = {"teacher_train": write_tsv(out / "teacher_train.tsv", train),
             "student_train": write_tsv(out / "student_train.tsv", train[:student_rows]),
             "validation": write_tsv(out / "validation.tsv", generate(validation_rows, seed=2)),
             "test": write_tsv(out / "test.tsv", generate(test_rows, seed=3))}
    unlabeled = out / "unlabeled.txt"  # fresh sentences of the grammar, as many as the augmented copies, no labels
    unlabeled.write_text("".join(f"{s}\n" for s, _ in generate(unlabeled_rows, seed=4)))
    files["unlabeled"] = unlabeled
    return {k: str(v) for k, v in files.items()}


def read_tsv(path: str) -> tuple[list[str], np.ndarray]:
    lines = Path(path).read_text().splitlines()[1:]
    sentences, labels = zip(*(line.split("\t") for line in lines))
    return list(sentences), np.array([int(y) for y in labels])


def seed_dirs(run_dir: Path, seeds: list[int]) -> list[Path]:
    return [run_dir / f"seed_{k}" for k in seeds] if len(seeds) > 1 else [run_dir]


def score(run_dir: Path, sentences: list[str], labels: np.ndarray, teacher_pred: np.ndarray | None) -> dict:
    """Held-out accuracy (and agreement with the teacher's argmax) of a run's best checkpoint."""
    from lora_kd_jax import Predictor

    pred = Predictor.from_run(run_dir).logits(sentences).argmax(axis=-1)
    out = {"accuracy": float((pred == labels).mean())}
    if teacher_pred is not None:
        out["agreement"] = float((pred == teacher_pred).mean())
    return out, pred


def conditions_for(arch: str, augment: int, unlabeled: str, rnn_conditions: str = "all"
                   ) -> list[tuple[str, str, list[str]]]:
    """(name, API command, overrides) of every run one student architecture gets. The RNN keeps the original six
    conditions (`rnn_conditions="zoo"`: only the zoo's two); each other student gets the two that answer "does
    distillation help it": labels only, and the transfer set with KL."""
    transfer = f"distilled, transfer set ×{augment + 1}, KL"
    if arch == "rnn" and rnn_conditions == "zoo":
        return [("labels only", "train_rnn", [*SMALL_STUDENT]),
                (transfer, "distill_student", [*SMALL_STUDENT, "distill.loss=kl", f"distill.augment={augment}"])]
    if arch == "rnn":
        return [("labels only", "train_rnn", [*SMALL_STUDENT]),
                ("distilled, training set, KL", "distill_student", [*SMALL_STUDENT, "distill.loss=kl"]),
                ("distilled, training set, MSE", "distill_student", [*SMALL_STUDENT, "distill.loss=mse"]),
                (transfer, "distill_student", [*SMALL_STUDENT, "distill.loss=kl", f"distill.augment={augment}"]),
                (f"distilled, transfer set ×{augment + 1}, MSE", "distill_student",
                 [*SMALL_STUDENT, "distill.loss=mse", f"distill.augment={augment}"]),
                ("distilled, training set + unlabeled grammar sentences, KL", "distill_student",
                 [*SMALL_STUDENT, "distill.loss=kl", f"distill.unlabeled={unlabeled}"])]
    if arch not in ZOO_STUDENTS:
        raise ValueError(f"--students: unknown student {arch!r}; choose from {','.join(STUDENTS)}")
    base = ["train.batch_size=32", "train.lr=3e-3", *ZOO_STUDENTS[arch]]
    return [("labels only", "train_rnn", [*base, *ZOO_LABELS_ONLY.get(arch, [])]),
            (transfer, "distill_student", [*base, "distill.loss=kl", f"distill.augment={augment}"])]


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--teacher-rows", type=int, default=3000)
    p.add_argument("--student-rows", type=int, default=64)
    p.add_argument("--validation-rows", type=int, default=200)
    p.add_argument("--test-rows", type=int, default=1000)
    p.add_argument("--augment", type=int, default=20)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--student-epochs", type=int, default=30)
    p.add_argument("--students", default="rnn", help=f"comma-separated, of {','.join(STUDENTS)}; the RNN's rows "
                   "run only when rnn is named")
    p.add_argument("--rnn-conditions", choices=("all", "zoo"), default="all",
                   help="the RNN's six conditions, or only the two every other student gets")
    p.add_argument("--zoo-epochs", type=int, default=0, help="epochs of the non-RNN students; 0 = --student-epochs")
    args = p.parse_args(argv)

    import lora_kd_jax as lkj

    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out
    t0 = time.perf_counter()
    files = make_data(out / "data", args.teacher_rows, args.student_rows, args.validation_rows, args.test_rows,
                      args.augment * args.student_rows)
    common = ["data.max_length=16", "data.limit=0", f"data.validation={files['validation']}",
              "run.overwrite=true"]
    test_sentences, test_labels = read_tsv(files["test"])

    archs = args.students.split(",")  # planned before the teacher trains: an unknown student fails at once
    try:
        plan = [(arch, *c) for arch in archs for c in conditions_for(arch, args.augment, files["unlabeled"],
                                                                       args.rnn_conditions)]
    except ValueError as e:
        p.error(str(e))
    teacher_dir = out / "runs" / "teacher"
    cfg = lkj.load_config(None, [*TINY_TEACHER, *common, f"data.train={files['teacher_train']}",
                                 f"train.epochs={args.teacher_epochs}", "train.seed=0", f"run.dir={teacher_dir}"])
    lkj.train_lora(cfg)
    teacher, teacher_pred = score(teacher_dir, test_sentences, test_labels, None)
    print(f"teacher: held-out accuracy {teacher['accuracy']:.4f}", file=sys.stderr)

    student = [*common, f"data.train={files['student_train']}", f"train.seeds={args.seeds}"]
    majority = float(max(test_labels.mean(), 1 - test_labels.mean()))
    record = {"task": "synthetic: label 1 iff more positive than negative adjectives (scripts/student_experiment.py)",
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "teacher_overrides": TINY_TEACHER, "student_overrides": SMALL_STUDENT,
              "zoo_overrides": {a: ZOO_STUDENTS[a] for a in archs if a in ZOO_STUDENTS},
              "zoo_labels_only_overrides": {a: ZOO_LABELS_ONLY[a] for a in archs if a in ZOO_LABELS_ONLY},
              "teacher": teacher, "test_majority_class": majority, "conditions": []}
    results = record["conditions"]
    for i, (arch, name, command, extra) in enumerate(plan):
        run_dir = out / "runs" / (f"student_{i}" if arch == "rnn" else f"student_{arch}_{i}")
        epochs = args.student_epochs if arch == "rnn" else (args.zoo_epochs or args.student_epochs)
        start = time.perf_counter()
        cfg = lkj.load_config(None, [*student, *extra, f"train.epochs={epochs}", f"distill.teacher={teacher_dir}",
                                     f"run.dir={run_dir}"])
        summary = getattr(lkj, command)(cfg)
        per_seed = [score(d, test_sentences, test_labels, teacher_pred)[0] for d in seed_dirs(run_dir, seeds)]
        transfer = summary.get("transfer_set") or {}
        results.append({"student": arch, "condition": name, "command": command, "overrides": extra,
                        "epochs": epochs, "seeds": seeds, "per_seed": per_seed,
                        "seconds": round(time.perf_counter() - start, 1),
                        "training_rows": transfer.get("size", args.student_rows)})
        print(f"{arch}, {name}: {mean_std([r['accuracy'] for r in per_seed])} "
              f"({results[-1]['seconds']:.0f} s)", file=sys.stderr)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "results.json").write_text(json.dumps(record, indent=1))  # after every run: a cut-off run keeps its rows

    record["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(record, indent=1))
    print("| student | rows it trains on | held-out accuracy (%) | agreement with teacher (%) |\n|---|---|---|---|")
    print(f"| teacher (LoRA, {args.teacher_rows} labelled rows) | {args.teacher_rows} | "
          f"{100 * teacher['accuracy']:.2f} | — |")
    print(f"| majority class | — | {100 * majority:.2f} | — |")
    for r in (r for r in results if r["student"] == "rnn"):
        print(f"| {r['condition']} | {r['training_rows']} | {mean_std([s['accuracy'] for s in r['per_seed']])} | "
              f"{mean_std([s['agreement'] for s in r['per_seed']])} |")
    zoo = [r for r in results if r["student"] != "rnn" or args.rnn_conditions == "zoo"]
    if zoo:
        print("\n| student.arch | condition | rows it trains on | held-out accuracy (%) | agreement with teacher (%) |"
              "\n|---|---|---|---|---|")
        for r in zoo:
            print(f"| {r['student']} | {r['condition']} | {r['training_rows']} | "
                  f"{mean_std([s['accuracy'] for s in r['per_seed']])} | "
                  f"{mean_std([s['agreement'] for s in r['per_seed']])} |")
    print(f"({len(seeds)} student seeds; {record['seconds']:.0f} s) -> {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
