"""Which modules LoRA adapts and which train fully, by the names a user writes (PEFT's forms).

`lora.targets` entries are module names matched as PEFT matches a list (`query` adapts every
`...attention.self.query`; a dotted name is a suffix), globs, or, the run's default, the family's default targets.
`lora.modules_to_save` names base modules trained in full besides the head (PEFT's `modules_to_save`).
"""
from __future__ import annotations

from typing import Any, Sequence

from flax import traverse_util

from lora_kd_jax.core.config import DEFAULT_LORA_TARGETS
from lora_kd_jax.core.families import ENCODERS, Family
from lora_kd_jax.lora.transform import LoraTargetError

Params = dict[str, Any]


def resolve(targets: Sequence[str], family: str) -> list[str]:
    """The patterns for `make_spec`: the family's defaults (PEFT's) when lora.targets is left at its default."""
    if list(targets) == list(DEFAULT_LORA_TARGETS) and family in ENCODERS:
        return list(ENCODERS[family].default_targets)
    return list(targets)


def _modules(base: Params) -> list[str]:
    return sorted({".".join(k[:-1]) for k in traverse_util.flatten_dict(base)})


def modules_to_save(names: Sequence[str], family: Family, base: Params) -> list[str]:
    """The base modules named by lora.modules_to_save (the head's own names are always trained and skipped here),
    without the family prefix; a name that matches no module is an error naming the modules it could match."""
    modules = _modules(base)
    out = []
    for name in names:
        if name in family.head_modules or name == "head":
            continue
        short = name[len(family.prefix) + 1:] if name.startswith(family.prefix + ".") else name
        if not any(m == short or m.endswith("." + short) for m in modules):
            shown = sorted({m.split(".")[-1] for m in modules} | {m for m in modules if "layer." not in m})
            raise LoraTargetError(f"lora.modules_to_save: {name!r} matches no module of the {family.name} base; "
                                  f"modules are named like {', '.join(shown)}")
        out.append(short)
    return out
