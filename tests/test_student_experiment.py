"""scripts/student_experiment.py's synthetic task: the data are reproducible and every label is the stated rule."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
