"""The model a run trains, by its kind: the one place the run kinds meet the model classes, so the run reader,
evaluation and export never branch on a kind themselves."""
from __future__ import annotations

from typing import Callable

import jax

from lora_kd_jax.core.config import Config
from lora_kd_jax.core.keys import classifier_base_key, run_keys
from lora_kd_jax.models.build import build_classifier
from lora_kd_jax.models.interface import ClassifierModel
from lora_kd_jax.models.students.build import build_student


def _lora_classifier(cfg: Config) -> ClassifierModel:
    """Any family + LoRA + head, over the base the run trained on (a random init from the run's base key)."""
    return build_classifier(cfg, run_keys(cfg.train.seed).model, base_key=classifier_base_key(cfg))[0]


def _student(cfg: Config) -> ClassifierModel:
    return build_student(cfg, jax.random.key(0), shapes_only=True)[0]


# run kind (metrics.json's `kind`) -> the model it trains
BUILDERS: dict[str, Callable[[Config], ClassifierModel]] = {"lora": _lora_classifier, "distill": _student,
                                                            "rnn": _student}
TITLES = {"lora": "LoRA", "distill": "distilled student", "rnn": "student baseline"}


def build_model(cfg: Config, kind: str) -> ClassifierModel:
    """The model a run of `kind` trains (weights it holds, e.g. a frozen base, are loaded; trained ones are not)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown run kind {kind!r}: expected one of {', '.join(BUILDERS)}")
    return BUILDERS[kind](cfg)
