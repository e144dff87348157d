"""PEFT's LoRA adapter format for transformers' GPT2ForSequenceClassification, both ways: what export-peft writes
and what import-peft accepts.

An adapter dir holds `adapter_config.json` (PEFT's LoraConfig) and `adapter_model.safetensors`: the LoRA factors as
`base_model.model.transformer.h.{i}.<Conv1D>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r) with
fan_in_fan_out=true (GPT-2's Conv1D), and the trained LayerNorms and the head as `modules_to_save`
(`base_model.model.transformer.h.0.ln_1.weight`, `base_model.model.score.weight`), the keys PEFT itself writes.
PEFT computes x @ A^T @ B^T * lora_alpha / r (use_rslora: / sqrt(r)), so every init converts exactly: `standard`
keeps lora_alpha = lora.alpha (use_rslora = lora.scaling=rslora), and `seed` (U V^T, no scaling) is written as
A = U^T, B = V with lora_alpha = r (scaling exactly 1). DoRA (use_dora) adds `<module>.lora_magnitude_vector` (out,).
PiSSA / OLoRA runs train on a residual base; they are written in PEFT's converted plain-LoRA form against the
original base (its `path_initial_model_for_weight_conversion`): rank 2r, A' = [A; A0], B' = [B, -B0] (A0, B0 the
factors at init), lora_alpha doubled (x sqrt 2 with rsLoRA), init_lora_weights true: B'A' = BA - B0A0, so on the
original W = W_res + scale B0A0 it is the trained W_res + scale BA again, and DoRA's norm is unchanged.
Read back, the adapter decides lora.rank, lora.alpha, lora.scaling, lora.variant, lora.dropout and lora.targets;
lora.init becomes `standard`, or `pissa` for an adapter in PEFT's own PiSSA form (init_lora_weights "pissa": PEFT
factorises the base again when it loads one, and so does import-peft).

Here lives everything that knows the format (key names, config fields, PEFT's matching rules, the checks that
name what an adapter lacks); `export` runs the operations. Numpy only: weights go through `convert`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lora_kd_jax.lora import convert
from lora_kd_jax.core.config import Config
from lora_kd_jax.lora.convert import PEFT_PREFIX, SCORE_KEY, TRANSFORMER_PREFIX
from lora_kd_jax.core.errors import UserError, read_json_object
from lora_kd_jax.core.gpt2_layout import (BLOCK_LAYER_NORMS, CONV1D_MODULES, FINAL_LAYER_NORM, LAYER_NORMS,
                                            conv1d_in_out)

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
_PEFT_CLASSIFIER_NAMES = ("classifier", "score")
# What PEFT writes for task_type SEQ_CLS with modules_to_save=["ln_1", "ln_2", "ln_f"]: it appends its classifier names.
MODULES_TO_SAVE = [*LAYER_NORMS, *_PEFT_CLASSIFIER_NAMES]
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_MAG_KEY = re.compile(rf"^(?P<module>.+)\.{convert.PEFT_MAGNITUDE}$")  # DoRA: (out,)
_CONV_MODULE = re.compile(rf"^{re.escape(TRANSFORMER_PREFIX)}h\.(?P<layer>\d+)\."
                          rf"(?P<suffix>{'|'.join(map(re.escape, CONV1D_MODULES))})$")
_LN_KEY = re.compile(rf"^{re.escape(TRANSFORMER_PREFIX)}(?:h\.\d+\.(?:{'|'.join(BLOCK_LAYER_NORMS)})|"
                     rf"{FINAL_LAYER_NORM})\.(?:weight|bias)$")


class ExportError(UserError, ValueError):
    """An input cannot be exported / imported / merged as asked; the message names what is missing or mismatched.

    Defined here, below `export`, so that the format's own checks raise it; `export.ExportError` is this class."""
    label = "export error"


def _conv_modules(n_layer: int) -> list[str]:
    """GPT2ForSequenceClassification names of every Conv1D (what PEFT's target_modules are matched against)."""
    return [f"{TRANSFORMER_PREFIX}h.{i}.{s}" for i in range(n_layer) for s in CONV1D_MODULES]


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _and_more(items: Sequence[str], shown: int) -> str:
    """The first `shown` of `items` in key order, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(convert.sorted_keys(items)[:shown]) + more


# ------------------------------------------------------------------------------------------------- out


def target_modules(paths: Sequence[tuple[str, ...]], n_layer: int) -> list[str]:
    """PEFT's target_modules for our adapted module paths: the short names (`c_attn`, `c_proj`, `c_fc`) when every
    GPT-2 Conv1D of those names is adapted (the usual config), otherwise the full module names, which PEFT matches
    exactly."""
    chosen = {TRANSFORMER_PREFIX + ".".join(p) for p in paths}
    names = sorted({p[-1] for p in paths})
    covered = {m for m in _conv_modules(n_layer) if m.rsplit(".", 1)[-1] in names}
    if covered == chosen:
        return names
    return sorted(chosen)


DECOMPOSED = ("pissa", "olora")  # inits exported in PEFT's converted plain-LoRA form (rank 2r)


def lora_alpha(cfg: Config, spec: Any) -> int | float:
    """lora_alpha such that PEFT's scaling lora_alpha / r (rsLoRA: / sqrt r) equals our scale exactly: r for `seed`
    (scale 1), lora.alpha otherwise."""
    if spec.init == "seed":
        if spec.scale != 1.0:
            raise ExportError(f"seed-init LoRA with scale {spec.scale}: expected 1")
        return spec.rank
    alpha = cfg.lora.alpha
    rs = cfg.lora.scaling == "rslora"
    if alpha / (math.sqrt(spec.rank) if rs else spec.rank) != spec.scale:
        raise ExportError(f"lora.alpha {alpha} / lora.rank {spec.rank} ({cfg.lora.scaling} scaling) != the model's "
                          f"LoRA scale {spec.scale}")
    return _number(alpha)


def adapter_config(cfg: Config, spec: Any, n_layer: int, base_model: str | None) -> dict:
    """adapter_config.json for PEFT's LoraConfig (the fields PEFT 0.21 writes that matter here, at its values)."""
    rank, alpha, rs = spec.rank, lora_alpha(cfg, spec), spec.init != "seed" and cfg.lora.scaling == "rslora"
    if spec.init in DECOMPOSED:  # the converted form: rank 2r at the same scaling
        rank, alpha = 2 * rank, _number(alpha * (math.sqrt(2) if rs else 2))
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(spec.dropout),
        "target_modules": target_modules(spec.paths, n_layer),
        "exclude_modules": None,
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "use_rslora": rs,
        "use_dora": spec.variant == "dora",
        "lora_bias": False,
        "modules_to_save": list(MODULES_TO_SAVE),
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
    }


def _layer_norms(base: Params) -> Params:
    """The LayerNorm subtree of a flax GPT-2 base: {'h': {i: {'ln_1', 'ln_2'}}, 'ln_f'}."""
    flat = convert.flatten(base)
    return convert.unflatten({p: v for p, v in flat.items() if any(s in LAYER_NORMS for s in p)})


def converted_factors(factors: Params, start: Params) -> Params:
    """PEFT's PiSSA/OLoRA -> LoRA conversion: a' = [a, a0] (in, 2r), b' = [b; -b0] (2r, out), magnitudes kept."""
    flat, flat0 = convert.flatten(factors), convert.flatten(start)
    out = {}
    for path, v in flat.items():
        v = np.asarray(v)
        if path[-1] == "a":
            v = np.concatenate([v, np.asarray(flat0[path])], axis=1)
        elif path[-1] == "b":
            v = np.concatenate([v, -np.asarray(flat0[path])], axis=0)
        out[path] = v
    return convert.unflatten(out)


def adapter_state_dict(params: Params, start: Params | None = None) -> StateDict:
    """LoRA factors (DoRA magnitudes too), every LayerNorm and the head under the keys PEFT's `save_pretrained`
    writes for a GPT2ForSequenceClassification (`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`,
    `base_model.model.transformer.h.0.ln_1.weight`, `base_model.model.score.weight`). `start`, the factors at init of
    a PiSSA / OLoRA run, asks for the converted plain-LoRA form."""
    if "lora" not in params:
        raise ExportError("params hold no LoRA factors ('lora' subtree)")
    factors = params["lora"] if start is None else converted_factors(params["lora"], start)
    out = convert.flax_lora_to_peft(factors, prefix=PEFT_PREFIX + TRANSFORMER_PREFIX)
    out.update(convert.flax_gpt2_to_torch(_layer_norms(params["gpt2"]), prefix=PEFT_PREFIX + TRANSFORMER_PREFIX,
                                          allow_missing=True))
    out.update(convert.flax_head_to_torch(params["head"], key=PEFT_PREFIX + SCORE_KEY))
    return out


# -------------------------------------------------------------------------------------------------- in


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A PEFT adapter read and checked on its own, before any base is known."""

    where: str  # "PEFT adapter DIR", for messages
    config: dict  # adapter_config.json
    lora: StateDict  # lora_A / lora_B weights (and DoRA magnitudes) under their full PEFT keys
    norms: StateDict  # LayerNorm weights, keys without `base_model.model.`
    score: np.ndarray  # the head, (n_labels, n_embd)
    modules: frozenset[str]  # the adapted Conv1D modules (GPT2ForSequenceClassification names)
    settings: dict  # lora.* values that reproduce the adapter (rank, alpha, dropout, init)


def _read_files(d: Path) -> tuple[dict, StateDict]:
    """(adapter_config.json, weights as numpy) of a PEFT adapter dir (safetensors; .bin needs torch)."""
    if not d.is_dir():
        raise ExportError(f"{d}: no such directory (expected a PEFT adapter dir with {ADAPTER_CONFIG} and "
                          f"{ADAPTER_WEIGHTS})")
    cfg_path = d / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise ExportError(f"{d} is not a PEFT adapter dir: missing {ADAPTER_CONFIG}")
    config = read_json_object(cfg_path, ExportError)
    if (d / ADAPTER_WEIGHTS).is_file():
        from safetensors.numpy import load_file

        weights = load_file(os.fspath(d / ADAPTER_WEIGHTS))
    elif (d / ADAPTER_WEIGHTS_BIN).is_file():
        try:
            import torch
        except ImportError:
            raise ExportError(f"{d}: only {ADAPTER_WEIGHTS_BIN} (a torch pickle) is present and torch is not "
                              f"installed; re-save the adapter with safe_serialization=True") from None
        weights = {k: convert.to_numpy(v) for k, v in
                   torch.load(d / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True).items()}
    else:
        raise ExportError(f"{d} is not a PEFT adapter dir: missing {ADAPTER_WEIGHTS}")
    return config, weights


def _check_config(config: dict, where: str) -> None:
    def bad(msg: str) -> ExportError:
        return ExportError(f"{where}: {msg}")

    if config.get("peft_type") != "LORA":
        raise bad(f"peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    if config.get("task_type") != "SEQ_CLS":
        raise bad(f"task_type is {config.get('task_type')!r}, expected 'SEQ_CLS' (an adapter for "
                  "GPT2ForSequenceClassification, whose head `score` is saved with it)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise bad(f"{key} is {config.get(key)!r}, expected a positive number")
    unsupported = {"lora_bias": False, "bias": "none"}
    for key, want in unsupported.items():
        if config.get(key, want) != want:
            raise bad(f"{key}={config[key]!r} is not supported (this project's LoRA layer is x @ A^T @ B^T * "
                      f"scaling with {key}={want!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise bad(f"another rank layout: {key}={config[key]} gives some layers their own rank or alpha; this "
                      f"project holds one rank and one scale for all adapted layers (r={config['r']}, "
                      f"lora_alpha={config['lora_alpha']})")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", "pissa"):
        why = ("PEFT's olora_init ignores fan_in_fan_out and cannot run on GPT-2's Conv1D" if init == "olora" else
               "PEFT would rebuild its base from a randomised or data-dependent decomposition this project cannot "
               "repeat")
        raise bad(f"init_lora_weights={init!r} is not supported ({why}); save the adapter in PEFT's converted "
                  "plain-LoRA form (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if config.get("layer_replication"):
        raise bad(f"layer_replication={config['layer_replication']} is not supported")


def _split_weights(config: dict, weights: StateDict, where: str) -> tuple[StateDict, StateDict, np.ndarray]:
    """(lora keys, LayerNorm keys, score.weight) with `base_model.model.` stripped; anything else is an error."""
    stray = [k for k in weights if not k.startswith(PEFT_PREFIX)]
    if stray:
        raise ExportError(f"{where}: keys without PEFT's '{PEFT_PREFIX}' prefix: {', '.join(sorted(stray)[:8])}")
    lora, norms, unexpected, score = {}, {}, [], None
    for key, v in weights.items():
        k = key[len(PEFT_PREFIX):]
        m = _LORA_KEY.match(k) or _MAG_KEY.match(k)
        if m and _CONV_MODULE.match(m.group("module")):
            lora[key] = v
        elif _LN_KEY.match(k):
            norms[k] = v
        elif k == SCORE_KEY:
            score = v
        else:
            unexpected.append(key)
    if unexpected:
        hint = (f" (LoRA on modules that are not GPT-2's {', '.join(CONV1D_MODULES)})"
                if any(_LORA_KEY.match(k[len(PEFT_PREFIX):]) for k in unexpected) else "")
        raise ExportError(f"{where}: not a LoRA adapter for GPT2ForSequenceClassification{hint}: unexpected keys: "
                          f"{_and_more(unexpected, 12)} "
                          f"(base_model_name_or_path: {config.get('base_model_name_or_path')!r})")
    if not lora:
        raise ExportError(f"{where}: no LoRA weights (missing keys like {PEFT_PREFIX}{TRANSFORMER_PREFIX}h.0."
                          f"{CONV1D_MODULES[0]}.lora_A.weight)")
    if score is None:
        raise ExportError(f"{where}: missing keys: {PEFT_PREFIX}{SCORE_KEY} (the classification head; PEFT saves "
                          "it for task_type SEQ_CLS)")
    return lora, norms, score


def _settings(config: dict, lora: StateDict, where: str) -> dict:
    """lora.* values that reproduce the adapter: rank r, alpha with alpha/rank = PEFT's scaling, dropout."""
    r = config["r"]
    ranks = {}
    for key, v in lora.items():
        m = _LORA_KEY.match(key[len(PEFT_PREFIX):])
        if m is None:  # a DoRA magnitude
            continue
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


def read_adapter(peft_dir: str | os.PathLike) -> Adapter:
    """A PEFT adapter dir, checked as far as it can be without a base: a LoRA config this project can hold (one rank,
    one scale, no DoRA, task SEQ_CLS), keys that are GPT-2's, both factors of every adapted module."""
    where = f"PEFT adapter {peft_dir}"
    config, weights = _read_files(Path(peft_dir))
    _check_config(config, where)
    lora, norms, score = _split_weights(config, weights, where)
    settings = _settings(config, lora, where)
    modules = frozenset(m.group("module") for k in lora if (m := _LORA_KEY.match(k[len(PEFT_PREFIX):])))
    parts = [f".lora_{w}.weight" for w in "AB"] + ([f".{convert.PEFT_MAGNITUDE}"] if config.get("use_dora") else [])
    half = [f"{PEFT_PREFIX}{m}{p}" for m in modules for p in parts if f"{PEFT_PREFIX}{m}{p}" not in lora]
    stray = [k for k in lora if _MAG_KEY.match(k[len(PEFT_PREFIX):])] if not config.get("use_dora") else []
    if stray:
        raise ExportError(f"{where}: DoRA magnitudes without use_dora=true in {ADAPTER_CONFIG}: "
                          f"{_and_more(stray, 4)}")
    if half:
        raise ExportError(f"{where}: missing keys: {', '.join(convert.sorted_keys(half))}")
    return Adapter(where, config, lora, norms, score, modules, settings)


def _peft_targets(config: dict, n_layer: int) -> set[str]:
    """The GPT-2 Conv1D module names PEFT adapts under this config (its matching rules, for Conv1D modules)."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    layers = config.get("layers_to_transform")
    layers = None if layers is None or layers == [] else ({layers} if isinstance(layers, int) else set(layers))

    def listed(names: Any, key: str) -> bool:
        if isinstance(names, str):
            return names == "all-linear" or re.fullmatch(names, key) is not None
        return key in names or any(key.endswith("." + n) for n in names)

    out = set()
    for m in _conv_modules(n_layer):
        if exclude and listed(exclude, m):
            continue
        if not targets or not listed(targets, m):
            continue
        # PEFT applies layers_to_transform to suffix matches of a list (not to a regex or an exact full name)
        if layers is not None and not isinstance(targets, str) and m not in targets \
                and int(m.split(".")[2]) not in layers:
            continue
        out.add(m)
    return out


def _modules_to_save_keys(config: dict, n_layer: int) -> set[str]:
    """Keys (without `base_model.model.`) PEFT saves for the supported modules_to_save: LayerNorms and `score`."""
    names = list(config.get("modules_to_save") or []) + list(_PEFT_CLASSIFIER_NAMES)
    keys = set()
    for i in [*range(n_layer), None]:
        for ln in (BLOCK_LAYER_NORMS if i is not None else (FINAL_LAYER_NORM,)):
            module = f"{TRANSFORMER_PREFIX}h.{i}.{ln}" if i is not None else f"{TRANSFORMER_PREFIX}{ln}"
            if any(module.endswith(n) for n in names):  # PEFT's rule for modules_to_save: plain suffix
                keys |= {module + ".weight", module + ".bias"}
    keys.add(SCORE_KEY)
    return keys


def _check_dims(adapter: Adapter, dims: tuple[int, int, int], base: str) -> None:
    """Every adapter tensor against the base's depth and widths, before any weight is loaded."""
    n_layer, e, inner = dims
    in_out = conv1d_in_out(e, inner)
    problems, beyond = [], set()
    for key, v in adapter.lora.items():
        k = key[len(PEFT_PREFIX):]
        m = _CONV_MODULE.match((_LORA_KEY.match(k) or _MAG_KEY.match(k)).group("module"))
        if int(m.group("layer")) >= n_layer:
            beyond.add(k.rsplit(".lora_", 1)[0])
            continue
        d_in, d_out = in_out[m.group("suffix")]
        if _MAG_KEY.match(k):
            if tuple(v.shape) != (d_out,):
                problems.append(f"{key}: shape {tuple(v.shape)}, the base wants ({d_out},)")
            continue
        got_in_out = v.shape[1] if ".lora_A." in key else v.shape[0]
        want = d_in if ".lora_A." in key else d_out
        if v.ndim != 2 or got_in_out != want:
            problems.append(f"{key}: shape {tuple(v.shape)}, the base wants "
                            f"{'(r, ' + str(d_in) + ')' if '.lora_A.' in key else '(' + str(d_out) + ', r)'}")
    if beyond:
        raise ExportError(f"{adapter.where}: another architecture: LoRA on "
                          f"{', '.join(convert.sorted_keys(beyond)[:4])}, but the base ({base}) has {n_layer} layers")
    for k, v in adapter.norms.items():
        layer = int(k.split(".")[2]) if k.startswith(f"{TRANSFORMER_PREFIX}h.") else -1
        if layer >= n_layer:
            problems.append(f"{PEFT_PREFIX}{k}: layer beyond the base's {n_layer}")
        elif tuple(v.shape) != (e,):
            problems.append(f"{PEFT_PREFIX}{k}: shape {tuple(v.shape)}, the base wants ({e},)")
    score = adapter.score
    if score.ndim != 2 or tuple(score.shape) != (2, e):
        problems.append(f"{PEFT_PREFIX}{SCORE_KEY}: shape {tuple(score.shape)}, the base wants (2, {e}) "
                        "(n_labels, n_embd)")
    if problems:
        raise ExportError(f"{adapter.where}: another architecture: shapes do not fit the base ({base}: {n_layer} "
                          f"layers, width {e}, MLP width {inner}): " + "; ".join(sorted(problems)[:8])
                          + (f" and {len(problems) - 8} more" if len(problems) > 8 else ""))


def check_fits(adapter: Adapter, dims: tuple[int, int, int], base: str) -> None:
    """The adapter against a base of `dims` (n_layer, n_embd, n_inner), named `base` in messages: every shape fits,
    and every key its own target_modules / modules_to_save promise is there."""
    n_layer = dims[0]
    _check_dims(adapter, dims, base)
    missing = [f"{PEFT_PREFIX}{m}.lora_{w}.weight" for m in _peft_targets(adapter.config, n_layer) - adapter.modules
               for w in "AB"]
    missing += [PEFT_PREFIX + k
                for k in _modules_to_save_keys(adapter.config, n_layer) - set(adapter.norms) - {SCORE_KEY}]
    if missing:
        raise ExportError(f"{adapter.where}: missing keys (adapter_config.json's target_modules / modules_to_save "
                          f"promise them): {_and_more(missing, 12)}")


def lora_targets(adapter: Adapter, n_layer: int) -> list[str]:
    """lora.targets naming exactly the adapted modules: a suffix like `attn.c_attn` where every layer has it, else
    the explicit `h.{i}.attn.c_attn` paths."""
    inner = {m[len(TRANSFORMER_PREFIX):] for m in adapter.modules}
    targets = []
    for s in CONV1D_MODULES:
        have = sorted((p for p in inner if p.endswith("." + s)), key=lambda p: int(p.split(".")[1]))
        if len(have) == n_layer:
            targets.append(s)
        else:
            targets.extend(have)
    return targets


def adapter_params(adapter: Adapter, params: Params, spec: Any) -> Params:
    """`params` {'gpt2', 'lora', 'head'} of a freshly built model with the adapter's weights in (numpy leaves where
    they came from the adapter): its factors, the head, and the LayerNorms it saved; other LayerNorms stay."""
    out = dict(params)
    out["lora"] = convert.peft_lora_to_flax(adapter.lora, spec=spec)
    if adapter.norms:
        trained = convert.torch_gpt2_to_flax(adapter.norms, allow_missing=True)
        flat = dict(convert.flatten(params["gpt2"]))
        for path, v in convert.flatten(trained).items():
            if tuple(v.shape) != tuple(flat[path].shape):
                raise convert.ConversionError(f"{adapter.where}: {TRANSFORMER_PREFIX}{convert.torch_key(path)[0]}: "
                                              f"shape {tuple(v.shape)}, the base has {tuple(flat[path].shape)}")
            flat[path] = v
        out["gpt2"] = convert.unflatten(flat)
    head = convert.torch_head_to_flax(adapter.score)
    want = tuple(params["head"]["kernel"].shape)
    if tuple(head["kernel"].shape) != want:
        raise convert.ConversionError(f"{adapter.where}: {PEFT_PREFIX}{SCORE_KEY}: shape {tuple(adapter.score.shape)}, "
                                      f"expected {(want[1], want[0])} (n_labels, n_embd)")
    out["head"] = head
    return out
