"""student.arch=transformer: a smaller copy of the teacher's own architecture, started from a subset of its layers
(DistilBERT, Sanh et al. 2019: the teacher's width, every other layer, the embeddings copied, a fresh head).

With a teacher (distillation) the student is the teacher's family (`cfg.model` is the teacher's model section) with
`student.layers` blocks, block i a copy of the teacher's merged (LoRA folded) block `student.teacher_layers[i]`;
every other leaf of the base (token and position embeddings, the final norm, BERT's pooler) is the teacher's too,
and the classification head is the family's, drawn fresh from each seed's key. No transformer is written here: the
one classifier (`models.classifier`, no LoRA spec) computes the logits over a slice of the teacher's tree.

Without a teacher (`train-student`, `bench`), the student is a random-init GPT-2 of the student's sizes
(`student.embed_dim` wide, `student.layers` blocks (0 = 2), `student.heads` heads (0 = embed_dim // 64),
`student.vocab_size` tokens, 1024 positions), GPT-2's own initialisers; `student.embeddings=teacher` replaces its
token table by the teacher's (`distill.embeddings`), as for the other students.

Every leaf trains (label STUDENT): full fine-tuning of the small transformer, as DistilBERT trains.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_kd_jax.core import precision
from lora_kd_jax.core.config import Config, ConfigError, ModelConfig, StudentConfig, n_outputs
from lora_kd_jax.models.build import arch_of
from lora_kd_jax.models.classifier import Classifier, init_params, random_base
from lora_kd_jax.models.families import FAMILIES, resolved_size
from lora_kd_jax.models.interface import STUDENT, Labels
from lora_kd_jax.models.students.rnn import N_LABELS

log = logging.getLogger(__name__)
Params = dict[str, Any]

POSITIONS = 1024  # the random-init student's positions (GPT-2's)
NO_TEACHER_LAYERS = 2  # the random-init student's depth when student.layers=0
HEAD_WIDTH = 64  # GPT-2's width per head: the random-init student's heads when student.heads=0


def teacher_depth(model_cfg: ModelConfig) -> int:
    """The teacher's number of blocks as its run's model section says (its released size or model.n_layer)."""
    return resolved_size(model_cfg)[0]


def default_teacher_layers(depth: int, layers: int = 0) -> list[int]:
    """DistilBERT's choice: every other teacher layer from 0, `layers` of them (0 = half the teacher's, rounded up)."""
    k = layers or math.ceil(depth / 2)
    if 2 * (k - 1) >= depth:
        raise ConfigError(f"student.layers={k}: every other layer of the teacher's {depth} gives at most "
                          f"{math.ceil(depth / 2)}; name the layers with student.teacher_layers=[...] (indices "
                          f"0..{depth - 1}) or set student.layers <= {math.ceil(depth / 2)}")
    return [2 * i for i in range(k)]


def with_teacher(cfg: Config, teacher_cfg: Config, where: str = "distill.teacher") -> Config:
    """`cfg` with the transformer student's keys resolved against its teacher (`teacher_cfg`: the teacher run's
    config), so that the run's config.yaml rebuilds the same student (`evaluate`, resume): model = the teacher's
    model section (its family and sizes), student.teacher_layers explicit, student.layers = their number,
    student.embed_dim and student.vocab_size = the teacher's, student.embeddings = teacher (the token table comes
    with the layers). Errors name the key and the teacher's depth."""
    s, m = cfg.student, teacher_cfg.model
    depth = teacher_depth(m)
    if s.heads:
        raise ConfigError(f"student.heads={s.heads} with a teacher ({where}): the transformer student keeps its "
                          f"teacher's heads; drop student.heads (it sizes the random-init student of train-rnn)")
    if s.teacher_layers:
        beyond = [i for i in s.teacher_layers if i >= depth]
        if beyond:
            raise ConfigError(f"student.teacher_layers={s.teacher_layers}: {beyond} beyond the {depth} "
                              f"layer{'s' if depth != 1 else ''} of the teacher in {where} (indices 0..{depth - 1})")
        layers = list(s.teacher_layers)
    else:
        if s.layers > depth:
            raise ConfigError(f"student.layers={s.layers} exceeds the {depth} layers of the teacher in {where}")
        layers = default_teacher_layers(depth, s.layers)
    if cfg.data.max_length > m.n_positions:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the {m.n_positions} positions of the "
                          f"teacher in {where}, which the transformer student keeps")
    width = resolved_size(m)[1]
    if s.embeddings != "teacher":
        log.info("student.arch=transformer: the token embeddings come from the teacher with its layers "
                 "(student.embeddings=teacher)")
    if s.embed_dim != width:
        log.info("student.arch=transformer: student.embed_dim=%d is the teacher's width, not %d", width, s.embed_dim)
    student = dataclasses.replace(s, layers=len(layers), teacher_layers=layers, embed_dim=width,
                                  vocab_size=m.vocab_size, embeddings="teacher")
    return dataclasses.replace(cfg, model=m, student=student)


def slice_layers(base: Params, family: str, layers: list[int] | tuple[int, ...]) -> Params:
    """The teacher's base tree with only `layers` of its blocks, renumbered: block i is the teacher's block
    layers[i]; every other leaf (embeddings, final norm, BERT's pooler) as it is. The leaves are the teacher's own
    arrays (no copy: `TransformerStudent.init` copies)."""
    path = FAMILIES[family].blocks
    blocks = base
    for p in path:
        blocks = blocks[p]
    depth = len(blocks)
    beyond = [i for i in layers if not 0 <= i < depth]
    if beyond:
        raise ConfigError(f"student.teacher_layers={list(layers)}: {beyond} beyond the teacher's {depth} layers "
                          f"(indices 0..{depth - 1})")
    sliced = {str(i): blocks[str(j)] for i, j in enumerate(layers)}
    out = dict(base)
    node = out
    for p in path[:-1]:
        node[p] = dict(node[p])
        node = node[p]
    node[path[-1]] = sliced
    return out


@dataclasses.dataclass(frozen=True)
class TransformerStudent:
    """The transformer student behind the one model interface: the family's classifier (no LoRA spec), the base it
    starts from (`start`: the teacher's slice, the same for every seed; None: drawn at random from each seed's key),
    optionally a token table replacing the drawn one (`embedding`, student.embeddings=teacher without a teacher's
    layers). The head is drawn from each seed's key. Every leaf trains."""

    classifier: Classifier  # no LoRA spec
    start: Params | None = dataclasses.field(default=None, repr=False, compare=False)
    embedding: Any = dataclasses.field(default=None, repr=False, compare=False)
    teacher_layers: tuple[int, ...] = ()

    @property
    def family(self) -> Any:
        return self.classifier.family

    def init(self, key: jax.Array) -> Params:
        """{prefix: base, 'head': ...}: the start (copied, float32: the train step donates it, and the teacher keeps
        its own) or a random base from `key`'s base key; the head from its head key (as `keys.model_keys`)."""
        k_base = jax.random.split(key, 3)[0]
        if self.start is not None:
            base = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), self.start)
        else:
            base = random_base(self.family, self.classifier.module, k_base)  # compiled once per module
        if self.embedding is not None:
            base = self._with_table(base)
        return init_params(self.classifier, base, key)

    def _with_table(self, base: Params) -> Params:
        flat = traverse_util.flatten_dict(base)
        path = self.family.token_table
        expected = tuple(flat[path].shape)
        if tuple(self.embedding.shape) != expected:
            raise ValueError(f"student embedding table {tuple(self.embedding.shape)} does not fit the student's "
                             f"{expected}")
        flat[path] = jnp.asarray(self.embedding, jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def param_labels(self, params: Params) -> Labels:
        return jax.tree.map(lambda _: STUDENT, params)

    def logits(self, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool = True, rng: jax.Array | None = None, **inputs: Any) -> jax.Array:
        return self.classifier.logits(params, input_ids, attention_mask, deterministic=deterministic, rng=rng,
                                      **inputs)

    def describe(self) -> str:
        a = self.classifier.arch
        origin = (f"teacher layers {list(self.teacher_layers)}" if self.teacher_layers else "random init")
        return (f"transformer ({self.family.name}) {a.num_layers} layers from {origin}, {a.hidden_size} wide, "
                f"{a.num_heads} heads, {jnp.dtype(self.classifier.dtype).name}")


def random_gpt2(sc: StudentConfig, n_labels: int) -> Classifier:
    """The classifier of the random-init student: the default model.type (GPT-2) at the student's sizes, its dropout
    and compute dtype."""
    layers = sc.layers or len(sc.teacher_layers) or NO_TEACHER_LAYERS
    heads = sc.heads or max(1, sc.embed_dim // HEAD_WIDTH)
    if sc.embed_dim % heads:
        raise ConfigError(f"student.heads={heads}{' (the default: embed_dim // 64)' if not sc.heads else ''} does "
                          f"not divide student.embed_dim={sc.embed_dim}; set student.heads to a divisor")
    m = ModelConfig(name="custom", init="random", n_layer=layers, n_embd=sc.embed_dim,
                    n_head=heads, vocab_size=sc.vocab_size, n_positions=POSITIONS, dropout=sc.dropout)
    return _family_classifier(Config(model=m), precision.student_dtype(sc), n_labels)


def _family_classifier(cfg: Config, dtype: str, n_labels: int) -> Classifier:
    fam = FAMILIES[cfg.model.type]
    return Classifier(fam, arch_of(cfg), precision.DTYPES[dtype], None, None, n_labels, name=fam.name)


def teacher_family_classifier(cfg: Config) -> Classifier:
    """The classifier of a student sliced from a teacher: cfg.model's family and sizes (the teacher's, as
    `with_teacher` resolved them) with len(student.teacher_layers) blocks, the student's dropout and dtype."""
    sc = cfg.student
    model = dataclasses.replace(cfg.model, dropout=sc.dropout)
    clf = _family_classifier(dataclasses.replace(cfg, model=model), precision.student_dtype(sc), n_outputs(cfg))
    return dataclasses.replace(clf, arch=clf.arch.with_layers(len(sc.teacher_layers)))


def build_transformer(sc: StudentConfig | Config, *, embedding: Any = None, teacher_base: Params | None = None
                      ) -> TransformerStudent:
    """The transformer student of a config: sliced from `teacher_base` (the teacher's merged base) along the
    resolved student.teacher_layers (`with_teacher`), or, with none resolved, the random-init GPT-2 of the
    student's sizes. A config with teacher layers but no `teacher_base` gives the student's shape with a random
    base (what the run reader restores a checkpoint onto)."""
    cfg = sc if isinstance(sc, Config) else None
    sc = cfg.student if cfg is not None else sc
    if cfg is not None and sc.teacher_layers:
        classifier = teacher_family_classifier(cfg)
        layers = tuple(sc.teacher_layers)
        start = slice_layers(teacher_base, cfg.model.type, layers) if teacher_base is not None else None
        if embedding is not None:
            raise ValueError("a transformer student sliced from its teacher takes the teacher's token table with "
                             "its layers; no separate embedding table")
        return TransformerStudent(classifier, start, None, layers)
    if teacher_base is not None:
        raise ValueError("a teacher base was given but student.teacher_layers is empty: resolve the config against "
                         "its teacher first (transformer.with_teacher)")
    n_labels = n_outputs(cfg) if cfg is not None else N_LABELS  # a student section alone: CoLA's two labels
    return TransformerStudent(random_gpt2(sc, n_labels), None, embedding)
