"""Which modules LoRA adapts and which train fully, by the names a user writes (PEFT's forms).

`lora.targets` entries take three forms:
  a module name     `query`, `attention.self.value`, `attn.c_attn`: every module whose dotted path is it or ends with
                    `.name` (PEFT's rule for a list of names); glob characters (`*`, `?`) are allowed too;
  `re:<regex>`      a regular expression that must match a whole module path, either ours (`encoder.layer.0.
                    attention.self.query`) or PyTorch's, with the family prefix (`roberta.encoder.layer.0...`);
  `all-linear`      every linear layer of the base (PEFT's `all-linear`: the head is never adapted; BERT's pooler is).
Left at its default, each family adapts PEFT's default for it (its record's `default_targets`: GPT-2's four Conv1D,
query and value, q_proj and v_proj). A pattern that matches nothing is an error naming the module paths it could
have matched.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Sequence

from flax import traverse_util

from lora_kd_jax.core.config import DEFAULT_LORA_TARGETS
from lora_kd_jax.lora.transform import LoraTargetError

Params = dict[str, Any]
ALL_LINEAR = "all-linear"
REGEX_PREFIX = "re:"


def linear_modules(base: Params) -> list[str]:
    """Dotted paths of every 2-D kernel of the base (its linear layers), in model order."""
    paths = [k[:-1] for k, v in traverse_util.flatten_dict(base).items() if k[-1] == "kernel" and len(v.shape) == 2]
    return [".".join(p) for p in sorted(paths, key=lambda p: tuple((0, int(s)) if s.isdigit() else (1, s)
                                                                      for s in p))]


def named_like(modules: Sequence[str]) -> str:
    """The module paths in short: layer indices folded (`encoder.layer.{i}.attention.self.query`)."""
    return ", ".join(dict.fromkeys(re.sub(r"\.\d+\.", ".{i}.", m) for m in modules))


def _name_matches(module: str, pattern: str) -> bool:
    return module == pattern or module.endswith("." + pattern) or fnmatch.fnmatchcase(module, pattern)


def select(targets: Sequence[str], family: Any, base: Params) -> list[str]:
    """The module paths `targets` adapt on `base` of `family` (a `models.families.Family`: its default targets
    and PyTorch prefix; see the module doc), in model order."""
    modules = linear_modules(base)
    if not modules:
        raise LoraTargetError("the parameter tree has no 2-D 'kernel' leaves to adapt")
    if list(targets) == list(DEFAULT_LORA_TARGETS):
        targets = family.default_targets
    prefix = family.torch_prefix + "."
    chosen: set[str] = set()
    for pattern in targets:
        if pattern == ALL_LINEAR:
            hits = modules
        elif pattern.startswith(REGEX_PREFIX):
            try:
                rx = re.compile(pattern[len(REGEX_PREFIX):])
            except re.error as e:
                raise LoraTargetError(f"lora.targets: {pattern!r} is not a regular expression ({e})") from None
            hits = [m for m in modules if rx.fullmatch(m) or rx.fullmatch(prefix + m)]
        else:
            hits = [m for m in modules if _name_matches(m, pattern)]
        if not hits:
            raise LoraTargetError(f"lora.targets: {pattern!r} matches no linear layer of the {family.name} base; its "
                                  f"module paths are {named_like(modules)} (or write {ALL_LINEAR})")
        chosen.update(hits)
    return [m for m in modules if m in chosen]
