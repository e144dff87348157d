"""The students beyond the study's RNN: Tang et al.'s BiLSTM and Kim's CNN, both over the same token embedding.

bilstm (Tang, Lu, Mou, Vechtomova & Lin 2019, "Distilling task-specific knowledge from BERT into simple neural
networks"): Embedding -> one bidirectional LSTM layer -> [final forward state; final backward state] -> Dense +
ReLU (`relu_dim`) -> dropout -> Dense (n_labels). Parameter tree:

    {'embed': {'embedding': (vocab, embed)},
     'lstm', 'lstm_backward': {'i': {'kernel': (embed, 4H), 'bias': (4H,)}, 'h': {'kernel': (H, 4H), 'bias': (4H,)}},
     'relu': {'kernel': (2H, relu_dim), 'bias'}, 'head': {'kernel': (relu_dim, n_labels), 'bias'}}

The LSTM is torch's nn.LSTM cell (gates i, f, g, o in that order along 4H; both biases kept, as the RNN student
keeps them, so that Adam moves the same parameters torch's Adam moves: tested step for step). Padding never
reaches the logits: the forward state is read at the last real token, and the backward direction reads each row's
real tokens from the last to the first (a per-row reversal), so its final state is the one after the first token.

cnn (Kim 2014, "Convolutional neural networks for sentence classification"): Embedding -> for each n-gram width w
in `widths`, `filters` 1-D convolutions (valid, stride 1) -> ReLU -> max over time -> concatenation -> dropout ->
Dense (n_labels). Tree: 'embed', 'conv{w}' ({'kernel': (w, embed, filters), 'bias'}) per width, 'head'. Max over
time ignores padding: only the windows that start at a real token and end within the sentence count; a sentence
shorter than w has one window, its tokens followed by zero vectors (Kim pads short sentences with zeros).

Initialisers follow torch's defaults (embedding N(0, 1); LSTM U(±1/sqrt(H)); Linear and Conv1d weights and biases
U(±1/sqrt(fan_in))), as for the RNN student.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_kd_jax.models.interface import last_token_index
from lora_kd_jax.models.students.rnn import N_LABELS
from lora_kd_jax.models.students.torch_init import embed_tokens, torch_dense, torch_uniform


class TorchLSTM(nn.Module):
    """torch.nn.LSTM's one-directional layer over [B, L, E] -> hidden states [B, L, H].

    The input projection of every position is one matrix product before the scan (as the RNN student's
    HoistedTorchRNN); the scan carries (h, c) and h·W_hhᵀ + b_hh."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = torch_uniform(self.features)
        dense = lambda name: nn.Dense(4 * self.features, kernel_init=init, bias_init=init,  # noqa: E731
                                      dtype=self.dtype, name=name)
        xi = dense("i")(x)  # [B, L, 4H]
        recurrent = dense("h")
        h0 = jnp.zeros((x.shape[0], self.features), xi.dtype)
        recurrent(h0)  # creates 'h' at init; unused (and dropped by XLA) when applying
        w = recurrent.variables["params"]["kernel"].astype(xi.dtype)
        b = recurrent.variables["params"]["bias"].astype(xi.dtype)

        def step(carry, xi_t):
            h, c = carry
            i, f, g, o = jnp.split(xi_t + h @ w + b, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        _, hs = jax.lax.scan(step, (h0, h0), jnp.swapaxes(xi, 0, 1))
        return jnp.swapaxes(hs, 0, 1)


def reverse_real_tokens(x: jax.Array, last: jax.Array) -> jax.Array:
    """Each row's real tokens in reverse order (position t holds token last - t), its padding left in place."""
    t = jnp.arange(x.shape[1])[None, :]
    index = jnp.where(t <= last[:, None], last[:, None] - t, t)
    return jnp.take_along_axis(x, index[..., None], axis=1)


class BiLSTMStudent(nn.Module):
    vocab_size: int = 50257
    embed_dim: int = 300
    hidden_dim: int = 150
    relu_dim: int = 150
    dropout: float = 0.0
    dtype: Any = jnp.float32
    n_labels: int = N_LABELS

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        x = embed_tokens(self, input_ids)
        last = last_token_index(attention_mask)
        rows = jnp.arange(input_ids.shape[0])
        forward = TorchLSTM(self.hidden_dim, self.dtype, name="lstm")(x)[rows, last]
        backward = TorchLSTM(self.hidden_dim, self.dtype, name="lstm_backward")(reverse_real_tokens(x, last))
        pooled = jnp.concatenate([forward, backward[rows, last]], axis=-1)
        hidden = nn.relu(torch_dense(self.relu_dim, 2 * self.hidden_dim, self.dtype, "relu")(pooled))
        hidden = nn.Dropout(self.dropout, deterministic=deterministic)(hidden)
        return torch_dense(self.n_labels, self.relu_dim, self.dtype, "head")(hidden).astype(jnp.float32)

    def describe(self) -> str:
        return f"bilstm {self.embed_dim}/{self.hidden_dim}, relu {self.relu_dim}, dropout {self.dropout}"


def valid_windows(attention_mask: jax.Array, width: int) -> jax.Array:
    """[B, L] bool: the windows of `width` tokens that max-over-time reads (start p <= max(n - width, 0))."""
    n = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)
    return jnp.arange(attention_mask.shape[1])[None, :] <= jnp.maximum(n - width, 0)[:, None]


class CNNStudent(nn.Module):
    vocab_size: int = 50257
    embed_dim: int = 300
    widths: Sequence[int] = (3, 4, 5)
    filters: int = 100
    dropout: float = 0.0
    dtype: Any = jnp.float32
    n_labels: int = N_LABELS

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        length = input_ids.shape[1]
        x = embed_tokens(self, input_ids) * attention_mask[..., None].astype(self.dtype)  # padding reads as zeros
        x = jnp.pad(x, ((0, 0), (0, max(self.widths) - 1), (0, 0)))  # every window start has a full window
        pooled = []
        for w in self.widths:
            init = torch_uniform(w * self.embed_dim)
            conv = nn.Conv(self.filters, (w,), padding="VALID", kernel_init=init, bias_init=init, dtype=self.dtype,
                           name=f"conv{w}")
            h = nn.relu(conv(x)[:, :length])  # [B, L, filters]: window p covers tokens p..p+w-1
            # after the ReLU every value is >= 0, so a masked-out window as 0 never wins the max unless all are 0
            pooled.append(jnp.max(jnp.where(valid_windows(attention_mask, w)[..., None], h, 0), axis=1))
        features = nn.Dropout(self.dropout, deterministic=deterministic)(jnp.concatenate(pooled, axis=-1))
        fan_in = len(self.widths) * self.filters
        return torch_dense(self.n_labels, fan_in, self.dtype, "head")(features).astype(jnp.float32)

    def describe(self) -> str:
        return (f"cnn {self.embed_dim}, widths {list(self.widths)} x {self.filters} filters, "
                f"dropout {self.dropout}")
