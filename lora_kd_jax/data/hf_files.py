"""What an export needs from a run's data so that it works on its own: the label names and problem type in
config.json (id2label, label2id, problem_type, num_labels) and the run's tokenizer files beside the weights.

Why: `transformers.pipeline("text-classification", model=DIR)` reads its tokenizer from DIR and names its answers
by config.json's id2label; without them it fails (no tokenizer) or answers LABEL_0/LABEL_1.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lora_kd_jax.core.config import Config, n_outputs
from lora_kd_jax.data.encoding import tokenizer_for
from lora_kd_jax.data.tasks import label_names


def label_config(cfg: Config) -> dict[str, Any]:
    """config.json's label keys for a run: names by id (a regression's one output is 'score'), and problem_type
    (transformers' single_label_classification | regression)."""
    names = label_names(cfg) or ("score",)
    n = n_outputs(cfg)
    names = tuple(names) + tuple(f"LABEL_{i}" for i in range(len(names), n))  # model.num_labels beyond the names
    return {"num_labels": n, "id2label": {str(i): name for i, name in enumerate(names[:n])},
            "label2id": {name: i for i, name in enumerate(names[:n])},
            "problem_type": "regression" if n == 1 else "single_label_classification"}


def add_run_files(out_dir: str | os.PathLike, cfg: Config, config_file: str = "config.json") -> None:
    """Write the run's label keys into `out_dir/config_file` (when it exists) and the run's tokenizer files
    (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json with pad = eos) into `out_dir`."""
    out = Path(out_dir)
    path = out / config_file
    if path.is_file():
        config = json.loads(path.read_text())
        config.update(label_config(cfg))
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_for(cfg).save_pretrained(os.fspath(out))
