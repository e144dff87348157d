"""The two file chores every export writer shares (GPT-2's `export`, the other families' `encoder_interop`): an
output dir that is free (or may be overwritten), and safetensors written as PyTorch / PEFT write them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lora_kd_jax.lora.peft_format import ExportError


def save_safetensors(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    # "format": "pt" is what transformers / PEFT write for PyTorch weights (transformers' Flax loader reads it too)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, os.fspath(path),
              metadata={"format": "pt"})


def check_out_dir(out_dir: Path, files: Sequence[str], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    clash = [f for f in files if (out_dir / f).exists()]
    if clash and not overwrite:
        raise ExportError(f"{out_dir} already holds {', '.join(clash)}; choose another directory or pass --overwrite")
