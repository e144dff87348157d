"""A run's model section resolved before anything is built: which family (model.type, or the config.json of the
checkpoint), the sizes it has (read from the checkpoint, or a released size's), and where its config and weights are.

A hub id (model.name=ORG/NAME) is found by transformers' own `cached_file`, as `from_pretrained` finds it; its
snapshot is then read exactly as a model.path, while the run records the id, not the cache path. A released size's
name (gpt2-medium) is known without the hub: its sizes are the family table's, and only its weights are fetched.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lora_kd_jax.core.config import ConfigError, ModelConfig, is_hub_id
from lora_kd_jax.models.families import FAMILIES, named_size
from lora_kd_jax.models.hf_checkpoint import ModelLoadError, hub_snapshot, read_config


def checkpoint_dir(m: Any) -> Path | None:
    """Where a pretrained run's config.json is read: model.path, or the hub snapshot of the id in model.name; None
    for a random init and for a released size's name (its sizes are known without the hub: `families`)."""
    if m.init != "pretrained":
        return None
    if m.path:
        path = Path(m.path).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model.path={path}: {'is a file' if path.exists() else 'does not exist'}; expected "
                                 "a directory written by save_pretrained (config.json and the weights)")
        return path
    return hub_snapshot(m.name) if is_hub_id(m.name) else None


def weights_dir(m: Any) -> Path:
    """Where a pretrained run's weights are read: its checkpoint dir, or the hub snapshot of its released size (a
    name such as gpt2-medium stands for its hub repository)."""
    where = checkpoint_dir(m)
    if where is not None:
        return where
    named = named_size(m.name)
    if named is None or m.name not in named[0].hub_ids:
        raise ModelLoadError(f"model.name={m.name} with model.init=pretrained: no weights to load; set model.path=DIR "
                             "to a save_pretrained checkpoint, a hub id ORG/NAME, or model.init=random")
    return hub_snapshot(named[0].hub_ids[m.name])


SIZE_DEFAULTS = {"n_positions": 1024, "vocab_size": 50257}  # ModelConfig's defaults: not a user's choice


def resolve(cfg: Any) -> Any:
    """`cfg` with model.type and the sizes (model.n_layer/n_embd/n_head/n_positions/vocab_size) its architecture
    has: read from the checkpoint's config.json (model.path, a hub id, a released size's name), or from
    model.name's released size and the model.* overrides for a random init. What a run records is what it trains.
    A model.type, or a size set to another value than the checkpoint's, is an error naming both; so is a
    data.max_length beyond the positions. A hub id's run reads its tokenizer from the same id by default."""
    m = cfg.model
    where = checkpoint_dir(m)
    if where is None:
        return _resolve_sizes(cfg)
    source = f"model.path={m.path}" if m.path else f"model.name={m.name}"
    hf = read_config(where, source)
    fam = FAMILIES[hf["model_type"]]
    if m.type != ModelConfig().type and m.type != fam.name:  # model.type left at its default never conflicts
        raise ModelLoadError(f"model.type={m.type}, but the checkpoint of {source} is a {fam.name}; the checkpoint "
                             f"decides the architecture: drop model.type or set it to {fam.name}")
    try:
        arch = fam.arch(hf)
    except ValueError as e:
        raise ModelLoadError(f"{where / 'config.json'}: {e}") from None
    found = {"n_layer": arch.num_layers, "n_embd": arch.hidden_size, "n_head": arch.num_heads,
             "n_positions": fam.usable_positions(arch), "vocab_size": arch.vocab_size}
    for key, value in found.items():
        asked = getattr(m, key)
        if asked is not None and asked != value and asked != SIZE_DEFAULTS.get(key):
            raise ModelLoadError(f"model.{key}={asked}, but the checkpoint of {source} has {key}={value}; the "
                                 f"checkpoint decides the architecture: drop model.{key} or set it to {value}")
    if cfg.data.max_length > found["n_positions"]:
        raise ModelLoadError(f"data.max_length={cfg.data.max_length} exceeds the {found['n_positions']} positions of "
                             f"the checkpoint of {source}")
    data = cfg.data
    if is_hub_id(m.name) and not m.path and not data.tokenizer:  # the repository's own tokenizer
        data = dataclasses.replace(data, tokenizer=m.name)
    return dataclasses.replace(cfg, model=dataclasses.replace(m, type=fam.name, **found), data=data)


def _resolve_sizes(cfg: Any) -> Any:
    """No checkpoint to read: model.name's released size (of model.type's family) with the model.* overrides (a random
    init), or `custom`, which needs all three sizes. Errors name the key."""
    m = cfg.model
    fam = FAMILIES[m.type]
    named = named_size(m.name)
    if m.name != "custom" and named is None:
        sizes = ", ".join(n for f in FAMILIES.values() for n in f.named_sizes)
        raise ConfigError(f"model.name: {m.name!r} is not one of {sizes}, custom, nor a hub id ORG/NAME (e.g. "
                          "google-bert/bert-base-uncased, FacebookAI/roberta-base)")
    base = named[1] if named is not None and named[0] is fam else (None, None, None)
    n_layer, n_embd, n_head = (o if o is not None else b for o, b in zip((m.n_layer, m.n_embd, m.n_head), base))
    if None in (n_layer, n_embd, n_head):
        raise ConfigError(f"model.name={m.name} needs model.n_layer, model.n_embd and model.n_head"
                          + (f" (it is a {named[0].name} size; model.type={m.type})" if named else ""))
    if n_embd % n_head:
        raise ConfigError(f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head})")
    return dataclasses.replace(cfg, model=dataclasses.replace(m, n_layer=n_layer, n_embd=n_embd, n_head=n_head))
