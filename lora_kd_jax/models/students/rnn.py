"""The RNN student: Embedding(vocab, embed) -> one recurrent layer (hidden) -> Dense(hidden -> 2).

Seed-faithful shape (the PyTorch original): nn.Embedding(50257, 768) -> nn.RNN(768, 768) (tanh) -> nn.Linear(768, 2)
on the RNN output of the last time step. Parameter tree (all of it trains):

    {'embed': {'embedding': (vocab, embed)},
     'rnn': {'i': {'kernel': (embed, hidden), 'bias': (hidden,)}, 'h': {'kernel': (hidden, hidden), 'bias': ...}},
     ['rnn_backward': same as 'rnn', when bidirectional]
     'head': {'kernel': (hidden * directions, 2), 'bias': (2,)}}

Why `TorchRNNCell` rather than `nn.SimpleCell`: Flax's SimpleCell has one bias (on the input projection), torch's
nn.RNN has two (b_ih and b_hh). The forward functions agree when b = b_ih + b_hh, but training does not: Adam moves
each of torch's two biases by ~lr per step, so the effective bias moves twice as fast as a single Flax bias. To
track the original step for step (tested against torch), the cell keeps both biases: 'i' = (W_ihᵀ, b_ih),
'h' = (W_hhᵀ, b_hh). Initialisers follow torch's defaults too (embedding N(0, 1); RNN and Linear weights and
biases U(±1/sqrt(fan))), so that from-scratch runs start from the same distribution as the original.

`gru` and `lstm` use Flax's GRUCell / OptimizedLSTMCell (torch-style uniform init); they compute torch's
nn.GRU / nn.LSTM when torch's two bias vectors are summed into Flax's one where Flax has one.

Pooling:
- `last_step` (the original): the output at position L-1, whatever the padding. For a right-padded sentence that is
  the state after reading the pad tokens too, one reason the original barely beats the majority class.
- `last_token` (default): the output at the last real token (attention_mask.sum - 1). Bidirectional: the forward
  output there, concatenated with the backward output at position 0 (the backward pass reads only the real tokens,
  so both halves summarise exactly the sentence; padding never reaches the logits).

`student.arch` picks this RNN (the default, the study's) or another student (`students.build`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_kd_jax.models.interface import last_token_index
from lora_kd_jax.models.students.torch_init import torch_linear_kernel, torch_uniform

N_LABELS = 2  # CoLA's: the head of a student section built alone


class TorchRNNCell(nn.RNNCellBase):
    """h' = tanh(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh): torch.nn.RNN's cell, both biases kept (see module docstring)."""

    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        init = torch_uniform(self.features)
        dense = lambda name: nn.Dense(self.features, use_bias=True, kernel_init=init, bias_init=init,  # noqa: E731
                                      dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        h = jnp.tanh(dense("i")(inputs) + dense("h")(carry))
        return h, h

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
        return jnp.zeros((*input_shape[:-1], self.features), self.dtype or self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class HoistedTorchRNN(nn.Module):
    """TorchRNNCell's recurrence with the input projection hoisted out of the time loop.

    x·W_ihᵀ + b_ih for every position is one [B·L, embed] x [embed, hidden] matrix product before the scan; the
    scan then carries only h·W_hhᵀ + b_hh. Same parameters and tree ('i', 'h') as nn.RNN(TorchRNNCell(name=...)),
    same function; on accelerators it replaces L small input products by one large one.
    """

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = torch_uniform(self.features)
        dense = lambda name: nn.Dense(self.features, use_bias=True, kernel_init=init, bias_init=init,  # noqa: E731
                                      dtype=self.dtype, name=name)
        xi = dense("i")(x)  # [B, L, H]: all input projections at once
        recurrent = dense("h")
        h0 = jnp.zeros((x.shape[0], self.features), xi.dtype)
        recurrent(h0)  # creates 'h' at init; its result is unused (and dropped by XLA) when applying
        w = recurrent.variables["params"]["kernel"].astype(xi.dtype)
        b = recurrent.variables["params"]["bias"].astype(xi.dtype)

        def step(h, xi_t):
            h = jnp.tanh(xi_t + (h @ w + b))
            return h, h

        _, hs = jax.lax.scan(step, h0, jnp.swapaxes(xi, 0, 1))
        return jnp.swapaxes(hs, 0, 1)  # [B, L, H]


GATED_CELLS = {"gru": nn.GRUCell, "lstm": nn.OptimizedLSTMCell}  # Flax's cells, given PyTorch's initialisers


def make_cell(cell: str, features: int, dtype: Any = None, name: str | None = None) -> nn.RNNCellBase:
    if cell == "rnn":
        return TorchRNNCell(features, dtype=dtype, name=name)
    if cell not in GATED_CELLS:
        raise ValueError(f"student.cell: unknown cell {cell!r}; expected rnn, {' or '.join(GATED_CELLS)}")
    init = torch_uniform(features)
    # the carry has the compute dtype (Flax's default uses param_dtype, which breaks the scan under bfloat16)
    carry_init = lambda key, shape, _dtype: jnp.zeros(shape, dtype or jnp.float32)  # noqa: E731
    return GATED_CELLS[cell](features, kernel_init=init, recurrent_kernel_init=init, bias_init=init,
                             carry_init=carry_init, dtype=dtype, name=name)


class RNNStudent(nn.Module):
    vocab_size: int = 50257
    embed_dim: int = 768
    hidden_dim: int = 768
    cell: str = "rnn"
    bidirectional: bool = False
    pooling: str = "last_token"
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    n_labels: int = N_LABELS  # outputs of the head (1 for a regression run)

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """[B, L] ids and mask -> float32 logits [B, n_labels]."""
        x = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=nn.initializers.normal(1.0), dtype=self.dtype,
                     name="embed")(input_ids)
        last = last_token_index(attention_mask)
        rows = jnp.arange(input_ids.shape[0])
        # Flax's RNN stores its cell's parameters under the cell's name: 'rnn' (and 'rnn_backward')
        if self.cell == "rnn":
            forward = HoistedTorchRNN(self.hidden_dim, self.dtype, name="rnn")(x)  # [B, L, H]
        else:
            forward = nn.RNN(make_cell(self.cell, self.hidden_dim, self.dtype, name="rnn"))(x)
        if self.pooling == "last_step":
            pooled = forward[:, -1]
        elif self.pooling == "last_token":
            pooled = forward[rows, last]
        else:
            raise ValueError(f"student.pooling: unknown pooling {self.pooling!r}; expected last_token or last_step")
        if self.bidirectional:
            backward_rnn = nn.RNN(make_cell(self.cell, self.hidden_dim, self.dtype, name="rnn_backward"))
            if self.pooling == "last_step":  # torch: backward output at L-1 = the backward pass's first step
                backward = backward_rnn(x, reverse=True, keep_order=True)[:, -1]
            else:  # reads the real tokens only, last to first; its output at position 0 summarises them all
                backward = backward_rnn(x, seq_lengths=last + 1, reverse=True, keep_order=True)[:, 0]
            pooled = jnp.concatenate([pooled, backward], axis=-1)
        fan_in = pooled.shape[-1]
        logits = nn.Dense(self.n_labels, kernel_init=torch_linear_kernel(), bias_init=torch_uniform(fan_in),
                          dtype=self.dtype, name="head")(pooled)
        return logits.astype(jnp.float32)

    def describe(self) -> str:
        return (f"{self.cell}{' bidirectional' if self.bidirectional else ''} {self.embed_dim}/{self.hidden_dim}, "
                f"pooling {self.pooling}")
