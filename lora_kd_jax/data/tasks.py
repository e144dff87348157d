"""Which task a run learns: the GLUE presets (`data.task`) and `resolve_task`, which fills a config's label set in.

Why resolved into the config: config.yaml is what every reader of a run (evaluate, predict, distillation, export)
rebuilds the model from, so the head's size (model.num_labels), the label names (data.labels, by id) and the
problem type (data.problem) are written there once, at the start of training, from the training file.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from lora_kd_jax.core.config import Config, ConfigError
from lora_kd_jax.data import tables
from lora_kd_jax.data.checks import checked_labels
from lora_kd_jax.data.cola import HUB, LABEL_NAMES


@dataclasses.dataclass(frozen=True)
class GluePreset:
    """One GLUE task in GLUE's own TSV layout (a dir with train.tsv and its dev files) and on the hub."""

    text: str
    text_pair: str
    label: str
    names: tuple[str, ...]  # by id, as the hub's ClassLabel; () for regression
    metric: str  # GLUE's metric for the task: what train.select defaults to
    dev: tuple[str, ...] = ("dev.tsv",)  # the first picks the best epoch, the rest are reported
    hub_text: tuple[str, str] = ("sentence", "")  # the hub copy's column names
    hub_dev: tuple[str, ...] = ("validation",)

    @property
    def problem(self) -> str:
        return "classification" if self.names else "regression"


GLUE: dict[str, GluePreset] = {
    "cola": GluePreset("sentence", "", "label", LABEL_NAMES, "mcc"),  # read by the CoLA reader (no header)
    "sst2": GluePreset("sentence", "", "label", ("negative", "positive"), "accuracy"),
    "mrpc": GluePreset("#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent"), "f1",
                       hub_text=("sentence1", "sentence2")),
    "qqp": GluePreset("question1", "question2", "is_duplicate", ("not_duplicate", "duplicate"), "f1",
                      hub_text=("question1", "question2")),
    "stsb": GluePreset("sentence1", "sentence2", "score", (), "pearson", hub_text=("sentence1", "sentence2")),
    "mnli": GluePreset("sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"), "accuracy",
                       dev=("dev_matched.tsv", "dev_mismatched.tsv"), hub_text=("premise", "hypothesis"),
                       hub_dev=("validation_matched", "validation_mismatched")),
    "qnli": GluePreset("question", "sentence", "label", ("entailment", "not_entailment"), "accuracy",
                       hub_text=("question", "sentence")),
    "rte": GluePreset("sentence1", "sentence2", "label", ("entailment", "not_entailment"), "accuracy",
                      hub_text=("sentence1", "sentence2")),
    "wnli": GluePreset("sentence1", "sentence2", "label", ("not_entailment", "entailment"), "accuracy",
                       hub_text=("sentence1", "sentence2")),
}
HUB_GLUE = "nyu-mll/glue"


def table_files(cfg: Config) -> dict[str, str]:
    """Split name -> table file of a run: 'train', 'validation', then each data.report file by its stem (a stem
    taken twice gets its position appended)."""
    d = cfg.data
    out = {"train": d.train, "validation": d.validation}
    for i, path in enumerate(d.report):
        name = Path(path).stem
        out[name if name not in out else f"{name}_{i + 1}"] = path
    return out


def label_names(cfg: Config) -> tuple[str, ...]:
    """A run's label names by id: data.labels, or CoLA's (0 unacceptable, 1 acceptable); () for regression."""
    if cfg.data.problem == "regression":
        return ()
    return tuple(cfg.data.labels) or LABEL_NAMES


def is_table_run(cfg: Config) -> bool:
    """True when a run reads table files (data.train) or a GLUE task other than CoLA from the hub."""
    return bool(cfg.data.train) or (cfg.data.dir == HUB and cfg.data.task not in ("", "cola"))


def apply_preset(cfg: Config) -> Config:
    """`cfg` with data.task's columns, labels, problem type, metric (unless train.select is set) and, for a local
    data.dir in GLUE's layout, its files; the config as it is without data.task."""
    d = cfg.data
    if not d.task:
        return cfg
    preset = GLUE[d.task]
    select = cfg.train.select or preset.metric
    if d.task == "cola":  # the CoLA reader knows GLUE's CoLA layout (data.dir with train.tsv and dev.tsv)
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, select=select))
    files: dict = {}
    if d.dir != HUB:
        if not d.dir:
            raise ConfigError(f"data.task={d.task} needs data.dir: a dir in GLUE's layout (train.tsv, "
                              f"{', '.join(preset.dev)}) or data.dir=hub for {HUB_GLUE}")
        root = Path(d.dir).expanduser()
        files = {"train": str(root / "train.tsv"), "validation": str(root / preset.dev[0]),
                 "report": list(dict.fromkeys([str(root / f) for f in preset.dev[1:]] + list(d.report)))}
    text, pair = (preset.hub_text if d.dir == HUB else (preset.text, preset.text_pair))
    data = dataclasses.replace(d, **files, text=text, text_pair=pair, label="label" if d.dir == HUB else preset.label,
                               labels=list(preset.names), problem=preset.problem)
    return dataclasses.replace(cfg, data=data, train=dataclasses.replace(cfg.train, select=select))


def resolve_task(cfg: Config) -> Config:
    """`cfg` with its task settled: the GLUE preset applied, and for table files the label set of data.train
    (data.problem, data.labels, model.num_labels) written in, once every row of every file was checked (`checks`).
    CoLA runs come back unchanged."""
    cfg = apply_preset(cfg)
    d = cfg.data
    if not d.train:
        return cfg
    found = {name: tables.read_table(path) for name, path in table_files(cfg).items()}
    labels = checked_labels(found, d, cfg.model.num_labels)  # every bad row of every file, before any model
    data = dataclasses.replace(d, problem=labels.problem, labels=list(labels.names))
    model = dataclasses.replace(cfg.model, num_labels=labels.n_outputs)
    out = dataclasses.replace(cfg, data=data, model=model)
    from lora_kd_jax.core.config import validate

    validate(out)  # e.g. train.select=pearson on a classification file
    return out
