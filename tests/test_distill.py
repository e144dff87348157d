"""Distillation: the KD loss and 20 Adam steps against PyTorch, knowledge transfer from a fine-tuned tiny teacher,
teacher-logit caching, and the teacher checks that fail before training."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_kd_jax.distill import trainer as distill
from lora_kd_jax.runs import rundir
from lora_kd_jax.runs import reader as runs
from lora_kd_jax.training import finetune
from lora_kd_jax.core.config import load_config
from lora_kd_jax.data import PAD_ID, EncodedSplit, batch_iterator
from lora_kd_jax.training.loop import RunOptions, run_epochs
from lora_kd_jax.models.students.build import build_student, make_student
from lora_kd_jax.distill import losses
from lora_kd_jax.distill.teacher import restore_teacher
from lora_kd_jax.training.state import train_state
from lora_kd_jax.training.steps import make_train_step

from tiny import NO_PLOTS, XLA_CACHE, config_only_run

try:  # the test extra: only the tests that compare with PyTorch need it
    import torch
    F = torch.nn.functional
except ImportError:
    torch = F = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch (the `test` extra) is not installed")

TEACHER_OVERRIDES = ["model.name=custom", "model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
                     "model.n_positions=64", "lora.rank=8", "train.batch_size=32", "train.lr=1e-2",
                     XLA_CACHE, NO_PLOTS]  # the teacher's PNGs are never read (the student's are)


# ----------------------------------------------------------------------------------------- KD loss vs torch


def torch_kd(s, t, T):
    return F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean") * T * T


@needs_torch
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("n_classes", [2, 5])
def test_kd_loss_and_gradient_match_torch_kl_div(T, n_classes):
    rng = np.random.default_rng(int(T * 10) + n_classes)
    s = rng.normal(0, 4, (16, n_classes)).astype(np.float32)
    t = rng.normal(0, 4, (16, n_classes)).astype(np.float32)
    s_t = torch.tensor(s, requires_grad=True)
    expected = torch_kd(s_t, torch.tensor(t), T)
    expected.backward()
    value, grad = jax.value_and_grad(lambda x: losses.kd_loss(x, t, T)[0])(s)
    err_v, err_g = abs(float(value) - expected.item()), float(np.max(np.abs(grad - s_t.grad.numpy())))
    print(f"T={T} C={n_classes}: loss err {err_v:.1e}, grad err {err_g:.1e}")
    assert err_v < 1e-6 and err_g < 1e-6
    assert expected.item() > 0.1  # a real difference between the distributions was compared


def test_kd_loss_is_zero_for_identical_logits_and_ignores_padding_rows():
    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 3, (6, 2)).astype(np.float32), rng.normal(0, 3, (6, 2)).astype(np.float32)
    assert abs(float(losses.kd_loss(t, t, 2.0)[0])) < 1e-6
    w = np.array([1, 1, 1, 1, 0, 0], np.float32)
    garbage = s.copy()
    garbage[4:] = 1e3  # padding rows may hold anything
    mean, total = losses.kd_loss(garbage, t, 2.0, w)
    np.testing.assert_allclose(mean, losses.kd_loss(s[:4], t[:4], 2.0)[0], rtol=1e-6)
    np.testing.assert_allclose(total, 4 * mean, rtol=1e-6)


@needs_torch
def test_alpha_adds_hard_label_cross_entropy():
    rng = np.random.default_rng(1)
    s, t = rng.normal(0, 2, (8, 2)).astype(np.float32), rng.normal(0, 2, (8, 2)).astype(np.float32)
    y = rng.integers(0, 2, 8).astype(np.int32)
    st, tt, yt = torch.tensor(s), torch.tensor(t), torch.tensor(y, dtype=torch.long)
    for alpha in (0.0, 0.3):
        expected = torch_kd(st, tt, 2.0) + alpha * F.cross_entropy(st, yt)
        got = losses.kd_objective(s, t, y, np.ones(8, np.float32), 2.0, alpha)[0]
        assert abs(float(got) - expected.item()) < 1e-6


# ----------------------------------------------------------------------------- 20 Adam steps vs PyTorch


def synthetic_split(n: int, seq_len: int, seed: int, vocab: int) -> EncodedSplit:
    """Random right-padded rows (pad = the last id of the vocabulary) with random labels."""
    rng = np.random.default_rng(seed)
    ids = np.full((n, seq_len), vocab - 1, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i in range(n):
        k = rng.integers(1, seq_len + 1)
        ids[i, :k] = rng.integers(0, vocab - 1, k)
        mask[i, :k] = 1
    return EncodedSplit(ids, mask, rng.integers(0, 2, n).astype(np.int32), 0)


@needs_torch
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_twenty_adam_distillation_steps_track_torch(alpha):
    T, V, E, H, bs = 2.0, 1000, 16, 24, 8  # a small vocabulary keeps torch's dense embedding update cheap
    split = synthetic_split(40, 8, seed=3, vocab=V)
    teacher_logits = np.random.default_rng(4).normal(0, 3, (40, 2)).astype(np.float32)
    cfg = load_config(None, [f"student.vocab_size={V}", f"student.embed_dim={E}", f"student.hidden_dim={H}", "student.pooling=last_step",
                             "train.lr=1e-3", f"distill.alpha={alpha}"])
    student, params = build_student(cfg.student, jax.random.key(0))
    setup = train_state(student, params, cfg.train.lr, jax.random.key(1))
    step, state = make_train_step(student, setup.tx, losses.teacher_objective(T, alpha)), setup.state

    torch.manual_seed(0)
    emb, rnn, fc = torch.nn.Embedding(V, E), torch.nn.RNN(E, H, batch_first=True), torch.nn.Linear(H, 2)
    p = jax.tree.map(lambda x: torch.tensor(np.asarray(x)), params)
    with torch.no_grad():
        emb.weight.copy_(p["embed"]["embedding"])
        rnn.weight_ih_l0.copy_(p["rnn"]["i"]["kernel"].T)
        rnn.bias_ih_l0.copy_(p["rnn"]["i"]["bias"])
        rnn.weight_hh_l0.copy_(p["rnn"]["h"]["kernel"].T)
        rnn.bias_hh_l0.copy_(p["rnn"]["h"]["bias"])
        fc.weight.copy_(p["head"]["kernel"].T)
        fc.bias.copy_(p["head"]["bias"])
    opt = torch.optim.Adam([*emb.parameters(), *rnn.parameters(), *fc.parameters()], lr=1e-3)

    consts = {"frozen": {}, "teacher_logits": jnp.asarray(teacher_logits)}
    jax_losses, torch_losses = [], []
    for epoch in range(4):
        for batch in batch_iterator(split, bs, shuffle=True, seed=0, epoch=epoch):
            state, sums = step(state, consts, batch)
            jax_losses.append(float(sums["loss_sum"] / sums["count"]))
            s = fc(rnn(emb(torch.tensor(batch["input_ids"], dtype=torch.long)))[0][:, -1])
            t = torch.tensor(teacher_logits[batch["index"]])
            loss = torch_kd(s, t, T) + alpha * F.cross_entropy(s, torch.tensor(batch["labels"], dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            torch_losses.append(loss.item())
    assert len(jax_losses) == 20
    rel = np.abs(np.array(jax_losses) - np.array(torch_losses)) / np.abs(np.array(torch_losses))
    print(f"alpha={alpha}: max relative loss difference over 20 steps {rel.max():.1e}; "
          f"loss {torch_losses[0]:.4f} -> {torch_losses[-1]:.4f}")
    assert rel.max() < 1e-4
    assert torch_losses[-1] < 0.9 * torch_losses[0]  # the student did move
    final = np.asarray(state.trainable["rnn"]["h"]["bias"])
    np.testing.assert_allclose(final, rnn.bias_hh_l0.detach().numpy(), atol=1e-4)


# ---------------------------------------------------------------- a fine-tuned tiny teacher and its student


POS, NEG = np.arange(1000, 1020), np.arange(2000, 2020)  # two sets of 20 "words"


def majority_task(n: int, seed: int, seq_len: int = 12, lengths=(3, 5, 7, 9, 11), margin: int = 1) -> EncodedSplit:
    """Label 1 when most tokens come from POS, by at least `margin` (odd lengths, so never a tie): a decision that
    needs the whole sentence, not its last token."""
    rng = np.random.default_rng(seed)
    ids = np.full((n, seq_len), PAD_ID, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    labels = np.zeros(n, np.int32)
    for i in range(n):
        k = int(rng.choice(lengths))
        n_pos = int(rng.choice([p for p in range(k + 1) if abs(2 * p - k) >= margin]))
        tokens = np.concatenate([rng.choice(POS, n_pos), rng.choice(NEG, k - n_pos)])
        rng.shuffle(tokens)
        ids[i, :k], mask[i, :k], labels[i] = tokens, 1, int(2 * n_pos > k)
    return EncodedSplit(ids, mask, labels, 0)


@pytest.fixture(scope="module")
def synthetic():
    """Sentences of 3-11 "words" whose majority (by 3 or more) decides the label; three disjoint draws."""
    return {name: majority_task(n, seed, margin=3) for name, n, seed in
            (("train", 1024, 0), ("validation", 256, 1), ("test", 512, 2))}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, synthetic):
    """A LoRA run dir (config.yaml, metrics.json, checkpoints/) of a tiny random GPT-2 fine-tuned on the task."""
    run_dir = tmp_path_factory.mktemp("teacher")
    cfg = load_config(None, [*TEACHER_OVERRIDES, "train.epochs=4", f"run.dir={run_dir}"])
    rundir.prepare(cfg)
    task = finetune.build_task(cfg, synthetic)
    summary = run_epochs(task, run_dir, progress=False, options=RunOptions.of(cfg))  # run.plots=false, as configured
    assert summary["best_val_accuracy"] > 0.9, summary  # the teacher learnt the task
    return run_dir


def student_cfg(teacher: Path, run_dir: Path, *extra: str):
    return load_config(None, ["student.embed_dim=32", "student.hidden_dim=32", "student.pooling=last_token",
                              "train.batch_size=32", "train.lr=1e-2", "train.epochs=4", XLA_CACHE,
                              f"distill.teacher={teacher}", f"run.dir={run_dir}", *extra])


def agreement(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1)))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher_run, synthetic):
    run_dir = tmp_path_factory.mktemp("student")
    cfg = student_cfg(teacher_run, run_dir)
    rundir.prepare(cfg)
    teacher = restore_teacher(cfg.distill.teacher, cfg)
    task = distill.build_distill_task(cfg, synthetic, teacher)
    initial = jax.tree.map(np.array, task.state.trainable)  # host copy: the train step donates the state
    run_epochs(task, run_dir, progress=False)
    return {"cfg": cfg, "teacher": teacher, "initial": initial, "params": task.state.trainable, "run_dir": run_dir}


def test_distilled_student_reaches_the_teachers_decisions(distilled, synthetic):
    test = synthetic["test"]  # held out: seen by neither the teacher's nor the student's training
    teacher_logits = distilled["teacher"].logits(test.input_ids, test.attention_mask)
    student = make_student(distilled["cfg"])
    before = agreement(student.apply({"params": distilled["initial"]}, test.input_ids, test.attention_mask),
                       teacher_logits)
    after = agreement(student.apply({"params": distilled["params"]}, test.input_ids, test.attention_mask),
                      teacher_logits)
    teacher_acc = float(jnp.mean(jnp.argmax(teacher_logits, -1) == test.labels))
    print(f"held-out agreement with the teacher: {before:.3f} before, {after:.3f} after distillation "
          f"(teacher accuracy {teacher_acc:.3f}, labels balanced {test.labels.mean():.2f})")
    assert distilled["cfg"].distill.alpha == 0.0  # the student never saw a label: all it knows came from the teacher
    assert teacher_acc > 0.9
    assert after > 0.90
    assert before < 0.75


def test_restored_teacher_reproduces_its_recorded_best_validation(teacher_run, synthetic, distilled):
    record = json.loads((teacher_run / "metrics.json").read_text())
    assert record["kind"] == "lora"
    val = synthetic["validation"]
    logits = distilled["teacher"].logits(val.input_ids, val.attention_mask)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == val.labels))
    ce = float(jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(val)), val.labels]))
    assert acc == pytest.approx(record["summary"]["best_val_accuracy"], abs=1e-9)
    assert ce == pytest.approx(record["summary"]["val_loss_at_best"], abs=1e-5)  # merged == factored LoRA
    assert "lora" not in distilled["teacher"].params  # merged into plain weights


def test_distill_run_dir_layout(distilled):
    run_dir = distilled["run_dir"]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["kind"] == "distill" and len(record["epochs"]) == 4
    s = record["summary"]
    assert s["total_params"] == s["trainable_params"] > 0 and s["teacher_total_params"] > 0
    for name in ("config.yaml", "accuracy.png", "loss.png", "checkpoints/best", "checkpoints/latest"):
        assert (run_dir / name).exists(), name


def test_cached_teacher_logits_give_the_same_training(teacher_run, synthetic, distilled, tmp_path):
    """The default (teacher logits computed once) against a teacher forward pass inside every step."""
    results = []
    teacher = distilled["teacher"]
    for cache in (True, False):
        cfg = student_cfg(teacher_run, tmp_path / str(cache), f"distill.cache_teacher_logits={str(cache).lower()}")
        task = distill.build_distill_task(cfg, synthetic, teacher)
        assert ("teacher_logits" in task.consts) == cache
        sums = []
        for epoch in range(2):
            for batch in task.train_batches(epoch, 0):
                task.state, s = task.train_step(task.state, task.consts, batch)
                sums.append(float(s["loss_sum"]))
        results.append((sums, task.state.trainable))
    (sums_c, params_c), (sums_u, params_u) = results
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(params_c), jax.tree.leaves(params_u)))
    print(f"cached vs per-step teacher: max loss-sum difference {np.max(np.abs(np.subtract(sums_c, sums_u))):.1e}, "
          f"max parameter difference after {len(sums_c)} steps {diff:.1e}")
    assert sums_c == sums_u
    assert diff == 0.0


# -------------------------------------------------------------------------------- teacher checks


def test_teacher_path_may_name_the_run_its_checkpoints_or_best(teacher_run):
    for p in (teacher_run, teacher_run / "checkpoints", teacher_run / "checkpoints" / "best"):
        assert runs.find_run_dir(str(p)) == teacher_run


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "distill.teacher is empty"),
    ("plain_dir", "is not a run directory: no config.yaml"),
    ("student_run", "is a 'distill' run, not a 'lora' run"),
    ("unfinished", "never finished an epoch"),
    ("vocab", "vocabulary size differs"),
])
def test_bad_teacher_fails_before_training_and_says_why(case, message, teacher_run, distilled, tmp_path):
    teacher = {"missing": str(tmp_path / "nope"), "empty": "", "plain_dir": str(tmp_path),
               "student_run": str(distilled["run_dir"]), "unfinished": "", "vocab": str(teacher_run)}[case]
    if case == "unfinished":
        teacher = str(config_only_run(teacher_run, tmp_path / "unfinished"))
    extra = ["student.vocab_size=50000"] if case == "vocab" else []
    run_dir = tmp_path / "run"
    cfg = student_cfg(Path(teacher) if teacher else Path(""), run_dir, *extra)
    if not teacher:
        cfg.distill.teacher = ""
    with pytest.raises(runs.RunError, match=message.replace("(", r"\(")) as e:
        distill.distill(cfg, progress=False)
    assert str(e.value).startswith("distill.teacher")  # the message names the key to fix
    assert not run_dir.exists()  # nothing was written, nothing trained


def test_distill_script_reports_a_bad_teacher(tmp_path, capsys):
    from lora_kd_jax.commands.cli import main_distill

    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as e:
        main_distill([str(repo / "configs" / "distil_rnn_gpt2.yaml"), f"distill.teacher={tmp_path / 'nope'}",
                      f"run.dir={tmp_path / 'run'}"])
    assert "run error: distill.teacher" in str(e.value) and "does not exist" in str(e.value)


def test_rnn_baseline_trains_with_cross_entropy(synthetic, tmp_path):
    cfg = load_config(None, ["student.embed_dim=32", "student.hidden_dim=32", "train.batch_size=64", "train.lr=1e-2",
                             "train.epochs=3", XLA_CACHE, NO_PLOTS, f"run.dir={tmp_path}"])
    task = distill.build_baseline_task(cfg, synthetic)
    assert task.kind == "rnn" and task.consts == {"frozen": {}}
    summary = run_epochs(task, tmp_path, progress=False, options=RunOptions.of(cfg))
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["kind"] == "rnn"
    first, last = record["epochs"][0]["train"]["loss"], record["epochs"][-1]["train"]["loss"]
    assert last < first  # cross-entropy went down
    assert summary["best_val_accuracy"] > 0.6
