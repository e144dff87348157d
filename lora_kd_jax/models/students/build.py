"""Which student a run trains (`student.arch`), behind the one model interface: the study's RNN (`students.rnn`),
Tang et al.'s BiLSTM and Kim's CNN (`students.zoo`), or the teacher's own architecture, shortened
(`students.transformer`). Training, many seeds, resume, evaluation and the bench treat them alike.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_kd_jax.core import precision
from lora_kd_jax.core.config import Config, StudentConfig, n_outputs
from lora_kd_jax.models.interface import STUDENT, Labels
from lora_kd_jax.models.students.rnn import N_LABELS, RNNStudent
from lora_kd_jax.models.students.transformer import build_transformer
from lora_kd_jax.models.students.zoo import BiLSTMStudent, CNNStudent

Params = dict[str, Any]


def _rnn(sc: StudentConfig, dtype: Any, n_labels: int) -> nn.Module:
    return RNNStudent(vocab_size=sc.vocab_size, embed_dim=sc.embed_dim, hidden_dim=sc.hidden_dim, cell=sc.cell,
                      bidirectional=sc.bidirectional, pooling=sc.pooling, dtype=dtype, n_labels=n_labels)


def _bilstm(sc: StudentConfig, dtype: Any, n_labels: int) -> nn.Module:
    return BiLSTMStudent(vocab_size=sc.vocab_size, embed_dim=sc.embed_dim, hidden_dim=sc.hidden_dim,
                         relu_dim=sc.relu_dim or sc.hidden_dim, dropout=sc.dropout, dtype=dtype, n_labels=n_labels)


def _cnn(sc: StudentConfig, dtype: Any, n_labels: int) -> nn.Module:
    return CNNStudent(vocab_size=sc.vocab_size, embed_dim=sc.embed_dim, widths=tuple(sc.cnn_widths),
                      filters=sc.cnn_filters, dropout=sc.dropout, dtype=dtype, n_labels=n_labels)


MODULES = {"rnn": _rnn, "bilstm": _bilstm, "cnn": _cnn}  # the flax students: student.arch -> their module


def make_student(sc: StudentConfig | Config) -> nn.Module:
    """The flax module of a run's student (its head as wide as the run's label set: `config.n_outputs`), or of a
    student section alone (CoLA's two labels)."""
    n_labels = N_LABELS
    if isinstance(sc, Config):
        sc, n_labels = sc.student, n_outputs(sc)
    if sc.arch not in MODULES:
        raise ValueError(f"student.arch={sc.arch} is not one flax module: build it with build_student")
    return MODULES[sc.arch](sc, precision.dtype(sc.dtype, "student"), n_labels)


def _flax_student(sc: StudentConfig | Config, embedding: Any, teacher_base: Any) -> StudentClassifier:
    if teacher_base is not None:
        arch = (sc.student if isinstance(sc, Config) else sc).arch
        raise ValueError(f"student.arch={arch} does not start from the teacher's layers")
    return StudentClassifier(make_student(sc), embedding)


@dataclasses.dataclass(frozen=True)
class StudentArch:
    """What a student.arch is to the trainers: how it is built (from a config, a start table for its token embedding,
    its teacher's merged base) and whether it starts from its teacher's layers (then `with_teacher` resolves its
    config against the teacher run's, and it takes the teacher's embeddings with them)."""

    build: Callable[..., Any]
    from_teacher_layers: bool = False


ARCHS: dict[str, StudentArch] = {**{name: StudentArch(_flax_student) for name in MODULES},
                                 "transformer": StudentArch(build_transformer, from_teacher_layers=True)}


def student_arch(cfg: Config) -> StudentArch:
    return ARCHS[cfg.student.arch]


def _example(length: int = 4) -> tuple[jax.Array, jax.Array]:
    ids = jnp.zeros((1, length), jnp.int32)
    return ids, jnp.ones_like(ids)


@functools.partial(jax.jit, static_argnums=0)
def _draw(module: nn.Module, key: jax.Array) -> Params:
    """A student's parameters from `key`: one compiled program per student configuration (equal linen modules are
    equal), for every seed and every student a process builds."""
    return module.init(key, *_example())["params"]


@dataclasses.dataclass(frozen=True)
class StudentClassifier:
    """A flax student behind the one model interface: every leaf trains (label 'student'). Dropout (bilstm, cnn)
    draws from `rng` when not `deterministic`; the RNN has none. `embedding`, when given, is the [vocab, embed] table
    'embed' starts from instead of its random draw (every seed starts from it; the other leaves still come from each
    seed's key)."""

    module: nn.Module
    embedding: Any = dataclasses.field(default=None, compare=False, repr=False)

    def init(self, key: jax.Array) -> Params:
        params = _draw(self.module, key)
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
    student.arch=transformer: a `TransformerStudent`, sliced from `teacher_base` (the teacher's merged base)."""
    arch = (sc.student if isinstance(sc, Config) else sc).arch
    model = ARCHS[arch].build(sc, embedding=embedding, teacher_base=teacher_base)
    params = jax.eval_shape(model.init, key) if shapes_only else model.init(key)
    return model, params


def count_params(params: Params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
