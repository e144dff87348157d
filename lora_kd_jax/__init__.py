"""lora_kd_jax: LoRA fine-tuning and knowledge distillation in pure JAX.

The public API, imported on first use (so `import lora_kd_jax` and the command line stay light: jax loads only
when a name that needs it is touched):

    import lora_kd_jax as lkj

    cfg = lkj.load_config("configs/smoke.yaml", ["run.dir=runs/smoke"])   # typed config, key=value overrides
    summary = lkj.train_lora(cfg)                              # or lkj.distill_student(cfg), lkj.train_student(cfg)
    clf = lkj.Predictor.from_run("runs/smoke")                          # any finished run
    clf.predict(["The cat sat on the mat."])                            # [Prediction(label=..., ...)]
    clf.evaluate("out_of_domain").mcc
    lkj.export_peft("runs/smoke", "exports/adapter")                    # PEFT adapter; lkj.merge for plain weights
"""
from __future__ import annotations

import importlib
from typing import Any

from lora_kd_jax.core.logs import quiet_transformers_without_torch

quiet_transformers_without_torch()  # the core install has no PyTorch: transformers' notice of it is not ours to show

# public name -> (module, attribute)
_API = {
    "load_config": ("lora_kd_jax.core.config", "load_config"),
    "Config": ("lora_kd_jax.core.config", "Config"),
    "ConfigError": ("lora_kd_jax.core.config", "ConfigError"),
    "UserError": ("lora_kd_jax.core.errors", "UserError"),
    "train_lora": ("lora_kd_jax.training.finetune", "train_lora"),
    "distill_student": ("lora_kd_jax.distill.trainer", "distill"),
    "train_student": ("lora_kd_jax.distill.trainer", "train_student"),
    "train_rnn": ("lora_kd_jax.distill.trainer", "train_rnn"),  # train_student's old name
    "run_study": ("lora_kd_jax.commands.reproduce", "run_study"),
    "Predictor": ("lora_kd_jax.commands.evaluation", "Predictor"),
    "open_run": ("lora_kd_jax.training.restore", "open_run"),
    "export_peft": ("lora_kd_jax.interop.export", "export_peft"),
    "import_peft": ("lora_kd_jax.interop.export", "import_peft"),
    "merge": ("lora_kd_jax.interop.export", "merge_and_save"),
    "ClassifierModel": ("lora_kd_jax.models.interface", "ClassifierModel"),
    "build_model": ("lora_kd_jax.models.registry", "build_model"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lora_kd_jax' has no attribute {name!r}; the public API is {', '.join(__all__)}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
