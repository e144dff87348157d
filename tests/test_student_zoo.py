"""The students beyond the RNN (student.arch=bilstm, cnn) and student.embeddings=teacher: each student's logits,
gradients and one Adam step of the real train step against a PyTorch implementation on identical weights (fp32 CPU,
the RNN parity's tolerance), padding invariance, many seeds + resume + evaluate/predict through the real trainer,
and the teacher's wte copied or PCA-projected exactly as documented."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_kd_jax.models.tokenizers import tokenizer_for
from lora_kd_jax.commands import evaluation
from lora_kd_jax.core.config import ConfigError, StudentConfig, load_config
from lora_kd_jax.data import load_splits
from lora_kd_jax.distill import trainer as distill
from lora_kd_jax.distill.embeddings import pca_projection, student_embedding
from lora_kd_jax.distill.teacher import restore_teacher
from lora_kd_jax.models.students.build import StudentClassifier, make_student
from lora_kd_jax.training import loop
from lora_kd_jax.training.state import train_state
from lora_kd_jax.training.steps import cross_entropy_objective, make_train_step

from shared_runs import teacher_run
from tiny import assert_resumed, latest_step, log_messages, sigterm_at_batch, tiny_config

torch = pytest.importorskip("torch")

V, E, H, R, F_, B, L = 1000, 16, 12, 10, 6, 5, 9  # a small vocabulary keeps torch's dense embedding update cheap
LENGTHS = [9, 1, 4, 7, 2]  # a full row, and rows shorter than the CNN's widths
WIDTHS = (2, 3, 5)
TOL = 1e-5  # as tests/test_student.py for the RNN
LR = 1e-2


def batch(seed: int = 0, n_labels: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(L)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(0, V - 1, (B, L)), V - 1).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": rng.integers(0, n_labels, B).astype(np.int32),
            "weights": np.ones(B, np.float32), "index": np.arange(B, dtype=np.int32)}


def zoo_student(arch: str, n_labels: int = 2, **extra) -> StudentClassifier:
    sc = StudentConfig(vocab_size=V, embed_dim=E, hidden_dim=H, arch=arch, relu_dim=R, cnn_widths=list(WIDTHS),
                       cnn_filters=F_, **extra)
    return StudentClassifier(make_student(sc).clone(n_labels=n_labels))


def t(x) -> "torch.Tensor":
    return torch.tensor(np.asarray(x))


class TorchBiLSTM(torch.nn.Module):
    """Tang et al.: nn.LSTM over the packed real tokens, [h_n forward; h_n backward] -> Linear -> ReLU -> Linear."""

    def __init__(self, p: dict, n_labels: int):
        super().__init__()
        self.embed = torch.nn.Embedding(V, E)
        self.lstm = torch.nn.LSTM(E, H, batch_first=True, bidirectional=True)
        self.relu, self.head = torch.nn.Linear(2 * H, R), torch.nn.Linear(R, n_labels)
        with torch.no_grad():
            self.embed.weight.copy_(t(p["embed"]["embedding"]))
            for name, suffix in (("lstm", ""), ("lstm_backward", "_reverse")):
                for part, torch_part in (("i", "ih"), ("h", "hh")):
                    getattr(self.lstm, f"weight_{torch_part}_l0{suffix}").copy_(t(p[name][part]["kernel"]).T)
                    getattr(self.lstm, f"bias_{torch_part}_l0{suffix}").copy_(t(p[name][part]["bias"]))
            for layer, name in ((self.relu, "relu"), (self.head, "head")):
                layer.weight.copy_(t(p[name]["kernel"]).T)
                layer.bias.copy_(t(p[name]["bias"]))

    def forward(self, ids, mask):
        packed = torch.nn.utils.rnn.pack_padded_sequence(self.embed(ids), mask.sum(-1), batch_first=True,
                                                         enforce_sorted=False)
        h_n = self.lstm(packed)[1][0]
        return self.head(torch.relu(self.relu(torch.cat([h_n[0], h_n[1]], dim=-1))))

    def flax_grads(self) -> dict:
        g = {n: p.grad.numpy() for n, p in self.lstm.named_parameters()}
        out = {"embed": {"embedding": self.embed.weight.grad.numpy()}}
        for name, suffix in (("lstm", ""), ("lstm_backward", "_reverse")):
            out[name] = {part: {"kernel": g[f"weight_{tp}_l0{suffix}"].T, "bias": g[f"bias_{tp}_l0{suffix}"]}
                         for part, tp in (("i", "ih"), ("h", "hh"))}
        for layer, name in ((self.relu, "relu"), (self.head, "head")):
            out[name] = {"kernel": layer.weight.grad.numpy().T, "bias": layer.bias.grad.numpy()}
        return out


class TorchCNN(torch.nn.Module):
    """Kim 2014, one sentence at a time: its real tokens (zero vectors appended up to a filter's width when
    shorter) -> nn.Conv1d per width -> ReLU -> max over every position -> concatenation -> Linear."""

    def __init__(self, p: dict, n_labels: int):
        super().__init__()
        self.embed = torch.nn.Embedding(V, E)
        self.convs = torch.nn.ModuleList(torch.nn.Conv1d(E, F_, w) for w in WIDTHS)
        self.head = torch.nn.Linear(len(WIDTHS) * F_, n_labels)
        with torch.no_grad():
            self.embed.weight.copy_(t(p["embed"]["embedding"]))
            for w, conv in zip(WIDTHS, self.convs):
                conv.weight.copy_(t(p[f"conv{w}"]["kernel"]).permute(2, 1, 0))  # (w, in, out) -> (out, in, w)
                conv.bias.copy_(t(p[f"conv{w}"]["bias"]))
            self.head.weight.copy_(t(p["head"]["kernel"]).T)
            self.head.bias.copy_(t(p["head"]["bias"]))

    def forward(self, ids, mask):
        rows = []
        for r in range(ids.shape[0]):
            x = self.embed(ids[r, :int(mask[r].sum())]).T[None]  # [1, E, n]
            feats = [torch.relu(conv(torch.nn.functional.pad(x, (0, max(0, w - x.shape[-1]))))).amax(-1)
                     for w, conv in zip(WIDTHS, self.convs)]
            rows.append(torch.cat(feats, -1))
        return self.head(torch.cat(rows, 0))

    def flax_grads(self) -> dict:
        out = {"embed": {"embedding": self.embed.weight.grad.numpy()},
               "head": {"kernel": self.head.weight.grad.numpy().T, "bias": self.head.bias.grad.numpy()}}
        for w, conv in zip(WIDTHS, self.convs):
            out[f"conv{w}"] = {"kernel": conv.weight.grad.numpy().transpose(2, 1, 0), "bias": conv.bias.grad.numpy()}
        return out


TORCH = {"bilstm": TorchBiLSTM, "cnn": TorchCNN}
_built: dict = {}


def built(arch: str, n_labels: int = 2) -> tuple[StudentClassifier, dict]:
    """One student and its drawn parameters per (arch, n_labels) for the module (each init compiles once)."""
    if (arch, n_labels) not in _built:
        student = zoo_student(arch, n_labels)
        _built[arch, n_labels] = student, jax.tree.map(np.array, student.init(jax.random.key(0)))
    return _built[arch, n_labels]


def max_err(a, b) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("arch,n_labels", [("bilstm", 2), ("cnn", 3)])
def test_logits_grads_and_one_adam_step_match_torch(arch, n_labels):
    """Forward, cross-entropy gradients and the real train step (Adam, lr 1e-2) against torch.optim.Adam."""
    (student, host), b = built(arch, n_labels), batch(1, n_labels)
    params = jax.tree.map(jnp.asarray, host)  # a fresh copy: the train step donates it
    tm = TORCH[arch](params, n_labels)
    ids, mask = torch.tensor(b["input_ids"], dtype=torch.long), torch.tensor(b["attention_mask"], dtype=torch.long)
    t_logits = tm(ids, mask)
    torch.nn.functional.cross_entropy(t_logits, torch.tensor(b["labels"], dtype=torch.long)).backward()

    def loss(p):
        logits = student.logits(p, b["input_ids"], b["attention_mask"])
        return cross_entropy_objective(logits, {}, b)[0], logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    err_logits, err_grads = max_err(logits, t_logits.detach().numpy()), max_err(grads, tm.flax_grads())
    setup = train_state(student, params, LR, jax.random.key(1))
    state, _ = make_train_step(student, setup.tx, cross_entropy_objective)(setup.state, {"frozen": {}}, b)
    opt = torch.optim.Adam(tm.parameters(), lr=LR)
    opt.step()
    moved = TORCH[arch](state.trainable, n_labels)  # our updated weights, in torch's layout
    err_step = max(float((a - c).detach().abs().max()) for a, c in zip(tm.parameters(), moved.parameters()))
    print(f"{arch}: logits max err {err_logits:.1e}, grads {err_grads:.1e}, after one Adam step {err_step:.1e}")
    assert err_logits < TOL and err_grads < TOL and err_step < TOL
    assert max_err(state.trainable, host) > 0.5 * LR  # the step moved the weights


@pytest.mark.parametrize("arch", ["bilstm", "cnn"])
def test_padding_never_reaches_the_logits(arch):
    """Other token ids under the padding, and six more padded positions: the same logits."""
    (student, params), b = built(arch), batch(2)
    logits = jax.jit(student.logits)
    ids, mask = b["input_ids"], b["attention_mask"]
    rng = np.random.default_rng(5)
    noisy = np.where(mask == 1, ids, rng.integers(0, V - 1, ids.shape)).astype(np.int32)
    longer = np.concatenate([noisy, rng.integers(0, V - 1, (B, 6)).astype(np.int32)], 1)
    longer_mask = np.concatenate([mask, np.zeros((B, 6), np.int32)], 1)
    a = logits(params, ids, mask)
    np.testing.assert_allclose(a, logits(params, longer, longer_mask), atol=1e-6)
    changed = np.where(mask == 1, noisy + 1, noisy).astype(np.int32)  # a real token changed: the logits do move
    assert float(jnp.max(jnp.abs(a - logits(params, changed, mask)))) > 1e-3


def test_dropout_draws_from_the_step_key_and_eval_is_deterministic():
    (plain, params), b = built("cnn"), batch(3)
    student = zoo_student("cnn", dropout=0.5)
    ids, mask = b["input_ids"], b["attention_mask"]
    dropped = jax.jit(lambda p, k: student.logits(p, ids, mask, deterministic=False, rng=k))
    train = [dropped(params, jax.random.key(k)) for k in (1, 1, 2)]
    np.testing.assert_array_equal(train[0], train[1])
    assert float(jnp.max(jnp.abs(train[0] - train[2]))) > 1e-4
    np.testing.assert_array_equal(student.logits(params, ids, mask), plain.logits(params, ids, mask))


def test_the_rnn_keys_are_refused_for_other_architectures():
    for bad in ("student.cell=gru", "student.bidirectional=true", "student.pooling=last_step"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.") + ".*student.arch=cnn"):
            load_config(None, ["student.arch=cnn", bad])
    with pytest.raises(ConfigError, match="student.cnn_widths"):
        load_config(None, ["student.arch=cnn", "student.cnn_widths=[]"])
    assert load_config(None, []).student.arch == "rnn"  # the study's RNN stays the default


# ------------------------------------------------- through the real trainer: seeds, resume, evaluate, predict

TRAIN = ("data.limit=32", "train.batch_size=16", "train.epochs=1", "student.embed_dim=16", "student.hidden_dim=16",
         "student.cnn_filters=8", "student.dropout=0.5", "train.seeds=[0,1]")


def history(run_dir) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["epochs"]


@pytest.fixture(scope="module")
def zoo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    for arch in ("bilstm", "cnn"):
        distill.train_rnn(tiny_config(*TRAIN, f"student.arch={arch}", f"run.dir={root / arch}"), progress=False)
    return root


@pytest.mark.parametrize("arch", ["bilstm", "cnn"])
def test_each_student_trains_two_seeds_at_once_and_evaluates(zoo_runs, arch):
    record = json.loads((zoo_runs / arch / "seed_1" / "metrics.json").read_text())
    assert record["kind"] == "rnn" and record["summary"]["student_arch"] == arch
    a, b = (history(zoo_runs / arch / f"seed_{k}")[0]["train"]["loss"] for k in (0, 1))
    assert np.isfinite(a) and a != b  # each seed its own initialisation and dropout
    clf = evaluation.Predictor.from_run(zoo_runs / arch / "seed_1")
    assert arch in clf.describe()
    report = clf.evaluate("in_domain", limit=32)  # the run's validation rows (data.limit=32)
    best = record["epochs"][record["summary"]["best_epoch"] - 1]["val"]
    assert report.rows == 32 and (report.accuracy, report.mcc, report.loss) == (best["accuracy"], best["mcc"],
                                                                                 best["loss"])
    (p,) = clf.predict("The cat sat on the mat.")
    assert p.label in ("acceptable", "unacceptable") and 0.5 <= p.probability <= 1.0


def test_a_killed_cnn_run_resumes_to_the_uninterrupted_result(zoo_runs, tmp_path, monkeypatch):
    """SIGTERM after the first batch (dropout on, two seeds): --resume ends where the uninterrupted run ended."""
    cfg = tiny_config(*TRAIN, "student.arch=cnn", f"run.dir={tmp_path / 'resumed'}")
    original = loop.prefetch
    monkeypatch.setattr(loop, "prefetch", sigterm_at_batch(loop, 1))
    with pytest.raises(loop.TrainingInterrupted):
        distill.train_rnn(cfg, progress=False)
    monkeypatch.setattr(loop, "prefetch", original)
    assert latest_step(tmp_path / "resumed") == 1
    since = (tmp_path / "resumed" / "log.txt").stat().st_size
    distill.train_rnn(cfg, resume=True, progress=False)
    assert_resumed(log_messages(tmp_path / "resumed", since), from_step=1, to_step=2)  # 32 rows / 16
    for k in (0, 1):
        assert history(tmp_path / "resumed" / f"seed_{k}") == history(zoo_runs / "cnn" / f"seed_{k}")


# ------------------------------------------------------------------------- student.embeddings=teacher


@pytest.fixture(scope="module")
def teacher():
    """The session's shared teacher (tests/shared_runs.py: a one-step LoRA run of a 64-wide random GPT-2; only its
    wte matters here), restored."""
    run_dir = teacher_run()
    cfg = tiny_config(f"distill.teacher={run_dir}")
    return run_dir, restore_teacher(str(run_dir), cfg)


def wte(teacher) -> np.ndarray:
    return np.asarray(teacher[1].params["gpt2"]["wte"]["embedding"], np.float32)


def test_pca_projection_is_sklearns_pca_with_fixed_signs(teacher):
    from sklearn.decomposition import PCA

    table = wte(teacher)[:5000].astype(np.float64)  # a pure function: part of the table keeps sklearn's SVD quick
    projected, kept = pca_projection(table, 16)
    pca = PCA(n_components=16, svd_solver="full").fit(table)
    expected = pca.transform(table)
    signs = np.sign(np.sum(projected * expected, axis=0))  # sklearn picks its own sign per axis
    np.testing.assert_allclose(projected, expected * signs, atol=1e-4 * np.abs(expected).max())
    assert abs(kept - pca.explained_variance_ratio_.sum()) < 1e-5
    axes = np.linalg.lstsq(table - table.mean(0), projected, rcond=None)[0]  # our axes; each's largest entry > 0
    assert np.all(axes[np.abs(axes).argmax(0), np.arange(16)] > 0)


def test_every_seed_starts_from_the_teachers_embeddings(teacher, tmp_path):
    """As wide as the teacher (64): its wte bit for bit. Narrower, through the distillation task (two seeds): each
    seed's 'embed' is the PCA projection; the other leaves are still each seed's own draw."""
    run_dir, restored = teacher
    same = tiny_config("student.embeddings=teacher", "student.embed_dim=64")
    np.testing.assert_array_equal(student_embedding(same, restored), wte(teacher))
    cfg = tiny_config("data.limit=16", "train.batch_size=16", "train.seeds=[0,1]", "student.arch=bilstm",
                      "student.embed_dim=16", "student.hidden_dim=8", "student.embeddings=teacher",
                      f"distill.teacher={run_dir}", f"run.dir={tmp_path}")
    task = distill.build_distill_task(cfg, load_splits(cfg, tokenizer_for(cfg)).encoded, restored)
    start = np.asarray(task.state.trainable["embed"]["embedding"])
    expected = pca_projection(wte(teacher), 16)[0]
    for k in (0, 1):
        np.testing.assert_array_equal(start[k], expected)
    lstm = np.asarray(task.state.trainable["lstm"]["i"]["kernel"])
    assert not np.array_equal(lstm[0], lstm[1])
    assert task.info["student_embeddings"] == "teacher"


def test_teacher_embeddings_fail_in_one_line_when_they_cannot_apply(teacher, tmp_path):
    run_dir, restored = teacher
    with pytest.raises(ConfigError, match="needs distill.teacher"):
        distill.train_rnn(tiny_config("student.embeddings=teacher", f"run.dir={tmp_path / 'a'}"), progress=False)
    with pytest.raises(ConfigError, match="student.embed_dim=128, wider than the teacher's 64"):
        student_embedding(tiny_config("student.embeddings=teacher", "student.embed_dim=128"), restored)


def test_the_bench_refuses_a_student_flag_that_is_not_a_student_setting():
    """(`bench --student student.arch=cnn` times that student's step: run by hand for each arch, README.)"""
    from lora_kd_jax.commands import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--variants", "tiny", "--student", "arch=cnn"])
    assert "--student arch=cnn: expected a student.* setting" in str(e.value.code)
