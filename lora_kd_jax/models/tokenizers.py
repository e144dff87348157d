"""A run's tokenizer: which one its family reads, and what it pads with.

data.tokenizer when given; else the checkpoint's own (model.path, when it holds tokenizer files); else the one the
package ships for the family (GPT-2's BPE files, so GPT-2 runs offline). Its template's special tokens are the
family's (`Family.tokenizer_needs`); a tokenizer without a pad token pads with the checkpoint's config.json
pad_token_id, else its eos token (Llama 3's and GPT-2's have none), and says which in the log. A tokenizer with
neither a mask nor an unknown-word token gets the family's unknown-word token (Qwen3: <|endoftext|>), distillation's
mask.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_kd_jax.data import DataError, load_tokenizer
from lora_kd_jax.models.families import FAMILIES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


def has_tokenizer(path: str) -> bool:
    return bool(path) and any((Path(path).expanduser() / f).is_file() for f in TOKENIZER_FILES)


def config_pad_id(cfg: Any) -> int | None:
    """The pad_token_id of model.path's config.json (None without one)."""
    try:
        pad = json.loads((Path(cfg.model.path).expanduser() / "config.json").read_text()).get("pad_token_id")
    except (OSError, ValueError, AttributeError):
        return None
    return int(pad) if isinstance(pad, int) else None


def tokenizer_for(cfg: Any) -> Any:
    """The run's fast tokenizer, padding and cutting on the right (see the module doc)."""
    fam = FAMILIES[cfg.model.type]
    source = cfg.data.tokenizer or (cfg.model.path if has_tokenizer(cfg.model.path) else "")
    if not source and not fam.packaged_tokenizer:
        raise DataError(f"data.tokenizer is empty and model.type={fam.name}: the packaged tokenizer is GPT-2's; set "
                        "data.tokenizer to the model's tokenizer dir (or keep its files beside model.path)")
    return with_unk_token(load_tokenizer(source, needs=fam.tokenizer_needs, tokenizer_class=fam.tokenizer_class,
                                         pad_id=config_pad_id(cfg) if cfg.model.path else None,
                                         vocab_size=cfg.model.vocab_size), fam)


def with_unk_token(tok: Any, fam: Any) -> Any:
    """`tok`, given the family's unknown-word token when it has neither a mask nor an unknown-word token and the
    family names one its vocabulary holds (Qwen3's tokenizer_config.json nulls unk_token; its class's default is
    <|endoftext|>): distillation's augmentation masks words with it (`data.augment.mask_token`)."""
    if tok.mask_token is None and tok.unk_token is None and fam.unk_token and fam.unk_token in tok.get_vocab():
        tok.unk_token = fam.unk_token
    return tok
