"""The one place a LoRA run's config meets its architecture family: which family (model.type, or model.path's
config.json), the sizes a checkpoint fixes, and the (model, params) every caller builds through `build`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from lora_kd_jax.core.config import Config
from lora_kd_jax.core.families import ENCODERS, GPT2, TYPES, config_sizes
from lora_kd_jax.models import gpt2
from lora_kd_jax.models.gpt2 import ModelLoadError


def checkpoint_type(path: str) -> str:
    """config.json's model_type of a save_pretrained dir ('' when it has none or cannot be read; the loaders then
    name what is wrong)."""
    try:
        return str(json.loads((Path(path).expanduser() / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def with_checkpoint(cfg: Config) -> Config:
    """`cfg` with model.type and the sizes read from model.path's config.json (`gpt2.with_checkpoint_size` for GPT-2),
    so that what a run records is what it trains. A model.type other than the checkpoint's is an error naming both."""
    m = cfg.model
    if m.init != "pretrained" or not m.path:
        return cfg
    found = checkpoint_type(m.path) or GPT2
    if found not in TYPES:
        raise ModelLoadError(f"model.path={m.path}: model_type {found!r} in its config.json is not a family this "
                             f"project fine-tunes ({', '.join(TYPES)})")
    if m.type != GPT2 and m.type != found:
        raise ModelLoadError(f"model.type={m.type}, but the checkpoint in {m.path} is a {found}; model.path decides "
                             f"the architecture: drop model.type or set it to {found}")
    if found == GPT2:
        return gpt2.with_checkpoint_size(cfg)
    hf = json.loads((Path(m.path).expanduser() / "config.json").read_text())
    sizes = config_sizes(found, hf)
    if not all(isinstance(v, int) for v in sizes.values()):
        raise ModelLoadError(f"{m.path}/config.json: missing or non-integer {found} sizes ({sizes})")
    if cfg.data.max_length > sizes["n_positions"]:
        raise ModelLoadError(f"data.max_length={cfg.data.max_length} exceeds the {sizes['n_positions']} positions of "
                             f"the checkpoint in {m.path}")
    return dataclasses.replace(cfg, model=dataclasses.replace(m, type=found, **sizes))


def title(cfg: Config) -> str:
    """The model's name in logs and progress bars: GPT-2's size name, or the encoder family."""
    return cfg.model.name if cfg.model.type == GPT2 else cfg.model.type


def plan(model: Any, params: dict, report: Any) -> str:
    """What --dry-run prints: the parameter counts, the family and its pooling, the adapted modules (layer indices
    folded) with their (in, out) and count, and what else trains in full."""
    import re

    import numpy as np
    from flax import traverse_util

    from lora_kd_jax.models.interface import FROZEN

    family = getattr(model, "family", None)
    lines = [str(report), f"model: {family.name} ({family.torch_class}): {family.pools}" if family is not None else
             "model: gpt2 (GPT2ForSequenceClassification): last real token -> score"]
    if model.spec is not None:
        groups: dict[tuple[str, tuple[int, int]], list[str]] = {}
        for path, shape in zip(model.spec.paths, model.spec.shapes):
            name = re.sub(r"\.\d+\.", ".{i}.", ".".join(path))
            groups.setdefault((name, shape), []).append(".".join(path))
        from lora_kd_jax.lora.transform import count

        dora = ", DoRA magnitudes included" if model.spec.variant == "dora" else ""
        lines.append(f"LoRA rank {model.spec.rank} on {len(model.spec.paths)} modules ({count(model.spec):,} params"
                     f"{dora}):")
        lines += [f"  {name if len(ps) > 1 else ps[0]} ({a} -> {b}) x{len(ps)}"
                  for (name, (a, b)), ps in groups.items()]
    labels = traverse_util.flatten_dict(model.param_labels(params))
    full: dict[str, int] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if labels[path] != FROZEN and path[0] != "lora":  # the factors (LoRA+: B, magnitudes too) are counted above
            name = "head" if path[0] == "head" else re.sub(r"\.\d+\.", ".{i}.", ".".join(path[1:-1]))
            full[name] = full.get(name, 0) + int(np.prod(leaf.shape))
    lines.append("trained in full: " + ", ".join(f"{k} ({v:,} params)" for k, v in full.items()))
    return "\n".join(lines)


def build(cfg: Config, key: jax.Array, *, base_key: jax.Array | None = None, with_lora: bool = True,
          shapes_only: bool = False) -> tuple[Any, dict]:
    """(model, params) of a LoRA classifier of cfg's family; `cfg` should have passed `with_checkpoint`."""
    if cfg.model.type in ENCODERS:
        from lora_kd_jax.models.encoder import build_encoder

        return build_encoder(cfg, cfg.model.type, key, base_key=base_key, with_lora=with_lora,
                             shapes_only=shapes_only)
    from lora_kd_jax.models.classifier import build_classifier

    return build_classifier(cfg, key, base_key=base_key, with_lora=with_lora, shapes_only=shapes_only)
