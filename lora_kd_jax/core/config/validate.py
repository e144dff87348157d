"""The checks a config must pass before any compute: each key's range (its schema field says which), and the
combinations that make no sense. Every error is a `ConfigError` naming the key and what would be right."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from lora_kd_jax.core.config.schema import STUDENT_KEYS, Config, StudentConfig
from lora_kd_jax.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the dotted key."""
    label = "config error"


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # ORG/NAME, as the hub spells repository ids
REGRESSION_METRICS = ("pearson", "spearman")  # what train.select may name for a regression run (the rest: a classifier)


def is_hub_id(name: str) -> bool:
    """model.name names a hub repository (ORG/NAME), not a released size or custom."""
    return HUB_ID.fullmatch(name) is not None and ".." not in name


def fields(cfg: Config) -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) of every key of `cfg`."""
    return [(f"{section.name}.{f.name}", f, getattr(getattr(cfg, section.name), f.name))
            for section in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, section.name))]


def _check_ranges(cfg: Config) -> None:
    for key, f, v in fields(cfg):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v}")
        if v is None or isinstance(v, (list, str, bool)):
            continue
        if f.metadata.get("positive") and v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
        if f.metadata.get("non_negative") and v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
        if f.metadata.get("probability") and not 0.0 <= v < 1.0:
            raise ConfigError(f"{key}: must be in [0, 1), got {v}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; raise ConfigError naming the key. (Choices and types are the parser's.)"""
    _check_ranges(cfg)
    _validate_model(cfg)
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


def _validate_model(cfg: Config) -> None:
    """model.name: a released size (checked against the family table when the model is built), `custom`, or a hub
    id ORG/NAME; a hub id names pretrained weights. Sizes that make no model."""
    m = cfg.model
    if not (is_hub_id(m.name) or re.fullmatch(r"[A-Za-z0-9][\w.-]*", m.name)):
        raise ConfigError(f"model.name: {m.name!r} is neither a released size (e.g. gpt2-medium), custom, nor a hub id "
                          "ORG/NAME (e.g. google-bert/bert-base-uncased, FacebookAI/roberta-base)")
    if is_hub_id(m.name) and m.init == "random":
        raise ConfigError(f"model.name={m.name} with model.init=random: a hub id names pretrained weights, which a "
                          "random init does not read; set model.init=pretrained, or model.name=custom with "
                          "model.type and model.n_layer/n_embd/n_head for a random model")
    if m.path and m.init == "random":
        raise ConfigError(f"model.path={m.path} with model.init=random: a random init reads no checkpoint; set "
                          "model.init=pretrained to load it, or drop model.path")
    if cfg.data.max_length > m.n_positions:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model's {m.n_positions} positions "
                          "(model.n_positions)")
    sizes = (m.n_layer, m.n_embd, m.n_head)
    if m.name == "custom" and None in sizes and not m.path:
        raise ConfigError("model.name=custom needs model.n_layer, model.n_embd and model.n_head")
    if any(s is not None for s in sizes) and m.init == "pretrained" and not m.path and not is_hub_id(m.name):
        raise ConfigError("model.n_layer/n_embd/n_head override the size, which has no pretrained weights: "
                          "set model.init=random (or model.path to a checkpoint of that size)")
    if m.n_embd is not None and m.n_head is not None and m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")


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
    """The keys one student architecture reads (`STUDENT_KEYS`: the RNN's cell, bidirectional and the original's
    last_step pooling; the transformer's layers and heads) mean nothing to the others: refused rather than ignored
    (`load` drops those a config file set, with a log line, before this check)."""
    s = cfg.student
    if not s.cnn_widths or any(w <= 0 for w in s.cnn_widths):
        raise ConfigError(f"student.cnn_widths: needs one or more widths > 0, got {s.cnn_widths}")
    defaults = StudentConfig()
    for reader, keys in STUDENT_KEYS.items():
        if reader == s.arch:
            continue
        for key in keys:
            value, default = getattr(s, key), getattr(defaults, key)
            if value != default:
                shown = str(default).lower() if isinstance(default, bool) else default
                raise ConfigError(f"student.{key}={value} with student.arch={s.arch}: only the {reader} student "
                                  f"reads it (the {s.arch} student has its own fixed shape); drop it (the value "
                                  f"that works: student.{key}={shown}, its default) or set student.arch={reader}")
    ARCH_CHECKS.get(s.arch, lambda _: None)(s)


def _validate_transformer_student(s: StudentConfig) -> None:
    """What can be checked without the teacher (its depth is checked when the distillation reads its run)."""
    if any(i < 0 for i in s.teacher_layers):
        raise ConfigError(f"student.teacher_layers={s.teacher_layers}: layer indices count from 0")
    if s.layers and s.teacher_layers and s.layers != len(s.teacher_layers):
        raise ConfigError(f"student.layers={s.layers} with student.teacher_layers={s.teacher_layers} "
                          f"({len(s.teacher_layers)} layers): give one of the two, or the same count")
    if s.heads and s.embed_dim % s.heads:
        raise ConfigError(f"student.heads={s.heads} does not divide student.embed_dim={s.embed_dim}")


ARCH_CHECKS = {"transformer": _validate_transformer_student}  # a student.arch's own checks of its keys


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
    if lc.double_quant and lc.quantize != "nf4":
        raise ConfigError(f"lora.double_quant=true with lora.quantize={lc.quantize}: double quantization compresses "
                          "NF4's per-block absmax values; set lora.quantize=nf4 or drop lora.double_quant")


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


def n_outputs(cfg: Config) -> int:
    """Outputs of a run's head: 1 for regression, else model.num_labels, the number of data.labels, or CoLA's 2."""
    if cfg.data.problem == "regression":
        return 1
    return cfg.model.num_labels or len(cfg.data.labels) or 2


def select_metric(cfg: Config) -> str:
    """The validation metric that picks the best epoch: train.select, else accuracy (regression: pearson)."""
    return cfg.train.select or ("pearson" if cfg.data.problem == "regression" else "accuracy")
