"""The RNN student against PyTorch (nn.Embedding -> nn.RNN/GRU/LSTM -> nn.Linear with copied weights), fp32 CPU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_kd_jax.core.config import StudentConfig
from lora_kd_jax.models.students.build import build_student, count_params

torch = pytest.importorskip("torch")

from test_student_model import EMBED, HIDDEN, VOCAB, B, batch, student  # noqa: E402

TOL = 1e-5


class TorchStudent(torch.nn.Module):
    """The original: Embedding -> RNN (batch_first) -> Linear on output[:, -1] (last_step) or the last real token."""

    def __init__(self, cell: str, bidirectional: bool, pooling: str):
        super().__init__()
        torch.manual_seed(0)
        rnn = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
        self.embed = torch.nn.Embedding(VOCAB, EMBED)
        self.rnn = rnn(EMBED, HIDDEN, batch_first=True, bidirectional=bidirectional)
        self.fc = torch.nn.Linear(HIDDEN * (2 if bidirectional else 1), 2)
        with torch.no_grad():  # torch's default biases are small; make them matter
            for name, p in self.rnn.named_parameters():
                if "bias" in name:
                    p.uniform_(-0.5, 0.5)
        self.pooling, self.bidirectional = pooling, bidirectional

    def forward(self, ids, mask):
        x = self.embed(ids)
        if self.pooling == "last_step":
            return self.fc(self.rnn(x)[0][:, -1])
        lengths = mask.sum(-1)
        if not self.bidirectional:
            out = self.rnn(x)[0]
            return self.fc(out[torch.arange(ids.shape[0]), lengths - 1])
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        h_n = self.rnn(packed)[1]
        h_n = h_n[0] if isinstance(h_n, tuple) else h_n  # LSTM: (h, c)
        return self.fc(torch.cat([h_n[0], h_n[1]], dim=-1))


def t2n(t) -> np.ndarray:
    return t.detach().numpy()


def cell_params(m: TorchStudent, cell: str, suffix: str = "") -> dict:
    """torch's RNN/GRU/LSTM weights in the student's Flax layout (kernels (in, out))."""
    g = {n: t2n(p) for n, p in m.rnn.named_parameters()}
    w_ih, w_hh = g[f"weight_ih_l0{suffix}"], g[f"weight_hh_l0{suffix}"]
    b_ih, b_hh = g[f"bias_ih_l0{suffix}"], g[f"bias_hh_l0{suffix}"]
    H = HIDDEN
    if cell == "rnn":
        return {"i": {"kernel": w_ih.T, "bias": b_ih}, "h": {"kernel": w_hh.T, "bias": b_hh}}
    if cell == "gru":  # torch gate order r, z, n; Flax has one bias where torch's two are simply summed
        s = lambda w, k: w[k * H:(k + 1) * H].T  # noqa: E731
        sb = lambda b, k: b[k * H:(k + 1) * H]  # noqa: E731
        return {"ir": {"kernel": s(w_ih, 0), "bias": sb(b_ih, 0) + sb(b_hh, 0)}, "hr": {"kernel": s(w_hh, 0)},
                "iz": {"kernel": s(w_ih, 1), "bias": sb(b_ih, 1) + sb(b_hh, 1)}, "hz": {"kernel": s(w_hh, 1)},
                "in": {"kernel": s(w_ih, 2), "bias": sb(b_ih, 2)}, "hn": {"kernel": s(w_hh, 2), "bias": sb(b_hh, 2)}}
    out = {}  # lstm: gate order i, f, g, o
    for k, gate in enumerate("ifgo"):
        out[f"i{gate}"] = {"kernel": w_ih[k * H:(k + 1) * H].T}
        out[f"h{gate}"] = {"kernel": w_hh[k * H:(k + 1) * H].T, "bias": b_ih[k * H:(k + 1) * H] + b_hh[k * H:(k + 1) * H]}
    return out


def to_flax(m: TorchStudent, cell: str) -> dict:
    p = {"embed": {"embedding": t2n(m.embed.weight)}, "rnn": cell_params(m, cell),
         "head": {"kernel": t2n(m.fc.weight).T, "bias": t2n(m.fc.bias)}}
    if m.bidirectional:
        p["rnn_backward"] = cell_params(m, cell, "_reverse")
    return jax.tree.map(jnp.asarray, p)


def grads_to_flax(m: TorchStudent) -> dict:
    """torch gradients of the plain RNN in the Flax layout (rnn cell only)."""
    g = {n: t2n(p.grad) for n, p in m.rnn.named_parameters()}
    out = {"embed": {"embedding": t2n(m.embed.weight.grad)},
           "head": {"kernel": t2n(m.fc.weight.grad).T, "bias": t2n(m.fc.bias.grad)}}
    for name, suffix in (("rnn", ""), ("rnn_backward", "_reverse")):
        if f"weight_ih_l0{suffix}" in g:
            out[name] = {"i": {"kernel": g[f"weight_ih_l0{suffix}"].T, "bias": g[f"bias_ih_l0{suffix}"]},
                         "h": {"kernel": g[f"weight_hh_l0{suffix}"].T, "bias": g[f"bias_hh_l0{suffix}"]}}
    return out


def max_err(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("pooling", ["last_step", "last_token"])
def test_rnn_logits_and_grads_match_torch(pooling, bidirectional):
    ids, mask, labels = batch()
    tm = TorchStudent("rnn", bidirectional, pooling)
    t_logits = tm(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long))
    torch.nn.functional.cross_entropy(t_logits, torch.tensor(labels, dtype=torch.long)).backward()

    module, params = student("rnn", bidirectional, pooling), to_flax(tm, "rnn")

    def loss(p):
        logits = module.apply({"params": p}, ids, mask)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(B), labels]), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    err_logits = max_err(logits, t2n(t_logits))
    expected = grads_to_flax(tm)
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    err_grads = max_err(grads, expected)
    print(f"rnn {pooling} bidirectional={bidirectional}: logits max err {err_logits:.2e}, grads {err_grads:.2e}")
    assert err_logits < TOL
    assert err_grads < TOL
    assert float(jnp.max(jnp.abs(grads["rnn"]["h"]["bias"]))) > 1e-4  # the comparison is not of zeros


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("pooling", ["last_step", "last_token"])
def test_gru_lstm_logits_match_torch(cell, pooling):
    ids, mask, _ = batch(1)
    tm = TorchStudent(cell, True, pooling)
    expected = t2n(tm(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)))
    logits = student(cell, True, pooling).apply({"params": to_flax(tm, cell)}, ids, mask)
    assert max_err(logits, expected) < TOL


def test_flax_params_have_the_torch_names_and_shapes():
    _, params = build_student(StudentConfig(vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN), jax.random.key(0))
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
        lambda x: x.shape, to_flax(TorchStudent("rnn", False, "last_step"), "rnn"))


def test_full_size_matches_the_original_parameter_count():
    _, shapes = build_student(StudentConfig(), jax.random.key(0), shapes_only=True)  # nothing allocated
    original = sum(p.numel() for m in (torch.nn.Embedding(50257, 768), torch.nn.RNN(768, 768), torch.nn.Linear(768, 2))
                   for p in m.parameters())
    assert count_params(shapes) == original == 39_780_098
