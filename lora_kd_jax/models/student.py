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

`student.arch` picks this RNN (the default, the study's), one of `student_zoo`'s students (bilstm, cnn) or the
teacher's own architecture, shortened (transformer: `student_transformer`); every one sits behind the same model
interface (`StudentClassifier`, or `TransformerStudent` for the transformer), so training, many seeds, resume,
evaluation and the bench treat them alike. `student.embeddings=teacher` hands the classifier a start table for
'embed' (`distill.embeddings`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_kd_jax.core import precision
from lora_kd_jax.core.config import Config, StudentConfig, n_outputs
from lora_kd_jax.models.interface import STUDENT, Labels, last_token_index

Params = dict[str, Any]
N_LABELS = 2


def torch_uniform(fan: int) -> nn.initializers.Initializer:
    """torch's default for RNN weights/biases and Linear biases: U(-1/sqrt(fan), 1/sqrt(fan))."""
    bound = 1.0 / math.sqrt(fan)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_linear_kernel() -> nn.initializers.Initializer:
    """torch Linear weight init (kaiming_uniform a=sqrt(5)) = U(±1/sqrt(fan_in)); Flax kernels are (in, out)."""
    return lambda key, shape, dtype=jnp.float32: torch_uniform(shape[0])(key, shape, dtype)


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


def make_cell(cell: str, features: int, dtype: Any = None, name: str | None = None) -> nn.RNNCellBase:
    if cell == "rnn":
        return TorchRNNCell(features, dtype=dtype, name=name)
    init = torch_uniform(features)
    # the carry has the compute dtype (Flax's default uses param_dtype, which breaks the scan under bfloat16)
    carry_init = lambda key, shape, _dtype: jnp.zeros(shape, dtype or jnp.float32)  # noqa: E731
    kwargs = dict(kernel_init=init, recurrent_kernel_init=init, bias_init=init, carry_init=carry_init, dtype=dtype,
                  name=name)
    if cell == "gru":
        return nn.GRUCell(features, **kwargs)
    if cell == "lstm":
        return nn.OptimizedLSTMCell(features, **kwargs)
    raise ValueError(f"student.cell: unknown cell {cell!r}; expected rnn, gru or lstm")


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


def make_student(sc: StudentConfig | Config) -> nn.Module:
    """The student of a run's config (its head as wide as the run's label set: `config.n_outputs`), or of a
    student section alone (CoLA's two labels): `student.arch` picks the module."""
    from lora_kd_jax.models.student_zoo import BiLSTMStudent, CNNStudent  # the zoo builds on this module's inits

    n_labels = N_LABELS
    if isinstance(sc, Config):
        sc, n_labels = sc.student, n_outputs(sc)
    dtype = precision.dtype(sc.dtype, "student")
    if sc.arch == "bilstm":
        return BiLSTMStudent(vocab_size=sc.vocab_size, embed_dim=sc.embed_dim, hidden_dim=sc.hidden_dim,
                             relu_dim=sc.relu_dim or sc.hidden_dim, dropout=sc.dropout, dtype=dtype, n_labels=n_labels)
    if sc.arch == "cnn":
        return CNNStudent(vocab_size=sc.vocab_size, embed_dim=sc.embed_dim, widths=tuple(sc.cnn_widths),
                          filters=sc.cnn_filters, dropout=sc.dropout, dtype=dtype, n_labels=n_labels)
    if sc.arch == "transformer":
        raise ValueError("student.arch=transformer is not one flax module: build it with build_student")
    if sc.arch != "rnn":
        raise ValueError(f"student.arch: unknown architecture {sc.arch!r}; expected rnn, bilstm, cnn or transformer")
    return RNNStudent(vocab_size=sc.vocab_size, embed_dim=sc.embed_dim, hidden_dim=sc.hidden_dim, cell=sc.cell,
                      bidirectional=sc.bidirectional, pooling=sc.pooling, dtype=dtype, n_labels=n_labels)


def _example(length: int = 4) -> tuple[jax.Array, jax.Array]:
    ids = jnp.zeros((1, length), jnp.int32)
    return ids, jnp.ones_like(ids)


@dataclasses.dataclass(frozen=True)
class StudentClassifier:
    """A student behind the one model interface (`models.interface`): every leaf trains (label 'student').
    Dropout (bilstm, cnn) draws from `rng` when not `deterministic`; the RNN has none and ignores both.
    `embedding`, when given, is the [vocab, embed] table 'embed' starts from instead of its random draw (every seed
    starts from it; the other leaves still come from each seed's key)."""

    module: nn.Module
    embedding: Any = dataclasses.field(default=None, compare=False, repr=False)

    @functools.cached_property
    def _init(self) -> Any:
        """The jitted draw, built once per classifier: each seed's init reuses one compiled program."""
        return jax.jit(lambda k: self.module.init(k, *_example())["params"])

    def init(self, key: jax.Array) -> Params:
        params = self._init(key)
        if self.embedding is None:
            return params
        expected = params["embed"]["embedding"].shape
        if tuple(self.embedding.shape) != tuple(expected):
            raise ValueError(f"student embedding table {tuple(self.embedding.shape)} does not fit the student's "
                             f"{tuple(expected)}")
        return {**params, "embed": {"embedding": jnp.asarray(self.embedding, jnp.float32)}}

    def param_labels(self, params: Params) -> Labels:
        return jax.tree.map(lambda _: STUDENT, params)

    def logits(self, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool = True, rng: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
        del token_type_ids  # a BERT teacher's pair batches carry them (`token_inputs`); the student reads ids only
        if isinstance(self.module, RNNStudent):
            return self.module.apply({"params": params}, input_ids, attention_mask)
        rngs = {} if deterministic or rng is None else {"dropout": rng}
        return self.module.apply({"params": params}, input_ids, attention_mask, deterministic=deterministic,
                                 rngs=rngs)

    def describe(self) -> str:
        return f"{self.module.describe()}, {jnp.dtype(self.module.dtype).name}"


def build_student(sc: StudentConfig | Config, key: jax.Array, *, shapes_only: bool = False,
                  embedding: Any = None, teacher_base: Params | None = None) -> tuple[Any, Params]:
    """The student and its parameters from config (`shapes_only`: ShapeDtypeStructs, nothing allocated);
    `embedding`: the table 'embed' starts from (student.embeddings=teacher), else drawn at random.
    student.arch=transformer: a `student_transformer.TransformerStudent`, sliced from `teacher_base` (the teacher's
    merged base) when given."""
    arch = (sc.student if isinstance(sc, Config) else sc).arch
    if arch == "transformer":
        from lora_kd_jax.models.student_transformer import build_transformer

        model = build_transformer(sc, embedding=embedding, teacher_base=teacher_base)
    else:
        if teacher_base is not None:
            raise ValueError(f"student.arch={arch} does not start from the teacher's layers (only transformer does)")
        model = StudentClassifier(make_student(sc), embedding)
    params = jax.eval_shape(model.init, key) if shapes_only else model.init(key)
    return model, params


def count_params(params: Params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
