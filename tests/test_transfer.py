"""The transfer set (Tang et al. 2019) and the MSE distillation loss: each augmentation operator on fixed inputs, the
word classes, a reproducible transfer set, its teacher logits cached on disk and equal to the teacher's on each
sentence, seeds and resume with augmentation, and the logit MSE against PyTorch."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from lora_kd_jax.models.tokenizers import tokenizer_for
from lora_kd_jax.core.config import ConfigError
from lora_kd_jax.data import augment as A
from lora_kd_jax.data import batch_sources, load_splits, load_tokenizer
from lora_kd_jax.distill import losses
from lora_kd_jax.distill import trainer as distill
from lora_kd_jax.distill import transfer
from lora_kd_jax.distill.teacher import logits_fingerprint, restore_teacher
from lora_kd_jax.models.students.build import build_student
from lora_kd_jax.training import finetune

from tiny import PAD_ID, assert_resumed, latest_step, log_messages, tiny_config

try:  # the test extra: only the tests that compare with PyTorch need it
    import torch
    F = torch.nn.functional
except ImportError:
    torch = F = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the `test` extra) is not installed")

# cat's class: dog (count 3) is the only word it can become (fox has count 0); sat <-> ran; 'the' is alone
CLASSES = A.WordClasses({"cat": 0, "dog": 0, "fox": 0, "sat": 1, "ran": 1, "the": 2},
                        [["cat", "dog", "fox"], ["sat", "ran"], ["the"]],
                        [np.array([1.0, 3.0, 0.0]), np.array([2.0, 2.0]), np.array([5.0])])
SENTENCE = "The cat sat on the mat.".split()
M = A.MASK


# ------------------------------------------------------------------------------------- the operators


def test_masking_follows_one_uniform_draw_per_word():
    """p_swap=0: word i is masked exactly when the i-th draw of the seeded Generator is below p_mask."""
    for seed in range(5):
        draws = np.random.default_rng(seed).random(len(SENTENCE))
        expected = [M if x < 0.4 else w for x, w in zip(draws, SENTENCE)]
        assert A.mask_or_swap(SENTENCE, np.random.default_rng(seed), CLASSES, 0.4, 0.0) == expected
    assert A.mask_or_swap(SENTENCE, np.random.default_rng(0), CLASSES, 0.0, 0.0) == SENTENCE


def test_mask_or_swap_on_fixed_inputs():
    """Seeded, exact: draws below 0.3 mask, 0.3-0.6 swap within the class (punctuation and capital kept), else keep."""
    cases = {1: ["The", "cat", M, "on", "the", "mat."],
             6: ["The", "dog", "ran", "on", "the", "mat."],  # two swaps: cat -> dog, sat -> ran
             20: [M, "dog", "ran", M, M, "mat."]}
    for seed, expected in cases.items():
        assert A.mask_or_swap(SENTENCE, np.random.default_rng(seed), CLASSES, 0.3, 0.3) == expected, seed


def test_swap_keeps_the_words_affixes_and_class_and_draws_by_unigram_count():
    rng = np.random.default_rng(0)
    assert A.swap_word("(Cat),", rng, CLASSES) == "(Dog),"  # fox has count 0: never drawn
    assert A.swap_word("the", rng, CLASSES) == "the"  # alone in its class
    assert A.swap_word("mat.", rng, CLASSES) == "mat."  # no class: unknown to the training set
    three = A.WordClasses({"a": 0, "b": 0, "c": 0}, [["a", "b", "c"]], [np.array([5.0, 1.0, 3.0])])
    drawn = [A.swap_word("a", rng, three) for _ in range(4000)]
    assert set(drawn) == {"b", "c"}  # never the word itself
    assert drawn.count("c") / len(drawn) == pytest.approx(0.75, abs=0.03)  # 3 : 1, renormalised without 'a'


def test_ngram_sampling_on_fixed_inputs():
    rng = np.random.default_rng(7)
    got = [A.sample_ngram(list("abcdefg"), rng) for _ in range(4)]
    assert got == [list("bcdef"), list("defg"), list("def"), list("abcde")]
    rng = np.random.default_rng(1)
    ns = []
    for _ in range(3000):
        g = A.sample_ngram(list("abcdefg"), rng)
        assert "".join(g) in "abcdefg"  # contiguous
        ns.append(len(g))
    assert np.bincount(ns, minlength=6)[1:] / len(ns) == pytest.approx([0.2] * 5, abs=0.03)  # n uniform in 1..5
    assert A.sample_ngram(["only", "two"], np.random.default_rng(3)) in (["only"], ["two"], ["only", "two"])
    assert A.sample_ngram([], rng) == []


def test_augment_masks_or_swaps_each_word_then_samples_an_ngram_at_tangs_rates():
    words = ["cat"] * 20000  # every swap of 'cat' gives 'dog'
    rng = np.random.default_rng(0)
    out = A.mask_or_swap(words, rng, CLASSES, 0.1, 0.2)
    assert out.count(M) / len(out) == pytest.approx(0.1, abs=0.01)
    assert out.count("dog") / len(out) == pytest.approx(0.2, abs=0.01)
    n_gram = sum(len(A.augment_words(SENTENCE, rng, CLASSES, 0.0, 0.0, 0.25)) < 6 for _ in range(4000))
    assert n_gram / 4000 == pytest.approx(0.25, abs=0.02)  # any n in 1..5 shortens a 6-word sentence
    assert A.augment_words(SENTENCE, np.random.default_rng(2), CLASSES, 1.0 - 1e-9, 0.0, 1.0) in (
        [[M] * n for n in range(1, 6)])  # mask first, then the n-gram of the masked sentence


def test_mask_is_one_gpt2_id_in_place_of_the_word():
    tok = load_tokenizer("")
    assert A.mask_token(tok) == M and transfer.template_sizes(tok) == (0, 0)  # GPT-2 adds no special token
    words = "Our friends won't buy this analysis.".split()
    for i in range(len(words)):
        masked = [M if j == i else w for j, w in enumerate(words)]
        pieces = [tok((" " if j else "") + w)["input_ids"] for j, w in enumerate(words)]
        expected = [t for j, p in enumerate(pieces) for t in ([PAD_ID] if j == i else p)]
        assert tok(A.render(masked))["input_ids"] == expected, A.render(masked)


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    """BERT's kind of tokenizer: WordPiece trained on CoLA (tests/tiny_families.py), [CLS] ... [SEP] added."""
    from tiny_families import train_tokenizer

    from tiny_families import family_tokenizer as load_family_tokenizer

    d = tmp_path_factory.mktemp("wordpiece")
    train_tokenizer("bert", d)
    return load_family_tokenizer(str(d), "bert")


def test_augmentation_in_a_wordpiece_vocabulary_on_fixed_inputs(wordpiece):
    """A BERT teacher's rows: decoded with its tokenizer without [CLS] / [SEP] (lowercased, as WordPiece reads
    them), masked with its [MASK], which encodes to one id in place of the word's pieces; mask-or-swap and whole
    copies exact for fixed seeds."""
    from lora_kd_jax.data import encode

    tok = wordpiece
    sentences = ["The cat sat on the mat.", "John seems to be happy.", "A dog ran on the mat."]
    rows = encode(sentences, np.zeros(3, np.int32), tok, 20)
    texts = transfer.decoded_texts(rows, tok)
    assert texts == ["the cat sat on the mat.", "john seems to be happy.", "a dog ran on the mat."]
    mask = A.mask_token(tok)
    assert mask == "[MASK]" and transfer.template_sizes(tok) == (1, 1)
    words = texts[0].split()
    pieces = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    for i in range(len(words)):
        masked = [mask if j == i else w for j, w in enumerate(words)]
        expected = [t for j, p in enumerate(pieces) for t in ([tok.mask_token_id] if j == i else p)]
        assert tok(A.render(masked, mask))["input_ids"] == [tok.cls_token_id, *expected, tok.sep_token_id]
    cases = {1: ["the", "cat", mask, "on", "the", "mat."],  # the draws of test_mask_or_swap_on_fixed_inputs
             6: ["the", "dog", "ran", "on", "the", "mat."],
             20: [mask, "dog", "ran", mask, mask, "mat."]}
    for seed, expected in cases.items():
        assert A.mask_or_swap(words, np.random.default_rng(seed), CLASSES, 0.3, 0.3, mask) == expected, seed
    made = A.augment(texts, 2, seed=0, p_mask=0.3, p_swap=0.3, p_ngram=0.3, classes=CLASSES, mask=mask)
    assert made.sentences == ["the[MASK][MASK][MASK] the mat.", "the dog sat[MASK] the[MASK]", "[MASK]",
                              "john seems to be happy.", "a dog ran on[MASK] mat.", "a cat ran on the mat."]
    assert made.unchanged == 1
    ids = tok(made.sentences[1])["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "the", "do", "##g", "sa", "##t", "[MASK]", "the", "[MASK]",
                                              "[SEP]"]


def test_word_classes_group_words_by_their_neighbours():
    corpus = ["the cat sleeps", "the dog sleeps", "a cat runs", "a dog runs", "the bird runs", "a bird sleeps"] * 3
    c = A.word_classes(corpus, n_classes=3, n_context=8)
    assert c.of["cat"] == c.of["dog"] == c.of["bird"]
    assert c.of["the"] == c.of["a"] and c.of["sleeps"] == c.of["runs"]
    assert len({c.of["cat"], c.of["the"], c.of["runs"]}) == 3
    again = A.word_classes(corpus, n_classes=3, n_context=8)  # deterministic
    assert (again.of, again.words) == (c.of, c.words)


def test_augment_is_reproducible_and_counts_unchanged_copies():
    sentences = ["The cat sat on the mat.", "A dog ran.", "The bird sat."]
    a = A.augment(sentences, 5, seed=3, p_mask=0.2, p_swap=0.2, p_ngram=0.3)
    assert a.sentences == A.augment(sentences, 5, seed=3, p_mask=0.2, p_swap=0.2, p_ngram=0.3).sentences
    assert a.sentences != A.augment(sentences, 5, seed=4, p_mask=0.2, p_swap=0.2, p_ngram=0.3).sentences
    assert a.source.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert a.unchanged == sum(s == sentences[i] for s, i in zip(a.sentences, a.source))
    assert A.augment(sentences, 2, seed=0, p_mask=0.0, p_swap=0.0, p_ngram=0.0).unchanged == 6


def test_unlabeled_file_counts_blank_lines(tmp_path):
    path = tmp_path / "more.txt"
    path.write_text("First sentence.\n\n  Second one. \n   \nThird\n")
    assert A.read_unlabeled(path) == (["First sentence.", "Second one.", "Third"], 2)
    with pytest.raises(A.DataError, match="distill.unlabeled=.*no such file"):
        A.read_unlabeled(tmp_path / "nope.txt")


# -------------------------------------------------------------------------------------------- the losses


@needs_torch
@pytest.mark.parametrize("n_classes", [2, 5])
def test_logit_mse_value_and_gradient_match_torch(n_classes):
    rng = np.random.default_rng(n_classes)
    s = rng.normal(0, 3, (16, n_classes)).astype(np.float32)
    t = rng.normal(0, 3, (16, n_classes)).astype(np.float32)
    y = rng.integers(0, n_classes, 16).astype(np.int32)
    w = np.ones(16, np.float32)
    for alpha in (0.0, 0.5):
        s_t = torch.tensor(s, requires_grad=True)
        expected = F.mse_loss(s_t, torch.tensor(t), reduction="sum") / 16 + alpha * F.cross_entropy(
            s_t, torch.tensor(y, dtype=torch.long))
        expected.backward()
        value, grad = jax.value_and_grad(lambda x: losses.kd_objective(x, t, y, w, 2.0, alpha, "mse")[0])(s)
        assert abs(float(value) - expected.item()) < 1e-5 * expected.item()
        np.testing.assert_allclose(grad, s_t.grad.numpy(), atol=1e-6)
    padded = losses.logit_mse(np.concatenate([s, s + 100]), np.concatenate([t, t]),
                              np.concatenate([w, np.zeros(16, np.float32)]))
    np.testing.assert_allclose(padded[0], losses.logit_mse(s, t)[0], rtol=1e-6)  # padding rows count nowhere


def test_regression_distils_by_squared_error_whichever_loss_is_named():
    s, t = np.array([[0.5], [2.0]], np.float32), np.array([[1.5], [1.0]], np.float32)
    w, y = np.ones(2, np.float32), np.zeros(2, np.float32)
    for loss in ("kl", "mse"):
        assert float(losses.kd_objective(s, t, y, w, 2.0, 0.0, loss)[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("overrides, message", [
    (["distill.loss=l1"], "distill.loss: 'l1' is not one of kl, mse"),
    (["distill.p_mask=0.6", "distill.p_swap=0.6"], "exceeds 1"),
    (["distill.augment=2", "data.text_pair=sentence2"], "single sentences"),
    (["distill.augment=2", "distill.cache_teacher_logits=false"], "labels the transfer set once"),
    (["distill.augment=-1"], "distill.augment: must be >= 0"),
])
def test_bad_transfer_settings_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


# ------------------------------------------------------------------- the transfer set in a distillation

COMMON = ("data.limit=48", "data.max_length=16", "model.n_positions=64", "train.batch_size=16", "train.epochs=1",
          "student.embed_dim=16", "student.hidden_dim=16")
AUGMENT = ("distill.augment=2", "distill.augment_seed=5", "distill.loss=mse")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Tiny LoRA teachers (one layer), seeds 0 and 1, on the first 48 CoLA sentences (one epoch: what they know
    does not matter here): student seed k learns from teacher seed k, each labelling the transfer set itself."""
    run = tmp_path_factory.mktemp("teacher")
    finetune.train_lora(tiny_config(*COMMON, "model.n_layer=1", "lora.targets=attn.c_attn", "train.seeds=[0,1]",
                                    f"run.dir={run}"), progress=False)
    return run


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "unlabeled.txt"
    path.write_text("The teacher labels this one.\n\nAnd this one too, a longer sentence than most of CoLA's.\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir, unlabeled):
    """Seeds [0, 1] at once on the augmented set, one epoch, then resumed for a second."""
    root = tmp_path_factory.mktemp("students")
    extra = (*COMMON, *AUGMENT, f"distill.unlabeled={unlabeled}", f"distill.teacher={teacher_dir}", "train.seeds=[0,1]")
    seeded = distill.distill(tiny_config(*extra, f"run.dir={root / 'seeded'}"), progress=False)
    first = json.loads((root / "seeded" / "metrics.json").read_text())
    first_seed1 = json.loads((root / "seeded" / "seed_1" / "metrics.json").read_text())
    one_epoch, since = latest_step(root / "seeded"), (root / "seeded" / "log.txt").stat().st_size
    distill.distill(tiny_config(*extra, "train.epochs=2", f"run.dir={root / 'seeded'}"), resume=True, progress=False)
    assert_resumed(log_messages(root / "seeded", since), from_step=one_epoch, to_step=2 * one_epoch)
    return {"root": root, "seeded": seeded, "first": first, "first_seed1": first_seed1, "extra": extra}


def test_transfer_set_is_the_training_rows_then_their_copies_then_the_file(teacher_dir, unlabeled, runs):
    cfg = tiny_config(*runs["extra"])
    train = load_splits(cfg, tokenizer_for(cfg)).encoded["train"]
    t = transfer.build_transfer_set(cfg, train)
    again = transfer.build_transfer_set(cfg, train)
    np.testing.assert_array_equal(t.split.input_ids, again.split.input_ids)  # reproducible
    assert len(t.split) == 48 * 3 + 2 and t.n_train == 48
    np.testing.assert_array_equal(t.split.input_ids[:48], train.input_ids)
    np.testing.assert_array_equal(t.split.labels[:48], train.labels)
    r = t.report
    assert (r["size"], r["train"], r["augmented"], r["unlabeled"], r["unlabeled_blank_lines"]) == (146, 48, 96, 2, 1)
    tok = load_tokenizer("")
    texts = transfer.decoded_texts(t.split, tok)
    assert texts[-2] == "The teacher labels this one."
    assert any(A.MASK in s for s in texts[48:144]) and texts[48:144] != [texts[i // 2] for i in range(96)]
    other = transfer.build_transfer_set(tiny_config(*runs["extra"], "distill.augment_seed=6"), train)
    assert not np.array_equal(other.split.input_ids, t.split.input_ids)  # the seed decides the copies


def test_cached_teacher_logits_equal_the_teacher_on_each_sentence(teacher_dir, runs):
    cfg = tiny_config(*runs["extra"])
    t = transfer.build_transfer_set(cfg, load_splits(cfg, tokenizer_for(cfg)).encoded["train"])
    labelling = runs["seeded"]["transfer_set"]["teacher_labelling"]
    assert len({labelling[f"seed_{k}"]["file"] for k in (0, 1)}) == 2  # one file per teacher
    files = [Path(labelling["seed_1"]["file"])]
    cached = np.load(files[0])
    teacher = restore_teacher(str(teacher_dir / "seed_1"), cfg)
    one_by_one = np.concatenate([np.asarray(teacher.logits(t.split.input_ids[i:i + 1], t.split.attention_mask[i:i + 1]))
                                 for i in range(len(t.split))])
    print(f"cached vs one sentence at a time: max |d| {np.max(np.abs(cached - one_by_one)):.1e} over {len(cached)} rows")
    np.testing.assert_allclose(cached, one_by_one, atol=5e-6)
    assert files[0].stem == logits_fingerprint(teacher, t.split, 16)
    other = transfer.build_transfer_set(tiny_config(*runs["extra"], "distill.augment_seed=6"), t.split)
    assert len({logits_fingerprint(teacher, t.split, 16), logits_fingerprint(teacher, t.split, 8),
                logits_fingerprint(teacher, other.split, 16)}) == 3  # other rows, other batches: never served stale
    labels = transfer.teacher_labels(t, cached)
    assert (labels[48:] == np.argmax(cached[48:], -1)).all() and (labels[:48] == t.split.labels[:48]).all()


def test_one_transfer_set_for_every_seed_and_a_resume_reuses_its_logits(runs):
    """The set never depends on train.seed (so seed k of a seeded run, which is the single run with train.seed=k:
    tests/test_seeds.py, sees the single run's set); a resume rebuilds it and reads its logits back."""
    cfg = tiny_config(*runs["extra"])
    train = load_splits(cfg, tokenizer_for(cfg)).encoded["train"]
    sets = [transfer.build_transfer_set(tiny_config(*runs["extra"], f"train.seed={k}", "train.seeds=[]"), train)
            for k in (0, 1, 7)]
    for other in sets[1:]:
        np.testing.assert_array_equal(other.split.input_ids, sets[0].split.input_ids)
    root = runs["root"] / "seeded"
    for k in (0, 1):
        assert json.loads((root / f"seed_{k}" / "metrics.json").read_text())["epochs"][0]["train"]["count"] == 146
    made = runs["first"]["summary"]["transfer_set"]
    resumed = json.loads((root / "metrics.json").read_text())
    after = resumed["summary"]["transfer_set"]
    for k in ("seed_0", "seed_1"):
        assert made["teacher_labelling"][k]["reused"] is False
        assert after["teacher_labelling"][k]["reused"] is True  # read back, not recomputed
        assert after["teacher_labelling"][k]["file"] == made["teacher_labelling"][k]["file"]
    assert {k: v for k, v in after.items() if k not in ("build_seconds", "teacher_labelling")} == {
        k: v for k, v in made.items() if k not in ("build_seconds", "teacher_labelling")}
    seed1 = json.loads((root / "seed_1" / "metrics.json").read_text())["epochs"]
    assert len(seed1) == 2 and seed1[0] == runs["first_seed1"]["epochs"][0]
    assert seed1[1]["train"]["loss"] != seed1[0]["train"]["loss"]  # the second epoch trained on


def test_each_student_seed_trains_on_its_own_teachers_labels(runs, teacher_dir):
    """The task a seeded teacher builds: seed k's batch labels are gold on training rows and teacher k's argmax on
    the added rows (the logits read from the run's cache), and its step's loss is distill.loss=mse's."""
    cfg = tiny_config(*runs["extra"], f"run.dir={runs['root'] / 'seeded'}")
    splits = load_splits(cfg, tokenizer_for(cfg)).encoded
    teachers = {k: restore_teacher(str(teacher_dir / f"seed_{k}"), cfg) for k in (0, 1)}
    task = distill.build_distill_task(cfg, splits, teachers)
    assert all(v["reused"] for v in task.info["transfer_set"]["teacher_labelling"].values())
    logits = np.asarray(task.consts["teacher_logits"])  # [seed, row, class]
    batch = next(iter(task.train_batches(0, 0)))
    for k in (0, 1):
        index = batch["index"][k]
        expected = np.where(index < 48, splits["train"].labels[np.minimum(index, 47)],
                            np.argmax(logits[k][index], -1))
        np.testing.assert_array_equal(batch["labels"][k], expected)
    added = np.arange(48, 146)
    assert (np.argmax(logits[0][added], -1) != np.argmax(logits[1][added], -1)).any()  # two teachers, two labellings
    # the step minimises distill.loss=mse: each seed's loss sum is the squared logit distance of its rows
    student, _ = build_student(cfg, jax.random.key(0), shapes_only=True)
    params = jax.tree.map(np.array, task.state.trainable)  # host copy: the step donates the state
    _, sums = task.train_step(task.state, task.consts, task.put_batch(batch))
    for k in (0, 1):
        s = np.asarray(student.logits(jax.tree.map(lambda x: x[k], params), batch["input_ids"][k],
                                      batch["attention_mask"][k], deterministic=True))
        expected = np.sum(batch["weights"][k][:, None] * (s - logits[k][batch["index"][k]]) ** 2)
        np.testing.assert_allclose(np.asarray(sums["loss_sum"])[k], expected, rtol=1e-5)


def test_each_seed_may_get_its_own_training_labels():
    from lora_kd_jax.data import EncodedSplit

    split = EncodedSplit(np.ones((4, 3), np.int32), np.ones((4, 3), np.int32), np.zeros(4, np.int32), 0)
    cfg = tiny_config("train.seeds=[0,1]", "train.batch_size=4", "train.eval_batch_size=4")
    own = {0: np.array([0, 0, 0, 0], np.int32), 1: np.array([1, 1, 1, 1], np.int32)}
    batch = next(batch_sources({"train": split, "validation": split}, cfg, own).train(0, 0))
    assert batch["labels"].tolist() == [[0] * 4, [1] * 4]


def test_metrics_json_reports_how_the_transfer_set_was_made(runs):
    s = runs["seeded"]
    made = s["transfer_set"]
    assert (made["size"], made["train"], made["augmented"], made["unlabeled"]) == (146, 48, 96, 2)
    assert made["augment"] == 2 and made["augment_seed"] == 5 and made["mask_token"] == A.MASK
    assert Path(made["teacher_labelling"]["seed_0"]["file"]).parent == runs["root"] / "seeded" / transfer.LOGITS_DIR
