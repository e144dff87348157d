"""The one place a LoRA run's config meets its architecture family: which family (model.type, or the config.json
of model.path or of the hub id in model.name), the sizes a checkpoint fixes, and the (model, params) every caller
builds through `build`.

A hub id (model.name=ORG/NAME) is resolved by transformers' own `cached_file`, the function `from_pretrained` fetches
with: the hub cache (HF_HUB_CACHE / HF_HOME) is read first and HF_HUB_OFFLINE=1 keeps it offline. Its snapshot dir
is then read exactly as a model.path (`checkpoint_dir`), while the run records the id, not the cache path."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax

from lora_kd_jax.core.config import Config, ModelConfig, is_hub_id
from lora_kd_jax.core.errors import first_line
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


HUB_WEIGHTS = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin")  # what the loaders read, in order


def hub_snapshot(name: str) -> Path:
    """The local snapshot dir of hub id `name` holding its config.json and weights, found in the hub cache or fetched
    into it by transformers' `cached_file` (HF_HUB_CACHE, HF_HUB_OFFLINE honoured). An id that cannot be reached or
    is not cached is an error naming it and what to do."""
    from transformers.utils import cached_file

    from lora_kd_jax.models.gpt2 import _quiet_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        with _quiet_hub():
            config = cached_file(name, "config.json")
            weights = [f for f in HUB_WEIGHTS if cached_file(name, f, _raise_exceptions_for_missing_entries=False)]
    except Exception as e:  # hub errors come in many types (offline, no such repo, gated, network): the user's to fix
        where = "HF_HUB_OFFLINE=1 and it is not in the hub cache" if offline else "no network, or no such repository"
        raise ModelLoadError(
            f"model.name={name}: the checkpoint could not be loaded from the Hugging Face hub ({where}: "
            f"{type(e).__name__}: {first_line(e)}); cache it once with network access (`huggingface-cli download "
            f"{name}`, or HF_HUB_CACHE pointing at a cache that holds it), or set model.path=DIR to a save_pretrained "
            "checkpoint") from None
    if config is None or not weights:
        raise ModelLoadError(f"model.name={name}: the hub repository{' (as cached: HF_HUB_OFFLINE=1)' if offline else ''} "
                             f"has {'no config.json' if config is None else 'no weights'} (looked for "
                             f"{', '.join(HUB_WEIGHTS)}); sharded checkpoints are not read: save one with "
                             "save_pretrained and set model.path=DIR")
    return Path(config).parent


def checkpoint_dir(m: ModelConfig) -> Path | None:
    """Where a pretrained run reads its checkpoint: model.path, or the hub snapshot of the id in model.name; None for a
    random init or a GPT-2 size name (which transformers' GPT-2 loader fetches by name)."""
    if m.init != "pretrained":
        return None
    if m.path:
        return Path(m.path).expanduser()
    return hub_snapshot(m.name) if is_hub_id(m.name) else None


def with_checkpoint(cfg: Config) -> Config:
    """`cfg` with model.type and the sizes read from the checkpoint's config.json (model.path's, or the hub id's in
    model.name; `gpt2.with_checkpoint_size` for GPT-2), so that what a run records is what it trains. A model.type
    other than the checkpoint's is an error naming both. A hub id's run reads its tokenizer from the same id unless
    data.tokenizer names another."""
    m = cfg.model
    where = checkpoint_dir(m)
    if where is None:
        return cfg
    source = f"model.path={m.path}" if m.path else f"model.name={m.name}"
    found = checkpoint_type(os.fspath(where)) or GPT2
    if found not in TYPES:
        raise ModelLoadError(f"{source}: model_type {found!r} in its config.json is not a family this "
                             f"project fine-tunes ({', '.join(TYPES)})")
    if m.type != GPT2 and m.type != found:
        raise ModelLoadError(f"model.type={m.type}, but the checkpoint of {source} is a {found}; the checkpoint decides "
                             f"the architecture: drop model.type or set it to {found}")
    if not m.path:  # a hub id: its family's tokenizer by default (GPT-2's BPE is packaged)
        if found != GPT2 and not cfg.data.tokenizer:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=m.name))
    if found == GPT2:
        if m.path:
            return gpt2.with_checkpoint_size(cfg)
        sized = gpt2.with_checkpoint_size(dataclasses.replace(cfg, model=dataclasses.replace(m, path=os.fspath(where))))
        return dataclasses.replace(sized, model=dataclasses.replace(sized.model, path=""))
    hf = json.loads((where / "config.json").read_text())
    sizes = config_sizes(found, hf)
    if not all(isinstance(v, int) for v in sizes.values()):
        raise ModelLoadError(f"{source}: its config.json has missing or non-integer {found} sizes ({sizes})")
    if cfg.data.max_length > sizes["n_positions"]:
        raise ModelLoadError(f"data.max_length={cfg.data.max_length} exceeds the {sizes['n_positions']} positions of "
                             f"the checkpoint of {source}")
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
