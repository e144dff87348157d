"""scripts/student_experiment.py's synthetic task: the data are reproducible and every label is the stated rule."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("student_experiment", REPO / "scripts" / "student_experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_synthetic_task_is_deterministic_and_its_labels_follow_the_rule(tmp_path):
    se = _script()
    rows = se.generate(500, seed=1)
    assert rows == se.generate(500, seed=1) and rows != se.generate(500, seed=2)
    for sentence, label in rows:
        words = sentence.split()
        assert words[0] == "the" and words[4] == "the" and len(words) in (7, 10)
        adjectives = [words[1], words[5]] + ([words[9]] if len(words) == 10 else [])
        positive = sum(w in se.POSITIVE for w in adjectives)
        negative = sum(w in se.NEGATIVE for w in adjectives)
        assert label == int(positive > negative), sentence
    labels = [y for _, y in rows]
    assert 0.2 < sum(labels) / len(labels) < 0.8  # both classes well represented
    files = se.make_data(tmp_path, teacher_rows=50, student_rows=10, validation_rows=5, test_rows=5)
    teacher_sentences, teacher_labels = se.read_tsv(files["teacher_train"])
    student_sentences, student_labels = se.read_tsv(files["student_train"])
    assert student_sentences == teacher_sentences[:10] and list(student_labels) == list(teacher_labels[:10])
    assert (teacher_sentences, list(teacher_labels)) == ([s for s, _ in rows[:50]], labels[:50])


def test_every_student_gets_its_small_overrides_and_the_rnn_keeps_its_six_conditions():
    """The per-arch plan: the RNN's rows unchanged, each other student labels only + transfer set KL, each
    override list a valid config of that student at the stated small sizes."""
    import lora_kd_jax as lkj

    se = _script()
    rnn = se.conditions_for("rnn", augment=20, unlabeled="u.txt")
    assert [c[0] for c in rnn] == ["labels only", "distilled, training set, KL", "distilled, training set, MSE",
                                   "distilled, transfer set ×21, KL", "distilled, transfer set ×21, MSE",
                                   "distilled, training set + unlabeled grammar sentences, KL"]
    assert all(c[2][:len(se.SMALL_STUDENT)] == se.SMALL_STUDENT for c in rnn)
    assert se.conditions_for("rnn", 20, "u.txt", rnn_conditions="zoo") == [rnn[0], rnn[3]]
    sizes = {"bilstm": dict(embed_dim=32, hidden_dim=64, relu_dim=64),
             "cnn": dict(embed_dim=32, cnn_widths=[2, 3, 4], cnn_filters=32),
             "transformer": dict(layers=1)}
    for arch, expected in sizes.items():
        (labels_name, labels_cmd, labels), (kd_name, kd_cmd, kd) = se.conditions_for(arch, 20, "u.txt")
        assert (labels_name, labels_cmd, kd_name, kd_cmd) == (
            "labels only", "train_rnn", "distilled, transfer set ×21, KL", "distill_student")
        assert "distill.augment=20" in kd and "distill.loss=kl" in kd and not any("distill" in o for o in labels)
        for overrides in (labels, kd):
            s = lkj.load_config(None, overrides).student
            assert s.arch == arch and all(getattr(s, k) == v for k, v in expected.items()), (arch, overrides)
    random_gpt2 = lkj.load_config(None, se.conditions_for("transformer", 20, "u.txt")[0][2]).student
    assert (random_gpt2.embed_dim, random_gpt2.heads) == (64, 4)  # the teacher's width and heads, drawn at random
    with pytest.raises(ValueError, match="--students: unknown student 'gru'"):
        se.conditions_for("gru", 20, "u.txt")
