"""An adapter (`peft.read_adapter`) against the base it is applied to: every tensor's shape, the keys its own
config promises, the lora.* settings that reproduce it, and its weights put into a freshly built model's tree.

PEFT's matching rules are spelled here (target_modules as a list of names or `.name` suffixes, as a regex over the
full name, or all-linear; exclude_modules; layers_to_transform), for the linear layers of any family's base.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from lora_kd_jax.interop.peft import LORA_KEY, MAG_KEY, PEFT_HEAD_NAMES, Adapter, ExportError, and_more
from lora_kd_jax.models import hf_names
from lora_kd_jax.models.hf_names import PEFT_PREFIX

Params = dict[str, Any]


def peft_targets(config: dict, modules: Sequence[str], family: Any) -> set[str]:
    """The linear modules (paths without the prefix) PEFT adapts under this config: its rules for target_modules (a
    list: exact names or `.name` suffixes; a string: a regex over the full name, or all-linear), exclude_modules and
    layers_to_transform."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    layers = config.get("layers_to_transform")
    layers = None if layers is None or layers == [] else ({layers} if isinstance(layers, int) else set(layers))

    def listed(names: Any, full: str) -> bool:
        if isinstance(names, str):
            return names == "all-linear" or re.fullmatch(names, full) is not None
        return full in names or any(full.endswith("." + n) for n in names)

    out = set()
    for module in modules:
        full = f"{family.torch_prefix}.{module}"
        if (exclude and listed(exclude, full)) or not targets or not listed(targets, full):
            continue
        index = re.search(r"\.(\d+)\.", "." + module)
        # PEFT applies layers_to_transform to suffix matches of a list (not to a regex or an exact full name)
        if layers is not None and not isinstance(targets, str) and full not in targets and index \
                and int(index.group(1)) not in layers:
            continue
        out.add(module)
    return out


def check_fits(adapter: Adapter, family: Any, base: Params, head: Params, describe: str) -> None:
    """Every tensor of the adapter against the base it is applied to (shapes of `base` and `head`, abstract is
    enough), named `describe` in messages; and every key its own target_modules / modules_to_save promise is there."""
    flat = hf_names.flatten(base)
    linear = {".".join(p[:-1]): v.shape for p, v in flat.items() if p[-1] == "kernel" and len(v.shape) == 2}
    layout_in_out = family.kernel_layout == "in_out"
    depth = _blocks(base, family)
    beyond = sorted(m for m in adapter.modules if m not in linear and _block_index(m, family) is not None
                    and _block_index(m, family) >= depth)
    if beyond:
        raise ExportError(f"{adapter.where}: another architecture: LoRA on "
                          f"{', '.join(hf_names.module_names(family, [m.split('.') for m in beyond[:4]]))}, but the "
                          f"base ({describe}) has {depth} layers")
    others = sorted(m for m in adapter.modules if m not in linear)
    if others:
        raise ExportError(f"{adapter.where}: another architecture: LoRA on modules the {family.name} base does not "
                          f"have: {', '.join(hf_names.module_names(family, [m.split('.') for m in others[:4]]))}")
    prefix = hf_names.peft_module_prefix(family)
    problems = []
    for key, v in adapter.lora.items():
        module = (LORA_KEY.match(key) or MAG_KEY.match(key)).group("module")[len(prefix):]
        shape = linear[module]
        d_in, d_out = shape if layout_in_out else shape[::-1]
        if MAG_KEY.match(key):
            if tuple(v.shape) != (d_out,):
                problems.append(f"{key}: shape {tuple(v.shape)}, the base wants ({d_out},)")
        elif ".lora_A." in key and (v.ndim != 2 or v.shape[1] != d_in):
            problems.append(f"{key}: shape {tuple(v.shape)}, the base wants (r, {d_in})")
        elif ".lora_B." in key and (v.ndim != 2 or v.shape[0] != d_out):
            problems.append(f"{key}: shape {tuple(v.shape)}, the base wants ({d_out}, r)")
    torch_shapes = {hf_names.torch_key(p)[0]: (v.shape[::-1] if hf_names.torch_key(p)[1] else v.shape)
                    for p, v in flat.items()}
    for key, v in adapter.saved.items():
        want = torch_shapes.get(hf_names.renamed(key))
        if want is None:
            problems.append(f"{prefix}{key}: the base has no such parameter")
        elif tuple(v.shape) != tuple(want):
            problems.append(f"{prefix}{key}: shape {tuple(v.shape)}, the base wants {tuple(want)}")
    head_shapes = {k: tuple(v.shape) for k, v in hf_names.head_to_torch(family, _zeros(head)).items()}
    for key, v in adapter.head.items():
        if tuple(v.shape) != head_shapes.get(key):
            problems.append(f"{PEFT_PREFIX}{key}: shape {tuple(v.shape)}, the model wants {head_shapes.get(key)}"
                            + (" (n_labels, hidden)" if key.endswith("weight") and len(v.shape) == 2 else ""))
    if problems:
        raise ExportError(f"{adapter.where}: another architecture: shapes do not fit the base ({describe}): "
                          + "; ".join(sorted(problems)[:8]) + (f" and {len(problems) - 8} more" if len(problems) > 8
                                                               else ""))
    promised = [f"{prefix}{m}.lora_{w}.weight" for m in peft_targets(adapter.config, linear, family) - adapter.modules
                for w in "AB"]
    names = [n for n in adapter.config.get("modules_to_save") or [] if n not in PEFT_HEAD_NAMES]
    modules = {".".join(p[:-1]) for p in flat}
    promised += [f"{prefix}{k}" for m in modules if any(m == n or m.endswith("." + n) for n in names)
                 for k in (hf_names.torch_key(p)[0] for p in flat if ".".join(p[:-1]) == m)
                 if k not in adapter.saved]
    promised += [f"{PEFT_PREFIX}{k}" for k in head_shapes if k not in adapter.head]
    if promised:
        raise ExportError(f"{adapter.where}: missing keys (adapter_config.json's target_modules / modules_to_save "
                          f"promise them): {and_more(promised, 12)}" if any(".lora_" in k or prefix in k
                                                                             for k in promised)
                          else f"{adapter.where}: missing keys: {and_more(promised, 12)}")


def _zeros(tree: Params) -> Params:
    return hf_names.unflatten({p: np.zeros(v.shape, np.float32) for p, v in hf_names.flatten(tree).items()})


def _blocks(base: Params, family: Any) -> int:
    node = base
    for p in family.blocks:
        node = node.get(p, {}) if isinstance(node, dict) else {}
    return len(node)


def _block_index(module: str, family: Any) -> int | None:
    lead = ".".join(family.blocks) + "."
    if not module.startswith(lead):
        return None
    index = module[len(lead):].split(".")[0]
    return int(index) if index.isdigit() else None


def lora_targets(adapter: Adapter, linear: Sequence[str], family: Any) -> list[str]:
    """lora.targets naming exactly the adapted modules, in model order: for each kind of module adapted in every
    block, the family's own target name for it (`attn.c_attn`, `query`) or else the shortest suffix of its path that
    selects those modules alone; modules adapted in some blocks only, by their paths."""
    lead = ".".join(family.blocks) + "."
    in_block: dict[str, list[str]] = {}
    for module in linear:
        index = _block_index(module, family)
        key = module[len(lead) + len(str(index)) + 1:] if index is not None else module
        in_block.setdefault(key, []).append(module)
    selects = lambda name: {m for m in linear if m == name or m.endswith("." + name)}  # noqa: E731  (targets' rule)
    targets = []
    for key, group in in_block.items():
        have = [m for m in group if m in adapter.modules]
        if not (have and len(have) == len(group) > 1):
            targets.extend(have)
            continue
        parts = key.split(".")
        names = [n for n in family.default_targets if key == n or key.endswith("." + n)]
        names += [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]
        targets.append(next((n for n in names if selects(n) == set(group)), key))
    return targets


def modules_to_save(adapter: Adapter, family: Any) -> list[str]:
    """lora.modules_to_save of the adapter: its modules_to_save less the head's and the family's own."""
    return [m for m in adapter.config.get("modules_to_save") or []
            if m not in PEFT_HEAD_NAMES and m not in family.trained_modules]


def adapter_params(adapter: Adapter, model: Any, params: Params) -> Params:
    """`params` of a freshly built model with the adapter's weights in: its factors, the head, and the modules it
    trained in full (the others stay as loaded)."""
    fam = model.family
    out = dict(params)
    out["lora"] = hf_names.lora_from_peft(fam, adapter.lora, spec=model.spec)
    out["head"] = hf_names.head_from_torch(fam, adapter.head, params["head"], adapter.where)
    if adapter.saved:
        trained, _ = hf_names.base_from_torch(fam, adapter.saved, params[fam.prefix], where=adapter.where,
                                              allow_missing=True)
        flat = dict(hf_names.flatten(params[fam.prefix]))
        flat.update(hf_names.flatten(trained))
        out[fam.prefix] = hf_names.unflatten(flat)
    return out
