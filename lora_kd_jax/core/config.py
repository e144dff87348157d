"""Typed, validated run configuration: YAML files plus `section.key=value` overrides.

Every script reads one of these. Unknown keys, wrong types and out-of-range values fail here, before any
compute, with the full dotted key in the message (and the closest known key for a typo).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from lora_kd_jax.core.errors import UserError
from lora_kd_jax.core.families import TYPES as FAMILY_TYPES
from lora_kd_jax.core.gpt2_layout import CONV1D_MODULES, GPT2_SIZES

DEFAULT_LORA_TARGETS = CONV1D_MODULES  # every Conv1D of every block


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the dotted key."""
    label = "config error"


@dataclasses.dataclass
class ModelConfig:
    name: str = "gpt2"  # gpt2 | gpt2-medium | gpt2-large | gpt2-xl | distilgpt2 | custom (needs n_layer/n_embd/
    # n_head) | a hub id ORG/NAME of any family (e.g. google-bert/bert-base-uncased: its config.json decides model.type)
    init: str = "pretrained"  # pretrained (hub name or model.path) | random (init by size)
    path: str = ""  # local dir written by save_pretrained; takes precedence over the hub name
    n_layer: int | None = None  # override the named size (random init only)
    n_embd: int | None = None
    n_head: int | None = None
    vocab_size: int = 50257
    n_positions: int = 1024
    dropout: float = 0.0  # GPT-2's own resid/embd/attn dropout; 0 in the seed-faithful configs
    dtype: str = "auto"  # compute dtype: auto (per backend, see precision.py) | float32 | bfloat16
    base_dtype: str = "auto"  # storage dtype of the frozen base weights: auto | float32 | bfloat16
    base_seed: int = -1  # the seed whose key draws a random-init base; -1 = train.seed (train.seeds: its first seed)
    num_labels: int = 0  # outputs of the head; 0 = from the data (CoLA: 2; regression: 1)
    type: str = "gpt2"  # architecture family: gpt2 | bert | roberta | llama (model.path or a hub id in model.name:
    # read from its config.json)


@dataclasses.dataclass
class DataConfig:
    dir: str = ""  # "" = the packaged CoLA (in-domain dev as validation, out-of-domain dev reported) | hub | a local dir
    tokenizer: str = ""  # "" = the packaged GPT-2 BPE files | a hub name | a local dir with vocab.json + merges.txt
    max_length: int = 20
    limit: int = 0  # keep only the first N examples of each split; 0 = all
    buckets: list[int] = dataclasses.field(default_factory=list)  # length-aware batching: padded lengths; [] = off
    group_window: int = 0  # with buckets: group training rows by length within windows of N batches; 0 = off
    task: str = ""  # a GLUE preset: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli (columns, labels, metric)
    train: str = ""  # a table file (.tsv/.csv/.jsonl/.json/.parquet) to train on; "" = CoLA from data.dir
    validation: str = ""  # the table file that picks the best epoch (needed with data.train)
    report: list[str] = dataclasses.field(default_factory=list)  # further table files scored every epoch
    text: str = "sentence"  # column of the text (tables only)
    text_pair: str = ""  # column of the second text of a sentence pair; "" = single sentences
    label: str = "label"  # column of the label: integers, strings (ids in sorted order) or real numbers (regression)
    labels: list[str] = dataclasses.field(default_factory=list)  # label names by id; [] = from the training file
    problem: str = "auto"  # auto (real-valued labels = regression) | classification | regression


@dataclasses.dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0  # scale alpha/rank (rsLoRA: alpha/sqrt(rank)); seed init has no scaling
    dropout: float = 0.1  # dropout on the adapter input
    init: str = "seed"  # seed (U, V Xavier-uniform, no scaling) | standard (A random, B zero, as PEFT) | pissa (SVD
    # of the frozen weight) | olora (QR of it): both keep the residual as the base
    scaling: str = "standard"  # standard (alpha/rank) | rslora (alpha/sqrt(rank))
    variant: str = "lora"  # lora | dora (a trained magnitude per output feature times the normalised direction)
    plus_ratio: float = 1.0  # LoRA+: B's (and every 1-D trained leaf's) learning rate = plus_ratio x the rate
    targets: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    modules_to_save: list[str] = dataclasses.field(default_factory=list)  # base modules trained fully (encoders)


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 128
    eval_batch_size: int = 0  # 0 = same as batch_size
    select: str = ""  # the validation metric that picks the best epoch; "" = accuracy (regression: pearson)
    lr: float = 1e-3
    epochs: int = 10
    seed: int = 0
    seeds: list[int] = dataclasses.field(default_factory=list)  # N seeds trained at once in one program; [] = train.seed
    on_nonfinite: str = "stop"  # a NaN/Inf loss: stop (naming step and epoch) | skip (drop that batch's update)
    schedule: str = "constant"  # learning rate over the run: constant | linear (decay to 0) | cosine (decay to 0)
    warmup: float = 0.0  # linear warm-up from 0: a number of steps (>= 1), or a fraction of all steps (< 1)
    weight_decay: float = 0.0  # decoupled (AdamW); never on LayerNorms or biases
    max_grad_norm: float = 0.0  # clip the global norm of the trainable gradients to this; 0 = no clipping
    accumulate: int = 1  # split each batch of batch_size into K micro-batches, one optimizer step (less memory)
    patience: int = 0  # stop after P epochs without a better validation score; 0 = off
    max_steps: int = 0  # stop after N optimizer steps (the schedule then spans N); 0 = off

    @property
    def eval_batch(self) -> int:
        """The evaluation batch size: train.eval_batch_size, or train.batch_size when that is 0."""
        return self.eval_batch_size or self.batch_size


@dataclasses.dataclass
class StudentConfig:
    vocab_size: int = 50257
    embed_dim: int = 768
    hidden_dim: int = 768
    cell: str = "rnn"  # rnn (tanh) | gru | lstm
    bidirectional: bool = False
    pooling: str = "last_token"  # last_token (last real token) | last_step (original: last padded position)
    dtype: str = "auto"  # compute dtype: auto (float32 on every measured backend) | float32 | bfloat16
    arch: str = "rnn"  # rnn (the study's: cell, bidirectional, pooling) | bilstm (Tang et al. 2019) | cnn (Kim 2014)
    # | transformer (the teacher's architecture, fewer layers, DistilBERT-style init)
    relu_dim: int = 0  # bilstm: width of the ReLU layer before the output; 0 = student.hidden_dim
    cnn_widths: list[int] = dataclasses.field(default_factory=lambda: [3, 4, 5])  # cnn: n-gram widths of the filters
    cnn_filters: int = 100  # cnn: filters per width (Kim: 100)
    dropout: float = 0.0  # bilstm, cnn: dropout before the output layer (Kim: 0.5)
    embeddings: str = "random"  # random (N(0, 1)) | teacher (distill.teacher's wte, PCA-projected when narrower)
    layers: int = 0  # transformer: blocks; 0 = half the teacher's, rounded up (no teacher: 2)
    teacher_layers: list[int] = dataclasses.field(default_factory=list)  # transformer: the teacher's blocks it
    # starts from, in order; [] = every other one from 0 (DistilBERT)
    heads: int = 0  # transformer without a teacher: attention heads; 0 = embed_dim // 64 (at least 1)


@dataclasses.dataclass
class DistillConfig:
    teacher: str = ""  # a LoRA run dir (or its checkpoints/ dir)
    temperature: float = 2.0
    alpha: float = 0.0  # weight of the hard-label cross-entropy; 0 reproduces the original (KL only)
    cache_teacher_logits: bool = True
    loss: str = "kl"  # kl (T²·KL, the original) | mse (Tang et al. 2019: squared distance of the logits, no T)
    augment: int = 0  # transfer set: N augmented copies of each training sentence (Tang et al.); 0 = none
    p_mask: float = 0.1  # augmentation: a word becomes the mask token
    p_swap: float = 0.1  # augmentation: a word is swapped for one of its class
    p_ngram: float = 0.25  # augmentation: the copy is cut to a random n-gram (n in 1..5)
    augment_seed: int = 0  # the augmentation's seed (one transfer set for every train.seed)
    unlabeled: str = ""  # a text file, one sentence per line, added to the transfer set
    logits_cache: str = ""  # where the transfer set's teacher logits are kept; "" = RUN_DIR/teacher_logits


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # data-parallel devices; -1 = every device left after fsdp
    fsdp: int = 1  # devices that shard the frozen base weights (FSDP-style); batches are split over both axes


@dataclasses.dataclass
class DistributedConfig:
    enabled: bool = False  # call jax.distributed.initialize (multi-host); SLURM/TPU settings are auto-detected
    coordinator_address: str = ""  # host:port of process 0; "" = auto-detect
    num_processes: int = 0  # 0 = auto-detect
    process_id: int = -1  # -1 = auto-detect
    cpu_collectives: str = "gloo"  # CPU-only runs: the collectives implementation (gloo works over loopback)


@dataclasses.dataclass
class RunConfig:
    dir: str = "runs/default"
    overwrite: bool = False  # allow writing into a run dir that holds a different run
    compilation_cache: str = "~/.cache/lora_kd_jax/xla"  # "" disables the persistent compilation cache
    wandb: str = ""  # a Weights & Biases project to log to (needs `pip install wandb`); "" = off


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.init": ("pretrained", "random"),
    "model.type": FAMILY_TYPES,
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.base_dtype": ("auto", "float32", "bfloat16"),
    "lora.init": ("seed", "standard", "pissa", "olora"),
    "lora.scaling": ("standard", "rslora"),
    "lora.variant": ("lora", "dora"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.schedule": ("constant", "linear", "cosine"),
    "train.select": ("", "accuracy", "mcc", "f1", "macro_f1", "pearson", "spearman"),
    "data.problem": ("auto", "classification", "regression"),
    "data.task": ("", "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"),
    "student.cell": ("rnn", "gru", "lstm"),
    "student.pooling": ("last_token", "last_step"),
    "student.dtype": ("auto", "float32", "bfloat16"),
    "distill.loss": ("kl", "mse"),
    "student.arch": ("rnn", "bilstm", "cnn", "transformer"),
    "student.embeddings": ("random", "teacher"),
    "distributed.cpu_collectives": ("gloo", "mpi", "none"),
}
POSITIVE: tuple[str, ...] = (
    "model.vocab_size", "model.n_positions", "data.max_length", "lora.rank", "lora.alpha", "train.batch_size",
    "train.lr", "train.epochs", "student.vocab_size", "student.embed_dim", "student.hidden_dim",
    "distill.temperature", "model.n_layer", "model.n_embd", "model.n_head", "mesh.fsdp", "train.accumulate",
    "student.cnn_filters", "lora.plus_ratio",
)
NON_NEGATIVE: tuple[str, ...] = ("model.num_labels",
                                 "data.limit", "data.group_window", "train.eval_batch_size", "distill.alpha",
                                 "model.dropout", "train.warmup", "train.weight_decay", "train.max_grad_norm",
                                 "train.patience", "train.max_steps", "distill.augment", "distill.augment_seed",
                                 "student.relu_dim", "student.layers", "student.heads")
PROBABILITY: tuple[str, ...] = ("lora.dropout", "model.dropout", "distill.p_mask", "distill.p_swap",
                                "distill.p_ngram", "student.dropout")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation; ints are accepted for floats. Raise ConfigError naming key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [a for a in options if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if isinstance(value, str):  # `lora.targets=attn.c_attn,mlp.c_fc` or `data.buckets=8,16` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
            if inner is int:
                value = [int(v) if v.lstrip("-").isdigit() else v for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and inner is int and value == int(value):
            value = [int(value)]  # `data.buckets=16`: a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {annotation} for {key}")  # a bug in this module, not user input


def _unknown(key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def all_keys() -> list[str]:
    """Every dotted key the config accepts (for messages and docs)."""
    return [f"{name}.{f.name}" for name, cls in _field_types(Config).items() for f in dataclasses.fields(cls)]


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config from a nested dict (YAML content)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = _field_types(Config)
    known = all_keys()
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise _unknown(str(name), [*sections, *known])
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {value!r}")
        cls = sections[name]
        types_ = _field_types(cls)
        kwargs = {}
        for key, v in value.items():
            if key not in types_:
                raise _unknown(f"{name}.{key}", known)
            kwargs[key] = _coerce(f"{name}.{key}", v, types_[key])
        built[name] = cls(**kwargs)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config) -> None:
    """Range, choice and consistency checks; raise ConfigError naming the key."""
    for key, options in CHOICES.items():
        if _get(cfg, key) not in options:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(options)}")
    for key in POSITIVE:
        v = _get(cfg, key)
        if v is not None and v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
    for key in NON_NEGATIVE:
        v = _get(cfg, key)
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    for key in PROBABILITY:
        v = _get(cfg, key)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{key}: must be in [0, 1), got {v}")
    for key in all_keys():
        v = _get(cfg, key)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v}")
    m = cfg.model
    _validate_model_name(m)
    if m.path and m.init == "random":
        raise ConfigError(f"model.path={m.path} with model.init=random: a random init reads no checkpoint; set "
                          "model.init=pretrained to load it, or drop model.path")
    if cfg.data.max_length > m.n_positions:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model's {m.n_positions} positions "
                          "(model.n_positions); GPT-2 cannot read longer sequences")
    sizes = (m.n_layer, m.n_embd, m.n_head)
    if m.name == "custom" and None in sizes:
        raise ConfigError("model.name=custom needs model.n_layer, model.n_embd and model.n_head")
    if any(s is not None for s in sizes) and m.init == "pretrained" and not m.path and not is_hub_id(m.name):
        raise ConfigError("model.n_layer/n_embd/n_head override the size, which has no pretrained weights: "
                          "set model.init=random (or model.path to a checkpoint of that size)")
    n_embd, n_head = resolved_size(m)[1:]
    if n_embd % n_head:
        raise ConfigError(f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head})")
    if cfg.mesh.data == 0 or cfg.mesh.data < -1:
        raise ConfigError(f"mesh.data: must be -1 (all devices) or > 0, got {cfg.mesh.data}")
    if any(b <= 0 for b in cfg.data.buckets):
        raise ConfigError(f"data.buckets: lengths must be > 0, got {cfg.data.buckets}")
    if cfg.data.group_window and not cfg.data.buckets:
        raise ConfigError(f"data.group_window={cfg.data.group_window} without data.buckets: grouping rows by length "
                          "only pays when batches are cut to shorter lengths; set data.buckets (e.g. [8,12,16]) or "
                          "data.group_window=0")
    if cfg.data.buckets and cfg.student.pooling == "last_step":
        raise ConfigError("data.buckets with student.pooling=last_step: that pooling reads the last padded position, "
                          "which bucketing moves; use student.pooling=last_token or data.buckets=[]")
    w = cfg.train.warmup
    if w >= 1 and w != int(w):
        raise ConfigError(f"train.warmup={w}: give whole steps (e.g. 100) or a fraction of all steps below 1 (e.g. 0.1)")
    t = cfg.train
    if t.batch_size % t.accumulate:
        raise ConfigError(f"train.accumulate={t.accumulate} does not divide train.batch_size={t.batch_size}: the "
                          "batch is split into that many equal micro-batches; choose a divisor")
    if not cfg.lora.targets:
        raise ConfigError("lora.targets: needs at least one target pattern")
    _validate_lora(cfg)
    _validate_student(cfg)
    _validate_data(cfg)
    _validate_seeds(cfg)
    _validate_transfer(cfg)


MODEL_NAMES: tuple[str, ...] = (*GPT2_SIZES, "custom")  # model.name's own values; anything else is a hub id
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # ORG/NAME, as the hub spells repository ids


def is_hub_id(name: str) -> bool:
    """model.name names a hub repository (ORG/NAME), not one of GPT-2's sizes or custom."""
    return name not in MODEL_NAMES and HUB_ID.fullmatch(name) is not None and ".." not in name


def _validate_model_name(m: ModelConfig) -> None:
    """model.name: a GPT-2 size, custom, or a hub id ORG/NAME; a hub id names pretrained weights, so it needs
    model.init=pretrained."""
    if m.name not in MODEL_NAMES and not is_hub_id(m.name):
        raise ConfigError(f"model.name: {m.name!r} is not one of {', '.join(MODEL_NAMES)}, nor a hub id ORG/NAME "
                          "(e.g. google-bert/bert-base-uncased, FacebookAI/roberta-base)")
    if is_hub_id(m.name) and m.init == "random":
        raise ConfigError(f"model.name={m.name} with model.init=random: a hub id names pretrained weights, which a "
                          "random init does not read; set model.init=pretrained, or model.name=custom with "
                          "model.type and model.n_layer/n_embd/n_head for a random model")


def _validate_transfer(cfg: Config) -> None:
    d = cfg.distill
    if d.p_mask + d.p_swap > 1:
        raise ConfigError(f"distill.p_mask={d.p_mask} + distill.p_swap={d.p_swap} exceeds 1: each word is masked, "
                          "swapped or kept by one draw; make the two sum to at most 1")
    if not (d.augment or d.unlabeled):
        return
    made = f"distill.augment={d.augment}" if d.augment else f"distill.unlabeled={d.unlabeled}"
    if cfg.data.text_pair:
        raise ConfigError(f"{made} with data.text_pair={cfg.data.text_pair}: the transfer set is made of single "
                          "sentences; drop data.text_pair or distill.augment/distill.unlabeled")
    if not d.cache_teacher_logits:
        raise ConfigError(f"{made} with distill.cache_teacher_logits=false: the teacher labels the transfer set "
                          "once and its logits are cached; set distill.cache_teacher_logits=true")


def _validate_student(cfg: Config) -> None:
    """The RNN's own keys (cell, bidirectional, the original's last_step pooling) mean nothing to the other
    architectures: refused rather than ignored."""
    s = cfg.student
    if not s.cnn_widths or any(w <= 0 for w in s.cnn_widths):
        raise ConfigError(f"student.cnn_widths: needs one or more widths > 0, got {s.cnn_widths}")
    if s.arch == "transformer":
        _validate_transformer_student(s)
    else:
        for key, value in (("layers", s.layers), ("teacher_layers", s.teacher_layers), ("heads", s.heads)):
            if value:
                raise ConfigError(f"student.{key}={value} with student.arch={s.arch}: only the transformer student "
                                  f"reads it; drop it or set student.arch=transformer")
    if s.arch == "rnn":
        return
    for key, value, default in (("cell", s.cell, "rnn"), ("bidirectional", s.bidirectional, False),
                                ("pooling", s.pooling, "last_token")):
        if value != default:
            raise ConfigError(f"student.{key}={value} with student.arch={s.arch}: only the rnn student reads it "
                              f"(the {s.arch} student has its own fixed shape); drop it or set student.arch=rnn")


def _validate_transformer_student(s: StudentConfig) -> None:
    """What can be checked without the teacher (its depth is checked when the distillation reads its run)."""
    if any(i < 0 for i in s.teacher_layers):
        raise ConfigError(f"student.teacher_layers={s.teacher_layers}: layer indices count from 0")
    if s.layers and s.teacher_layers and s.layers != len(s.teacher_layers):
        raise ConfigError(f"student.layers={s.layers} with student.teacher_layers={s.teacher_layers} "
                          f"({len(s.teacher_layers)} layers): give one of the two, or the same count")
    if s.heads and s.embed_dim % s.heads:
        raise ConfigError(f"student.heads={s.heads} does not divide student.embed_dim={s.embed_dim}")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.train and not d.validation:
        raise ConfigError(f"data.train={d.train} without data.validation: a run needs a validation file to pick its "
                          "best epoch; set data.validation=FILE")
    if d.validation and not (d.train or d.task):
        raise ConfigError(f"data.validation={d.validation} without data.train: set data.train=FILE too")
    regression = d.problem == "regression"
    if cfg.train.select and d.problem != "auto" and (cfg.train.select in REGRESSION_METRICS) != regression:
        raise ConfigError(f"train.select={cfg.train.select} does not fit a {d.problem} run; use "
                          f"{'pearson or spearman' if regression else 'accuracy, mcc, f1 or macro_f1'}")
    if regression and cfg.model.num_labels not in (0, 1):
        raise ConfigError(f"model.num_labels={cfg.model.num_labels} with data.problem=regression: a regression head "
                          "has one output; drop model.num_labels")
    if d.labels and cfg.model.num_labels and cfg.model.num_labels < len(d.labels):
        raise ConfigError(f"model.num_labels={cfg.model.num_labels} is fewer than the {len(d.labels)} names in "
                          "data.labels")


def _validate_lora(cfg: Config) -> None:
    """Combinations of the LoRA variants that make no sense (README: LoRA variants)."""
    lc = cfg.lora
    if lc.init == "seed" and lc.scaling != "standard":
        raise ConfigError(f"lora.scaling={lc.scaling} with lora.init=seed: the seed init has no alpha scaling (scale "
                          "1) for rsLoRA to change; use lora.init=standard (or pissa, olora) or lora.scaling=standard")


def _validate_seeds(cfg: Config) -> None:
    seeds = cfg.train.seeds
    if cfg.train.seed < 0 or any(s < 0 for s in seeds):
        bad = cfg.train.seed if cfg.train.seed < 0 else next(s for s in seeds if s < 0)
        key = "train.seed" if cfg.train.seed < 0 else "train.seeds"
        raise ConfigError(f"{key}: seeds must be >= 0, got {bad}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"train.seeds={seeds}: seed(s) {', '.join(map(str, repeated))} appear more than once; each "
                          "seed is one run, so list each once")
    if cfg.model.base_seed < -1:
        raise ConfigError(f"model.base_seed: must be -1 (train.seed) or >= 0, got {cfg.model.base_seed}")


REGRESSION_METRICS = ("pearson", "spearman")  # what train.select may name for a regression run (the rest: a classifier)


def n_outputs(cfg: Config) -> int:
    """Outputs of a run's head: 1 for regression, else model.num_labels, the number of data.labels, or CoLA's 2."""
    if cfg.data.problem == "regression":
        return 1
    return cfg.model.num_labels or len(cfg.data.labels) or 2


def select_metric(cfg: Config) -> str:
    """The validation metric that picks the best epoch: train.select, else accuracy (regression: pearson)."""
    return cfg.train.select or ("pearson" if cfg.data.problem == "regression" else "accuracy")


def resolved_size(m: ModelConfig) -> tuple[int, int, int]:
    """(n_layer, n_embd, n_head): the named size with any explicit overrides applied."""
    base = GPT2_SIZES.get(m.name, (0, 0, 1))
    return tuple(o if o is not None else b for o, b in zip((m.n_layer, m.n_embd, m.n_head), base))  # type: ignore


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) onto a nested dict."""
    out = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override '{item}': key must look like section.key (e.g. train.lr=1e-3)")
        value = _yaml_number(yaml.safe_load(text)) if text.strip() else ""
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def _yaml_number(value: Any) -> Any:
    """PyYAML follows YAML 1.1, where `1e-3` is a string; accept it as the number anyone means."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in "e.") and value.strip() else value
        except ValueError:
            return value
    return value


def _numbers_in(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _numbers_in(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_numbers_in(v) for v in raw]
    return _yaml_number(raw)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply overrides, validate. `path=None` starts from the defaults."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{p} is a directory; expected a YAML config file (e.g. configs/smoke.yaml)")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        source = str(p)
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot be read: {e}") from None
        if raw is None:
            raise ConfigError(f"{p} is empty: a run from it would silently use every default; put at least one "
                              "setting in it (see configs/*.yaml)")
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections (model:, data:, train:, ...), got a YAML "
                              f"{type(raw).__name__}")
    raw = _numbers_in(raw)
    try:
        return from_dict(apply_overrides(raw, overrides), source)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
