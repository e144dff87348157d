"""Distillation from a BERT teacher (issue #24): the student reads the teacher's tokenizer and vocabulary.

One tiny BERT checkpoint (`tiny_families`), a one-epoch LoRA run on it, and a one-epoch distillation into the RNN
student over the training rows plus a few unlabeled sentences (so the teacher's logits are cached on disk).
"""
from __future__ import annotations

import types

import numpy as np
import pytest

pytest.importorskip("torch")
from tiny import XLA_CACHE  # noqa: E402
from tiny_families import save_checkpoint  # noqa: E402

from lora_kd_jax.core.config import ConfigError, load_config  # noqa: E402
from lora_kd_jax.data.cola import read_cola_tsv  # noqa: E402
from lora_kd_jax.assets import COLA_DIR  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")

LOGITS_ATOL = 5e-6  # test_families' FORWARD_ATOL: one eval forward against another
ROWS, MAX_LENGTH = 16, 20
UNLABELED = ["The cat sat on the mat.", "Mat the on sat cat the.", "John seems to be happy."]


@pytest.fixture(scope="module")
def bert_kd(tmp_path_factory):
    """A BERT LoRA teacher run and a student distilled from it (student.vocab_size left at GPT-2's 50257)."""
    from lora_kd_jax.distill.trainer import distill
    from lora_kd_jax.training.finetune import train_lora

    d = tmp_path_factory.mktemp("kd_bert")
    save_checkpoint("bert", d / "ckpt")
    common = [f"data.limit={ROWS}", f"data.max_length={MAX_LENGTH}", "train.batch_size=8", "train.epochs=1",
              "train.eval_batch_size=8", XLA_CACHE]
    teacher = load_config(None, [f"model.path={d / 'ckpt'}", "lora.rank=4", *common, f"run.dir={d / 'teacher'}"])
    train_lora(teacher, progress=False)
    (d / "unlabeled.txt").write_text("\n".join(UNLABELED) + "\n")
    student = load_config(None, [f"distill.teacher={d / 'teacher'}", f"distill.unlabeled={d / 'unlabeled.txt'}",
                                 "student.embed_dim=16", "student.hidden_dim=16", "student.pooling=last_token",
                                 *common, f"run.dir={d / 'student'}"])
    distill(student, progress=False)
    return types.SimpleNamespace(dir=d, student_cfg=student)


def test_bert_teacher_cached_logits_equal_its_evaluation(bert_kd):
    """The teacher logits kept for the transfer set (training rows, then the unlabeled sentences) are the teacher
    run's own predictions (evaluation.Predictor: its tokenizer, pad id, [CLS] pooling)."""
    from lora_kd_jax.commands.evaluation import Predictor

    (cached,) = (bert_kd.dir / "student" / "teacher_logits").glob("*.npy")
    logits = np.load(cached)
    sentences = read_cola_tsv(COLA_DIR / "in_domain_train.tsv")[0][:ROWS] + UNLABELED
    expected = Predictor.from_run(bert_kd.dir / "teacher").logits(sentences)
    assert logits.shape == (ROWS + len(UNLABELED), 2)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGITS_ATOL)


def test_student_reads_the_bert_teachers_token_ids_and_evaluates(bert_kd):
    """The student run encodes with the teacher's tokenizer (its input ids are the BERT tokenizer's), its
    embedding has the teacher's vocabulary rows, and `evaluate` scores it."""
    from lora_kd_jax.commands.evaluation import Predictor, evaluate_run
    from lora_kd_jax.data.encoding import encode, load_family_tokenizer

    student = Predictor.from_run(bert_kd.dir / "student")
    bert = load_family_tokenizer(str(bert_kd.dir / "ckpt"), "bert")
    assert student.run.params["embed"]["embedding"].shape[0] == len(bert)
    ours = student.encode(UNLABELED)
    theirs = encode(UNLABELED, np.zeros(len(UNLABELED), np.int32), bert, MAX_LENGTH)
    np.testing.assert_array_equal(ours.input_ids, theirs.input_ids)
    assert (ours.input_ids[:, 0] == bert.cls_token_id).all()
    _, (report,) = evaluate_run(bert_kd.dir / "student", ["in_domain"], limit=8)
    assert report.rows == 8 and np.isfinite(report.loss)


def test_bert_teacher_refuses_augment_and_pairs_in_one_line(bert_kd):
    """Refused, not run wrong: augmentation (GPT-2's mask token) and sentence pairs (the teacher would not get
    BERT's token_type_ids)."""
    from dataclasses import replace

    from lora_kd_jax.distill.teacher import in_teacher_vocabulary, teacher_runs

    cfg = bert_kd.student_cfg
    augmented = replace(cfg, distill=replace(cfg.distill, augment=2, unlabeled=""))
    with pytest.raises(ConfigError, match="distill.augment=2 with a bert teacher"):
        in_teacher_vocabulary(augmented, teacher_runs(augmented))
    pairs = replace(cfg, data=replace(cfg.data, text_pair="sentence2"))
    with pytest.raises(ConfigError, match="data.text_pair=sentence2 with a bert teacher"):
        in_teacher_vocabulary(pairs, teacher_runs(pairs))


def test_embeddings_teacher_takes_the_bert_word_embeddings(bert_kd):
    """student.embeddings=teacher starts from BERT's embeddings.word_embeddings (copied at the teacher's width)."""
    from dataclasses import replace

    from safetensors.numpy import load_file

    from lora_kd_jax.distill.embeddings import student_embedding
    from lora_kd_jax.distill.teacher import in_teacher_vocabulary, restore_teachers, teacher_runs

    cfg = bert_kd.student_cfg
    cfg = replace(cfg, student=replace(cfg.student, embeddings="teacher", embed_dim=64))
    infos = teacher_runs(cfg)
    cfg = in_teacher_vocabulary(cfg, infos)
    table = student_embedding(cfg, restore_teachers(infos, cfg))
    saved = load_file(str(bert_kd.dir / "ckpt" / "model.safetensors"))["bert.embeddings.word_embeddings.weight"]
    np.testing.assert_array_equal(table, saved)
