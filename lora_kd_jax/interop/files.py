"""The files every export writes, as transformers 5 and PEFT read them: an output dir that is free (or may be
overwritten), safetensors with PyTorch's metadata, a config.json of the family's *ForSequenceClassification with the
run's label names, and the run's tokenizer files.

Why together: `transformers.pipeline("text-classification", model=DIR)` reads its tokenizer from DIR and names its
answers by config.json's id2label; without them it fails (no tokenizer) or answers LABEL_0/LABEL_1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lora_kd_jax.core.config import Config, n_outputs
from lora_kd_jax.data.tasks import label_names
from lora_kd_jax.interop.peft import ExportError
from lora_kd_jax.models.tokenizers import tokenizer_for

HF_CONFIG = "config.json"
TORCH_WEIGHTS = "model.safetensors"


def save_safetensors(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    # "format": "pt" is what transformers / PEFT write for PyTorch weights
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, os.fspath(path),
              metadata={"format": "pt"})


def check_out_dir(out_dir: Path, files: Sequence[str], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    clash = [f for f in files if (out_dir / f).exists()]
    if clash and not overwrite:
        raise ExportError(f"{out_dir} already holds {', '.join(clash)}; choose another directory or pass --overwrite")


def label_config(cfg: Config) -> dict[str, Any]:
    """config.json's label keys for a run: names by id (a regression's one output is 'score'), and problem_type
    (transformers' single_label_classification | regression)."""
    names = label_names(cfg) or ("score",)
    n = n_outputs(cfg)
    names = tuple(names) + tuple(f"LABEL_{i}" for i in range(len(names), n))  # model.num_labels beyond the names
    return {"num_labels": n, "id2label": {str(i): name for i, name in enumerate(names[:n])},
            "label2id": {name: i for i, name in enumerate(names[:n])},
            "problem_type": "regression" if n == 1 else "single_label_classification"}


def write_config(hf: dict, family: Any, out_dir: Path, *, pad_token_id: int | None = None) -> None:
    """config.json of the family's *ForSequenceClassification from the base's config (a dict), written by
    transformers' own config class, so transformers 5 reads it back."""
    from transformers import AutoConfig

    keys = {k: v for k, v in hf.items() if k not in ("model_type", "transformers_version", "architectures")}
    c = AutoConfig.for_model(family.name, **keys)
    c.architectures = [family.torch_class]
    if pad_token_id is not None:
        c.pad_token_id = pad_token_id
    c.save_pretrained(os.fspath(out_dir))


def add_run_files(out_dir: str | os.PathLike, cfg: Config, config_file: str = HF_CONFIG) -> None:
    """The run's label keys into `out_dir/config_file` (when it exists) with the pad id its batches use, and the
    run's tokenizer files into `out_dir`."""
    out = Path(out_dir)
    tok = tokenizer_for(cfg)
    path = out / config_file
    if path.is_file():
        config = json.loads(path.read_text())
        config.update(label_config(cfg), pad_token_id=int(tok.pad_token_id))
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(os.fspath(out))
