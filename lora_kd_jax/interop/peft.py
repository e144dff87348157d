"""PEFT's LoRA adapter format, both ways, for every family: what export-peft writes and what import-peft accepts.

An adapter dir holds `adapter_config.json` (PEFT's LoraConfig, task SEQ_CLS) and `adapter_model.safetensors` with the
keys PEFT's `save_pretrained` writes for the family's *ForSequenceClassification:

    base_model.model.<torch_prefix>.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r)   the factors
    base_model.model.<torch_prefix>.<module>.lora_magnitude_vector (out,)                      DoRA's magnitudes
    base_model.model.<torch_prefix>.<module>.{weight,bias}        the modules trained in full (modules_to_save)
    base_model.model.<head>.{weight,bias}                         the head (`score`, `classifier`, ...)

PEFT computes x @ Aᵀ @ Bᵀ * lora_alpha / r (use_rslora: / sqrt r), so every init converts exactly: `standard` keeps
lora_alpha = lora.alpha, and `seed` (U Vᵀ, no scaling) is written as A = Uᵀ, B = V with lora_alpha = r. GPT-2's Conv1D
layers take fan_in_fan_out=true (the factors' shapes are the same). PiSSA / OLoRA runs train on a residual base and
are written in PEFT's converted plain-LoRA form against the original base (its
`path_initial_model_for_weight_conversion`): rank 2r, A' = [A; A0], B' = [B, -B0], lora_alpha doubled (x sqrt 2 with
rsLoRA), so on the original W = W_res + scale B0 A0 it is the trained W_res + scale B A again.
Read back, the adapter decides lora.rank, alpha, scaling, variant, dropout, targets and modules_to_save; lora.init
becomes `standard`, or `pissa` for an adapter in PEFT's own PiSSA form (PEFT factorises the base again when it loads
one, and so does import-peft). Everything is checked before any weight is built, each error naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lora_kd_jax.core.errors import UserError, read_json_object
from lora_kd_jax.models import hf_names
from lora_kd_jax.models.hf_names import PEFT_MAGNITUDE, PEFT_PREFIX

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PEFT_HEAD_NAMES = ("classifier", "score")  # PEFT appends these to every SEQ_CLS adapter's modules_to_save
DECOMPOSED = ("pissa", "olora")  # inits exported in PEFT's converted plain-LoRA form (rank 2r)
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
MAG_KEY = re.compile(rf"^(?P<module>.+)\.{PEFT_MAGNITUDE}$")


class ExportError(UserError, ValueError):
    """An input cannot be exported / imported / merged as asked; the message names what is missing or mismatched."""
    label = "export error"


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def and_more(items: Sequence[str], shown: int) -> str:
    return hf_names.listing(items, shown)


# ------------------------------------------------------------------------------------------------- out


def target_modules(model: Any) -> list[str]:
    """PEFT's target_modules: the short names (`c_attn`, `query`) when every linear layer of those names is adapted,
    else the full module names, which PEFT matches exactly."""
    paths = model.spec.paths
    names = sorted({p[-1] for p in paths})
    linear = {k[:-1] for k, v in hf_names.flatten(model.base if model.base is not None else {}).items()
              if k[-1] == "kernel" and len(getattr(v, "shape", ())) == 2}
    if linear and {p for p in linear if p[-1] in names} == set(paths):
        return names
    return sorted(hf_names.module_names(model.family, paths))


def lora_alpha(lora: Any, spec: Any) -> int | float:
    """lora_alpha such that PEFT's scaling lora_alpha / r (rsLoRA: / sqrt r) equals our scale exactly: r for `seed`
    (scale 1), lora.alpha otherwise."""
    if spec.init == "seed":
        if spec.scale != 1.0:
            raise ExportError(f"seed-init LoRA with scale {spec.scale}: expected 1")
        return spec.rank
    rs = lora.scaling == "rslora"
    if lora.alpha / (math.sqrt(spec.rank) if rs else spec.rank) != spec.scale:
        raise ExportError(f"lora.alpha {lora.alpha} / lora.rank {spec.rank} ({lora.scaling} scaling) != the model's "
                          f"LoRA scale {spec.scale}")
    return _number(lora.alpha)


def adapter_config(lora: Any, model: Any, base_model: str | None) -> dict:
    """adapter_config.json for PEFT's LoraConfig (the fields PEFT 0.21 writes that matter here, at its values)."""
    spec = model.spec
    rank, alpha, rs = spec.rank, lora_alpha(lora, spec), spec.init != "seed" and lora.scaling == "rslora"
    if spec.init in DECOMPOSED:  # the converted form: rank 2r at the same scaling
        rank, alpha = 2 * rank, _number(alpha * (math.sqrt(2) if rs else 2))
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "auto_mapping": None, "base_model_name_or_path": base_model,
        "revision": None, "inference_mode": True, "r": rank, "lora_alpha": alpha, "lora_dropout": float(spec.dropout),
        "target_modules": target_modules(model), "exclude_modules": None,
        "fan_in_fan_out": model.family.fan_in_fan_out, "bias": "none", "use_rslora": rs,
        "use_dora": spec.variant == "dora", "lora_bias": False,
        "modules_to_save": [*model.to_save, *PEFT_HEAD_NAMES], "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "layer_replication": None,
    }


def converted_factors(factors: Params, start: Params) -> Params:
    """PEFT's PiSSA/OLoRA -> LoRA conversion: a' = [a, a0] (in, 2r), b' = [b; -b0] (2r, out), magnitudes kept."""
    flat, flat0 = hf_names.flatten(factors), hf_names.flatten(start)
    out = {}
    for path, v in flat.items():
        v = np.asarray(v)
        if path[-1] == "a":
            v = np.concatenate([v, np.asarray(flat0[path])], axis=1)
        elif path[-1] == "b":
            v = np.concatenate([v, -np.asarray(flat0[path])], axis=0)
        out[path] = v
    return hf_names.unflatten(out)


def trained_modules(model: Any, base: Params) -> Params:
    """The base leaves that train in full (the family's and lora.modules_to_save's modules), a subtree keeping its
    paths."""
    flat = hf_names.flatten({model.family.prefix: base})
    labels = hf_names.flatten(model.param_labels(hf_names.unflatten(flat)))
    return hf_names.unflatten({p[1:]: v for p, v in flat.items() if labels[p] != "frozen"})


def adapter_state_dict(model: Any, params: Params) -> StateDict:
    """The factors (DoRA magnitudes too; a PiSSA / OLoRA run's in the converted rank-2r form), the modules trained in
    full and the head, under the keys PEFT's `save_pretrained` writes."""
    if "lora" not in params:
        raise ExportError("params hold no LoRA factors ('lora' subtree)")
    fam = model.family
    factors = params["lora"] if model.start is None else converted_factors(params["lora"], model.start)
    out = hf_names.lora_to_peft(fam, factors)
    out.update(hf_names.base_to_torch(fam, trained_modules(model, params[fam.prefix]),
                                      prefix=hf_names.peft_module_prefix(fam)))
    out.update(hf_names.head_to_torch(fam, params["head"], prefix=PEFT_PREFIX))
    return out


# -------------------------------------------------------------------------------------------------- in


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A PEFT adapter read and split for one family, checked as far as it can be without a base."""

    where: str  # "PEFT adapter DIR", for messages
    config: dict  # adapter_config.json
    lora: StateDict  # factors (and DoRA magnitudes) under their full PEFT keys
    saved: StateDict  # modules trained in full: base keys without any prefix (`h.0.ln_1.weight`)
    head: StateDict  # the head's keys without `base_model.model.`
    modules: frozenset[str]  # the adapted modules, without the family prefix (`h.0.attn.c_attn`)
    settings: dict  # lora.* values that reproduce the adapter (rank, alpha, scaling, variant, dropout, init)


def read_files(d: Path) -> tuple[dict, StateDict]:
    """(adapter_config.json, weights as numpy) of a PEFT adapter dir (safetensors; .bin needs torch)."""
    if not d.is_dir():
        raise ExportError(f"{d}: no such directory (expected a PEFT adapter dir with {ADAPTER_CONFIG} and "
                          f"{ADAPTER_WEIGHTS})")
    if not (d / ADAPTER_CONFIG).is_file():
        raise ExportError(f"{d} is not a PEFT adapter dir: missing {ADAPTER_CONFIG}")
    config = read_json_object(d / ADAPTER_CONFIG, ExportError)
    if (d / ADAPTER_WEIGHTS).is_file():
        from safetensors.numpy import load_file

        return config, load_file(os.fspath(d / ADAPTER_WEIGHTS))
    if (d / ADAPTER_WEIGHTS_BIN).is_file():
        try:
            import torch
        except ImportError:
            raise ExportError(f"{d}: only {ADAPTER_WEIGHTS_BIN} (a torch pickle) is present and torch is not "
                              f"installed; re-save the adapter with safe_serialization=True") from None
        return config, {k: hf_names.to_numpy(v) for k, v in
                        torch.load(d / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True).items()}
    raise ExportError(f"{d} is not a PEFT adapter dir: missing {ADAPTER_WEIGHTS}")


def check_config(config: dict, family: Any, where: str) -> None:
    """A LoRA config this library can hold: one rank and one scale, task SEQ_CLS, no LoRA bias, an init it can
    repeat, the family's kernel layout."""
    def bad(msg: str) -> ExportError:
        return ExportError(f"{where}: {msg}")

    if config.get("peft_type") != "LORA":
        raise bad(f"peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    if config.get("task_type") != "SEQ_CLS":
        raise bad(f"task_type is {config.get('task_type')!r}, expected 'SEQ_CLS' (an adapter for "
                  f"{family.torch_class}, whose head is saved with it)")
    for k in ("r", "lora_alpha"):
        if not isinstance(config.get(k), (int, float)) or isinstance(config.get(k), bool) or config[k] <= 0:
            raise bad(f"{k} is {config.get(k)!r}, expected a positive number")
    for k, want in (("lora_bias", False), ("bias", "none")):
        if config.get(k, want) != want:
            raise bad(f"{k}={config[k]!r} is not supported (this library's LoRA layer is x @ A^T @ B^T * scaling "
                      f"with {k}={want!r})")
    if config.get("fan_in_fan_out") and not family.fan_in_fan_out:
        raise bad(f"fan_in_fan_out=true, but {family.torch_class}'s layers are nn.Linear (out, in)")
    for k in ("rank_pattern", "alpha_pattern"):
        if config.get(k):
            raise bad(f"another rank layout: {k}={config[k]} gives some layers their own rank or alpha; this library "
                      f"holds one rank and one scale for all adapted layers (r={config['r']}, "
                      f"lora_alpha={config['lora_alpha']})")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", "pissa"):
        why = ("PEFT's olora_init ignores fan_in_fan_out and cannot run on GPT-2's Conv1D" if init == "olora" else
               "PEFT would rebuild its base from a randomised or data-dependent decomposition this library cannot "
               "repeat")
        raise bad(f"init_lora_weights={init!r} is not supported ({why}); save the adapter in PEFT's converted "
                  "plain-LoRA form (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if config.get("layer_replication"):
        raise bad(f"layer_replication={config['layer_replication']} is not supported")


def split_weights(config: dict, weights: StateDict, family: Any, where: str) -> tuple[StateDict, StateDict, StateDict]:
    """(factor keys, base keys of modules trained in full without any prefix, head keys without `base_model.model.`);
    any other key means the adapter is not for this family's classifier."""
    stray = [k for k in weights if not k.startswith(PEFT_PREFIX)]
    if stray:
        raise ExportError(f"{where}: keys without PEFT's '{PEFT_PREFIX}' prefix: {and_more(stray, 8)}")
    base_prefix = hf_names.peft_module_prefix(family)
    lora, saved, head, unexpected = {}, {}, {}, []
    for key, v in weights.items():
        k = key[len(PEFT_PREFIX):]
        if key.startswith(base_prefix) and (LORA_KEY.match(key) or MAG_KEY.match(key)):
            lora[key] = v
        elif key.startswith(base_prefix):
            saved[key[len(base_prefix):]] = v
        elif hf_names.is_head_key(family, k):
            head[k] = v
        else:
            unexpected.append(key)
    if unexpected:
        raise ExportError(f"{where}: not a LoRA adapter for {family.torch_class}: unexpected keys: "
                          f"{and_more(unexpected, 12)} (base_model_name_or_path: "
                          f"{config.get('base_model_name_or_path')!r})")
    if not lora:
        raise ExportError(f"{where}: no LoRA weights (missing keys like {base_prefix}...lora_A.weight)")
    return lora, saved, head


def settings(config: dict, lora: StateDict, where: str) -> dict:
    """lora.* values that reproduce the adapter: rank r, alpha with alpha/rank = PEFT's scaling, dropout, variant."""
    r = config["r"]
    ranks = {}
    for key, v in lora.items():
        m = LORA_KEY.match(key[len(PEFT_PREFIX):])
        if m is not None:
            ranks[f"{m.group('module')}.lora_{m.group('which')}"] = v.shape[0] if m.group("which") == "A" else v.shape[-1]
    off = {k: n for k, n in ranks.items() if n != r}
    if off:
        raise ExportError(f"{where}: another rank layout: adapter_config.json says r={r} but "
                          + ", ".join(f"{k} has rank {n}" for k, n in sorted(off.items())[:8]))
    return {"rank": int(r), "alpha": float(config["lora_alpha"]),
            "scaling": "rslora" if config.get("use_rslora") else "standard",
            "variant": "dora" if config.get("use_dora") else "lora",
            "dropout": float(config.get("lora_dropout") or 0.0),
            "init": "pissa" if config.get("init_lora_weights") == "pissa" else "standard"}


def read_adapter(peft_dir: str | os.PathLike, family: Any) -> Adapter:
    """A PEFT adapter dir for `family`'s classifier, checked as far as it can be without a base: its config, its
    keys, both factors (and DoRA's magnitude) of every adapted module, one rank."""
    where = f"PEFT adapter {peft_dir}"
    config, weights = read_files(Path(peft_dir))
    check_config(config, family, where)
    lora, saved, head = split_weights(config, weights, family, where)
    found = settings(config, lora, where)
    base_prefix = hf_names.peft_module_prefix(family)
    modules = frozenset(m.group("module")[len(base_prefix):] for k in lora if (m := LORA_KEY.match(k)))
    parts = [f".lora_{w}.weight" for w in "AB"] + ([f".{PEFT_MAGNITUDE}"] if config.get("use_dora") else [])
    half = [f"{base_prefix}{m}{p}" for m in modules for p in parts if f"{base_prefix}{m}{p}" not in lora]
    stray = [k for k in lora if MAG_KEY.match(k)] if not config.get("use_dora") else []
    if stray:
        raise ExportError(f"{where}: DoRA magnitudes without use_dora=true in {ADAPTER_CONFIG}: {and_more(stray, 4)}")
    if half:
        raise ExportError(f"{where}: missing keys: {', '.join(hf_names.sorted_keys(half))}")
    return Adapter(where, config, lora, saved, head, modules, found)
