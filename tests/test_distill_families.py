"""Distillation from a BERT, RoBERTa, Llama, Qwen3 or ModernBERT teacher (issue #24): the student reads the teacher's
tokenizer and vocabulary, on single sentences (with an augmented transfer set) and on BERT's sentence pairs (token
types).

One tiny checkpoint per family (`tiny_families`), a one-epoch LoRA run on it, and a one-epoch distillation into the
RNN student: BERT over the training rows, two augmented copies of each and a few unlabeled sentences; BERT again on
a sentence-pair task; RoBERTa, Llama, Qwen3 and ModernBERT over the training rows and one augmented copy of each (so
every teacher's logits are kept on disk, where the tests read them).
"""
from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest

pytest.importorskip("torch")
from tiny import NO_PLOTS, XLA_CACHE  # noqa: E402
from tiny_families import save_checkpoint  # noqa: E402

from lora_kd_jax.models.tokenizers import tokenizer_for
from lora_kd_jax.core.config import load_config  # noqa: E402
from lora_kd_jax.data.cola import read_cola_tsv  # noqa: E402
from lora_kd_jax.assets import COLA_DIR  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")

LOGITS_ATOL = 5e-6  # test_families' FORWARD_ATOL: one eval forward against another
ROWS, MAX_LENGTH = 16, 20
UNLABELED = ["The cat sat on the mat.", "Mat the on sat cat the.", "John seems to be happy."]
COMMON = [f"data.max_length={MAX_LENGTH}", "train.batch_size=8", "train.epochs=1", "train.eval_batch_size=8",
          XLA_CACHE, NO_PLOTS]
STUDENT = ["student.embed_dim=16", "student.hidden_dim=16", "student.pooling=last_token"]
AUGMENT = ["distill.augment_seed=3", "distill.p_mask=0.3", "distill.p_swap=0.2"]


def cola(n: int = ROWS, start: int = 0) -> list[str]:
    return read_cola_tsv(COLA_DIR / "in_domain_train.tsv")[0][start:start + n]


def teacher_and_student(d, family: str, data: list[str], student: list[str], ckpt=None):
    """A one-epoch LoRA run in d/teacher on `ckpt` (else `family`'s tiny checkpoint, saved in d/ckpt), and a
    student distilled from it in d/student; returns the student's config."""
    from lora_kd_jax.distill.trainer import distill
    from lora_kd_jax.training.finetune import train_lora

    if ckpt is None:
        ckpt = d / "ckpt"
        save_checkpoint(family, ckpt)
    teacher = load_config(None, [f"model.path={ckpt}", "lora.rank=4", *COMMON, *data, f"run.dir={d / 'teacher'}"])
    train_lora(teacher, progress=False)
    cfg = load_config(None, [f"distill.teacher={d / 'teacher'}", *STUDENT, *COMMON, *data, *student,
                             f"run.dir={d / 'student'}"])
    distill(cfg, progress=False)
    return cfg


def transfer_sentences(kd, copies: int, unlabeled: list[str]) -> tuple[list[str], str]:
    """The transfer set's sentences made anew from the CoLA rows with the teacher's tokenizer (`augment` on the
    rows decoded, as the run makes them), and the mask token; checks that the rows not cut decode to their CoLA
    sentence (lowercased for BERT's uncased WordPiece) and that each mask written encodes to one mask id."""
    from lora_kd_jax.data import augment as A
    from lora_kd_jax.data.encoding import encode
    from tiny_families import family_tokenizer as load_family_tokenizer
    from lora_kd_jax.distill.transfer import decoded_texts

    tok = load_family_tokenizer(str(kd.dir / "ckpt"), kd.family)
    rows = encode(cola(), np.zeros(ROWS, np.int32), tok, MAX_LENGTH)
    d = kd.cfg.distill
    mask = A.mask_token(tok)
    texts = decoded_texts(rows, tok)
    whole = [i for i in range(ROWS) if not rows.truncated_rows[i]]
    case = str.lower if kd.family == "bert" else str
    assert len(whole) >= ROWS // 4 and all(texts[i].replace(" ' ", "'") == case(cola()[i]) for i in whole), texts
    made = A.augment(texts, copies, d.augment_seed, p_mask=d.p_mask, p_swap=d.p_swap, p_ngram=d.p_ngram, mask=mask)
    mask_id = tok.convert_tokens_to_ids(mask)
    assert all(tok(s)["input_ids"].count(mask_id) == s.count(mask) for s in made.sentences)
    return cola() + made.sentences + unlabeled, mask


def cached_and_report(kd) -> tuple[np.ndarray, dict]:
    (cached,) = (kd.dir / "student" / "teacher_logits").glob("*.npy")
    summary = json.loads((kd.dir / "student" / "metrics.json").read_text())["summary"]
    return np.load(cached), summary["transfer_set"]


@pytest.fixture(scope="module")
def bert_kd(tmp_path_factory):
    """A BERT LoRA teacher run and a student distilled from it on an augmented transfer set with an unlabeled file
    (student.vocab_size left at GPT-2's 50257)."""
    d = tmp_path_factory.mktemp("kd_bert")
    (d / "unlabeled.txt").write_text("\n".join(UNLABELED) + "\n")
    cfg = teacher_and_student(d, "bert", [f"data.limit={ROWS}"],
                              ["distill.augment=2", *AUGMENT, f"distill.unlabeled={d / 'unlabeled.txt'}"])
    return types.SimpleNamespace(dir=d, cfg=cfg, family="bert")


def test_bert_teacher_labels_an_augmented_transfer_set_as_its_evaluation(bert_kd):
    """The teacher logits kept for the transfer set (training rows, two augmented copies of each masked with BERT's
    [MASK], the unlabeled sentences) are the teacher run's own predictions on those sentences (evaluation.Predictor:
    its tokenizer, pad id, [CLS] pooling), and metrics.json reports the set's size."""
    from lora_kd_jax.commands.evaluation import Predictor

    logits, report = cached_and_report(bert_kd)
    sentences, mask = transfer_sentences(bert_kd, 2, UNLABELED)
    assert mask == "[MASK]" and report["mask_token"] == "[MASK]"
    assert sum(mask in s for s in sentences[ROWS:3 * ROWS]) >= ROWS // 2  # p_mask=0.3: most copies hold one
    assert (report["size"], report["train"], report["augmented"], report["unlabeled"]) == (
        ROWS * 3 + len(UNLABELED), ROWS, 2 * ROWS, len(UNLABELED))
    expected = Predictor.from_run(bert_kd.dir / "teacher").logits(sentences)
    assert logits.shape == (len(sentences), 2)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGITS_ATOL)


def test_student_reads_the_bert_teachers_token_ids_and_evaluates(bert_kd):
    """The student run encodes with the teacher's tokenizer (its input ids are the BERT tokenizer's), its
    embedding has the teacher's vocabulary rows, and `evaluate` scores it."""
    from lora_kd_jax.commands.evaluation import Predictor, evaluate_run
    from lora_kd_jax.data.encoding import encode
    from tiny_families import family_tokenizer as load_family_tokenizer

    student = Predictor.from_run(bert_kd.dir / "student")
    bert = load_family_tokenizer(str(bert_kd.dir / "ckpt"), "bert")
    assert student.run.params["embed"]["embedding"].shape[0] == len(bert)
    ours = student.encode(UNLABELED)
    theirs = encode(UNLABELED, np.zeros(len(UNLABELED), np.int32), bert, MAX_LENGTH)
    np.testing.assert_array_equal(ours.input_ids, theirs.input_ids)
    assert (ours.input_ids[:, 0] == bert.cls_token_id).all()
    _, (report,) = evaluate_run(bert_kd.dir / "student", ["in_domain"], limit=8)
    assert report.rows == 8 and np.isfinite(report.loss)


def test_embeddings_teacher_takes_the_bert_word_embeddings(bert_kd):
    """student.embeddings=teacher starts from BERT's embeddings.word_embeddings (copied at the teacher's width)."""
    from safetensors.numpy import load_file

    from lora_kd_jax.distill.embeddings import student_embedding
    from lora_kd_jax.distill.teacher import in_teacher_vocabulary, restore_teachers, teacher_runs

    cfg = bert_kd.cfg
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, embeddings="teacher", embed_dim=64))
    infos = teacher_runs(cfg)
    cfg = in_teacher_vocabulary(cfg, infos)
    table = student_embedding(cfg, restore_teachers(infos, cfg))
    saved = load_file(str(bert_kd.dir / "ckpt" / "model.safetensors"))["bert.embeddings.word_embeddings.weight"]
    np.testing.assert_array_equal(table, saved)


# ------------------------------------------------------------------------------ BERT on sentence pairs


@pytest.fixture(scope="module")
def bert_pairs_kd(tmp_path_factory, bert_kd):
    """A BERT teacher (bert_kd's checkpoint) trained on a sentence-pair task (JSONL, CoLA sentences paired), and a
    student distilled from it on the same pairs."""
    d = tmp_path_factory.mktemp("kd_bert_pairs")
    files = {}
    for split, (n, start) in {"train": (ROWS, 0), "validation": (8, 100)}.items():
        first, second = cola(n, start), cola(n, start + 50)
        files[split] = d / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"premise": a, "hypothesis": b, "label": i % 2}) + "\n"
                                        for i, (a, b) in enumerate(zip(first, second))))
    data = [f"data.train={files['train']}", f"data.validation={files['validation']}", "data.text=premise",
            "data.text_pair=hypothesis", "data.limit=0"]
    cfg = teacher_and_student(d, "bert", data, [], ckpt=bert_kd.dir / "ckpt")
    return types.SimpleNamespace(dir=d, cfg=cfg, family="bert")


def test_bert_teacher_reads_the_token_types_of_pairs(bert_pairs_kd):
    """Distillation on BERT's sentence pairs: the teacher logits the student learns from (cached, and the uncached
    teacher's forward in the objective) are the teacher run's own predictions on those pairs (Predictor, which
    reads the token types as PyTorch does: tests/test_families.py), and differ from a forward without them."""
    import jax

    from lora_kd_jax import data as data_lib
    from lora_kd_jax.commands.evaluation import Predictor
    from lora_kd_jax.distill import losses
    from lora_kd_jax.distill.teacher import (in_teacher_vocabulary, restore_teachers, teacher_logits_for,
                                             teacher_runs)

    kd = bert_pairs_kd
    assert json.loads((kd.dir / "student" / "metrics.json").read_text())["epochs"]  # the student trained
    cfg = data_lib.resolve_task(kd.cfg)
    infos = teacher_runs(cfg)
    cfg = in_teacher_vocabulary(cfg, infos)
    teacher = restore_teachers(infos, cfg)
    train = data_lib.load_splits(cfg, tokenizer_for(cfg)).encoded["train"]
    assert train.token_type_ids is not None and (train.token_type_ids == 1).any(axis=1).all()
    cached = np.asarray(teacher_logits_for(teacher, train, cfg.train.batch_size))
    predictor = Predictor.from_run(kd.dir / "teacher")
    expected = predictor.score(predictor.encode(cola(), pairs=cola(ROWS, 50)))[0]
    np.testing.assert_allclose(cached, expected, rtol=0, atol=LOGITS_ATOL)
    untyped = np.asarray(teacher_logits_for(teacher, dataclasses.replace(train, token_type_ids=None), 8))
    assert np.abs(untyped - expected).max() > 20 * LOGITS_ATOL  # the types matter: this test can fail
    # the uncached teacher (distill.cache_teacher_logits=false) runs in the objective on the batch's token types:
    # against a student whose logits are the expected ones, its squared logit distance is within the tolerance
    batch = teacher.placement.put_batch(next(data_lib.batch_iterator(train, 8, shuffle=False)))
    objective = jax.jit(losses.teacher_objective(2.0, 0.0, teacher.model, loss="mse"))
    mean, _ = objective(expected[:8], {"teacher": teacher.params}, batch)
    assert float(mean) <= 2 * LOGITS_ATOL ** 2, float(mean)  # without the types: about 4e-7


# ------------------------------------------------------------------------------ RoBERTa, Llama, Qwen3, ModernBERT

MASKS = {"roberta": "<mask>", "llama": "<unk>", "qwen3": "<|endoftext|>", "modernbert": "[MASK]"}


@pytest.fixture(scope="module", params=list(MASKS))
def family_kd(request, tmp_path_factory):
    """A RoBERTa, Llama, Qwen3 or ModernBERT LoRA teacher and a student distilled from it over the training rows and
    one augmented copy of each."""
    d = tmp_path_factory.mktemp(f"kd_{request.param}")
    cfg = teacher_and_student(d, request.param, [f"data.limit={ROWS}"], ["distill.augment=1", *AUGMENT])
    return types.SimpleNamespace(dir=d, cfg=cfg, family=request.param)


def test_roberta_and_llama_teachers_label_the_transfer_set_as_their_evaluation(family_kd):
    """RoBERTa (masking with <mask>), Llama (no mask token: <unk>), Qwen3 (neither: <|endoftext|>, its tokenizer
    class's unknown-word token) and ModernBERT ([MASK]) teach like BERT: the cached logits on the training rows and
    their augmented copies are the teacher run's own predictions, and the student has the teacher's vocabulary."""
    from lora_kd_jax.commands.evaluation import Predictor

    logits, report = cached_and_report(family_kd)
    sentences, mask = transfer_sentences(family_kd, 1, [])
    assert mask == MASKS[family_kd.family] == report["mask_token"]
    assert any(mask in s for s in sentences[ROWS:]) and report["size"] == 2 * ROWS
    expected = Predictor.from_run(family_kd.dir / "teacher").logits(sentences)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGITS_ATOL)
    student = Predictor.from_run(family_kd.dir / "student")
    assert student.tokenizer.mask_token == {"roberta": "<mask>", "modernbert": "[MASK]"}.get(family_kd.family)
    assert student.run.params["embed"]["embedding"].shape[0] == len(student.tokenizer)
