"""The RNN student without PyTorch: initialisers, pooling and padding, dtypes, config -> module (the comparisons with
torch's nn.RNN/GRU/LSTM are in test_student.py, which needs the `test` extra)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_kd_jax.core.config import Config, StudentConfig, load_config
from lora_kd_jax.data import PAD_ID
from lora_kd_jax.models.students.build import build_student, make_student

VOCAB, EMBED, HIDDEN, B, L = 50257, 16, 24, 5, 9
LENGTHS = [9, 1, 4, 7, 2]  # includes a full row and a single-token row


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.full((B, L), PAD_ID, np.int32)
    mask = np.zeros((B, L), np.int32)
    for r, n in enumerate(LENGTHS):
        ids[r, :n] = rng.integers(0, VOCAB - 1, n)
        mask[r, :n] = 1
    labels = rng.integers(0, 2, B).astype(np.int32)
    return ids, mask, labels


def student(cell="rnn", bidirectional=False, pooling="last_token"):
    return make_student(StudentConfig(vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, cell=cell,
                                      bidirectional=bidirectional, pooling=pooling))


def test_init_follows_torch_distributions():
    _, p = build_student(StudentConfig(vocab_size=VOCAB, embed_dim=64, hidden_dim=256), jax.random.key(3))
    emb = np.asarray(p["embed"]["embedding"])
    assert abs(emb.std() - 1.0) < 0.01  # nn.Embedding: N(0, 1)
    bound = 1 / np.sqrt(256)
    for leaf in jax.tree.leaves(p["rnn"]):
        a = np.asarray(leaf)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound  # U(±1/sqrt(hidden))
    assert np.abs(np.asarray(p["rnn"]["i"]["bias"])).max() > 0  # two non-zero biases, as torch


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_last_token_ignores_padding_last_step_does_not(cell, bidirectional):
    ids, mask, _ = batch(2)
    longer = np.concatenate([ids, np.full((B, 6), PAD_ID, np.int32)], 1)  # same sentences, 6 more pads
    longer_mask = np.concatenate([mask, np.zeros((B, 6), np.int32)], 1)
    key = jax.random.key(0)
    m = student(cell, bidirectional, "last_token")
    params = m.init(key, ids, mask)["params"]
    np.testing.assert_allclose(m.apply({"params": params}, ids, mask),
                               m.apply({"params": params}, longer, longer_mask), atol=1e-6)
    m_step = student(cell, bidirectional, "last_step")
    a, b = m_step.apply({"params": params}, ids, mask), m_step.apply({"params": params}, longer, longer_mask)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3  # the original pooling does see the padding


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_bfloat16_compute_keeps_float32_params(cell):
    m = make_student(StudentConfig(vocab_size=VOCAB, embed_dim=EMBED, hidden_dim=HIDDEN, cell=cell, dtype="bfloat16"))
    ids, mask, _ = batch()
    params = m.init(jax.random.key(0), ids, mask)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = m.apply({"params": params}, ids, mask)
    assert logits.dtype == jnp.float32 and logits.shape == (B, 2)
    ref = student(cell).apply({"params": params}, ids, mask)
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.1


def test_config_choices_reach_the_module():
    cfg = load_config(None, ["student.cell=gru", "student.bidirectional=true", "student.pooling=last_step",
                             "student.embed_dim=8", "student.hidden_dim=4"])
    m = make_student(cfg)
    assert (m.cell, m.bidirectional, m.pooling, m.embed_dim, m.hidden_dim) == ("gru", True, "last_step", 8, 4)
    assert make_student(Config()).pooling == "last_token"  # the default is the last real token
