"""Interoperability with PyTorch: PEFT adapters out and in, merged checkpoints for deployment.

export-peft  a trained LoRA run -> a PEFT LoRA adapter directory for transformers' GPT2ForSequenceClassification
             (`adapter_config.json` + `adapter_model.safetensors`), loadable with `peft.PeftModel.from_pretrained`.
             LoRA factors go to `...lora_A.weight` (r, in) / `...lora_B.weight` (out, r) with fan_in_fan_out=true
             (GPT-2's Conv1D); the trained LayerNorms and the head go in as `modules_to_save` (ln_1, ln_2, ln_f,
             score), under the key names PEFT itself writes (`base_model.model.transformer.h.0.ln_1.weight`,
             `base_model.model.score.weight`). Both inits convert exactly: PEFT computes x @ A^T @ B^T * lora_alpha/r,
             so `standard` keeps lora_alpha = lora.alpha, and `seed` (U V^T, no scaling) writes A = U^T, B = V with
             lora_alpha = r (scaling exactly 1).
import-peft  a PEFT adapter directory (written by PEFT) -> our parameter tree {'gpt2', 'lora', 'head'} on the base
             the config names, and optionally a run directory holding it as checkpoint step 0, from which
             `lora-kd-jax train-lora RUN/config.yaml --resume` continues training (or
             `runs.open_run(RUN, which="latest")` reads back). The adapter defines the LoRA settings: lora.rank, lora.alpha (so that alpha/rank
             is PEFT's scaling), lora.dropout and lora.targets are taken from it, lora.init becomes `standard`.
merge        a trained LoRA run -> a plain Hugging Face GPT-2 checkpoint with the adapters folded into the kernels:
             `config.json`, `flax_model.msgpack` (FlaxGPT2Model) and `model.safetensors` (PyTorch
             GPT2ForSequenceClassification: `transformer.*` + the head `score.weight`). No file of this project is
             needed to load it.

The classifier pools the hidden state of the last real token; transformers' GPT2ForSequenceClassification pools
the last token that is not `config.pad_token_id` (50256, written into every config here). The two agree on
right-padded batches whose real tokens are not the pad id, which is how this project encodes CoLA.

Command line: `lora-kd-jax {export-peft,import-peft,merge} ...` (also `python -m lora_kd_jax.export ...`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from lora_kd_jax import convert, runs
from lora_kd_jax.config import DEFAULT_LORA_TARGETS, Config, ConfigError, validate
from lora_kd_jax.convert import PEFT_PREFIX, TRANSFORMER_PREFIX, ConversionError
from lora_kd_jax.errors import UserError
from lora_kd_jax.keys import run_keys

log = logging.getLogger(__name__)

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
HF_CONFIG = "config.json"
FLAX_WEIGHTS = "flax_model.msgpack"
TORCH_WEIGHTS = "model.safetensors"
PAD_TOKEN_ID = 50256
# What PEFT writes for task_type SEQ_CLS with modules_to_save=["ln_1", "ln_2", "ln_f"]: it appends its classifier names.
MODULES_TO_SAVE = ["ln_1", "ln_2", "ln_f", "classifier", "score"]
_PEFT_CLASSIFIER_NAMES = ("classifier", "score")
_CONV_SUFFIXES = tuple(DEFAULT_LORA_TARGETS)  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_CONV_MODULE = re.compile(r"^transformer\.h\.(?P<layer>\d+)\."
                          r"(?P<suffix>attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$")
_LN_KEY = re.compile(r"^transformer\.(?:h\.\d+\.ln_[12]|ln_f)\.(?:weight|bias)$")
_SCORE_KEY = "score.weight"


class ExportError(UserError, ValueError):
    """An input cannot be exported / imported / merged as asked; the message names what is missing or mismatched."""
    label = "export error"


# ------------------------------------------------------------------------------------------- small helpers


def _n_layer(base: Params) -> int:
    return len(base["h"])


def _conv_modules(n_layer: int) -> list[str]:
    """GPT2ForSequenceClassification names of every Conv1D (what PEFT's target_modules are matched against)."""
    return [f"transformer.h.{i}.{s}" for i in range(n_layer) for s in _CONV_SUFFIXES]


def _save_safetensors(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    # "format": "pt" is what transformers / PEFT write for PyTorch weights (transformers' Flax loader reads it too)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, os.fspath(path),
              metadata={"format": "pt"})


def _check_out_dir(out_dir: Path, files: Sequence[str], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    clash = [f for f in files if (out_dir / f).exists()]
    if clash and not overwrite:
        raise ExportError(f"{out_dir} already holds {', '.join(clash)}; choose another directory or pass --overwrite")


def _layer_norms(base: Params) -> Params:
    """The LayerNorm subtree of a flax GPT-2 base: {'h': {i: {'ln_1', 'ln_2'}}, 'ln_f'}."""
    flat = convert.flatten(base)
    return convert.unflatten({p: v for p, v in flat.items() if any(s.startswith("ln_") for s in p)})


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------------------------------- export


def peft_target_modules(paths: Sequence[tuple[str, ...]], n_layer: int) -> list[str]:
    """PEFT's target_modules for our adapted module paths: the short names (`c_attn`, `c_proj`, `c_fc`) when every
    GPT-2 Conv1D of those names is adapted (the usual config), otherwise the full module names, which PEFT matches
    exactly."""
    chosen = {"transformer." + ".".join(p) for p in paths}
    names = sorted({p[-1] for p in paths})
    covered = {m for m in _conv_modules(n_layer) if m.rsplit(".", 1)[-1] in names}
    if covered == chosen:
        return names
    return sorted(chosen, key=lambda m: convert._sorted_keys([m])[0])


def peft_lora_alpha(cfg: Config, spec: Any) -> int | float:
    """lora_alpha such that PEFT's scaling lora_alpha / r equals our scale exactly: r for `seed` (scale 1),
    lora.alpha for `standard` (scale alpha / rank)."""
    if spec.init == "seed":
        if spec.scale != 1.0:
            raise ExportError(f"seed-init LoRA with scale {spec.scale}: expected 1")
        return spec.rank
    alpha = cfg.lora.alpha
    if alpha / spec.rank != spec.scale:
        raise ExportError(f"lora.alpha {alpha} / lora.rank {spec.rank} != the model's LoRA scale {spec.scale}")
    return _number(alpha)


def peft_adapter_config(cfg: Config, spec: Any, n_layer: int, base_model: str | None) -> dict:
    """adapter_config.json for PEFT's LoraConfig (the fields PEFT 0.21 writes that matter here, at its values)."""
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": spec.rank,
        "lora_alpha": peft_lora_alpha(cfg, spec),
        "lora_dropout": float(spec.dropout),
        "target_modules": peft_target_modules(spec.paths, n_layer),
        "exclude_modules": None,
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": list(MODULES_TO_SAVE),
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
    }


def peft_state_dict(params: Params) -> StateDict:
    """LoRA factors, every LayerNorm and the head under the keys PEFT's `save_pretrained` writes for a
    GPT2ForSequenceClassification (`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`,
    `base_model.model.transformer.h.0.ln_1.weight`, `base_model.model.score.weight`)."""
    if "lora" not in params:
        raise ExportError("params hold no LoRA factors ('lora' subtree)")
    out = convert.flax_lora_to_peft(params["lora"], prefix=PEFT_PREFIX + TRANSFORMER_PREFIX)
    out.update(convert.flax_gpt2_to_torch(_layer_norms(params["gpt2"]), prefix=PEFT_PREFIX + TRANSFORMER_PREFIX,
                                          allow_missing=True))
    out.update(convert.flax_head_to_torch(params["head"], key=PEFT_PREFIX + _SCORE_KEY))
    return out


def _default_base_model(cfg: Config) -> str | None:
    if cfg.model.init != "pretrained":
        return None
    return os.fspath(Path(cfg.model.path).absolute()) if cfg.model.path else cfg.model.name


def original_base(cfg: Config, params: Params) -> Params:
    """The frozen base as the run loaded it, with its own (untrained) LayerNorms: rebuilt from the config with the
    key `train.build_task` / `build_classifier` use, and checked against the frozen leaves of `params`."""
    from lora_kd_jax.models import gpt2
    from lora_kd_jax.trainable import partition

    _, base = gpt2.load_base(cfg.model, run_keys(cfg.train.seed).classifier.base)
    _, frozen_rebuilt = partition({"gpt2": base})
    _, frozen = partition({"gpt2": params["gpt2"]})
    a, b = convert.flatten(frozen_rebuilt, "/"), convert.flatten(frozen, "/")
    differ = sorted(k for k in a if k not in b or not np.array_equal(np.asarray(a[k]), np.asarray(b[k])))
    if differ or set(a) != set(b):
        raise ExportError(f"the base rebuilt from the run's config differs from the run's frozen weights at "
                          f"{', '.join(differ[:4]) or 'its key set'}")
    return base


def write_peft_adapter(cfg: Config, model: Any, params: Params, out_dir: str | os.PathLike, *,
                       base_model: str | None = None, save_base: bool = False, overwrite: bool = False) -> Path:
    """Write (cfg, model, params) as a PEFT adapter dir. `base_model` goes into base_model_name_or_path (default:
    the run's model.path, absolute, or its hub name). `save_base` also writes the frozen base as a plain
    Hugging Face checkpoint in OUT_DIR/base and points base_model_name_or_path at it (for random-init bases)."""
    if model.spec is None or "lora" not in params:
        raise ExportError("the model has no LoRA adapters to export")
    out = Path(out_dir)
    _check_out_dir(out, [ADAPTER_CONFIG, ADAPTER_WEIGHTS] + (["base"] if save_base else []), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if save_base:
        base_dir = out / "base"
        base_dir.mkdir(exist_ok=True)
        _save_hf_checkpoint(model.module.config, {"gpt2": original_base(cfg, params)}, base_dir)
        base_model = os.fspath(base_dir.absolute())
    elif base_model is None:
        base_model = _default_base_model(cfg)
        if base_model is None:
            raise ExportError("the run's base is a random init (model.init=random), which PEFT cannot rebuild: "
                              "pass --save-base to write it beside the adapter, --base-model NAME_OR_DIR naming a "
                              "copy of it, or use `merge` for a self-contained checkpoint")
    config = peft_adapter_config(cfg, model.spec, _n_layer(params["gpt2"]), base_model)
    _save_safetensors(peft_state_dict(params), out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("wrote PEFT adapter (r=%d, lora_alpha=%s, %d adapted layers) to %s", model.spec.rank,
             config["lora_alpha"], len(model.spec.paths), out)
    return out


def export_peft(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, which: str = "best",
                base_model: str | None = None, save_base: bool = False, overwrite: bool = False) -> Path:
    """A LoRA run's `which` checkpoint (best | latest) -> a PEFT adapter directory."""
    # cheap checks first: the run (no weights) and the output dir
    info = runs.inspect_run(run_dir, kind="lora", which=which)
    if info.config.model.init == "random" and base_model is None and not save_base:
        raise ExportError(f"{run_dir}: the run's base is a random init (model.init=random), which PEFT cannot "
                          "rebuild: pass --save-base to write it beside the adapter, --base-model NAME_OR_DIR naming "
                          "a copy of it, or use `merge` for a self-contained checkpoint")
    _check_out_dir(Path(out_dir), [ADAPTER_CONFIG, ADAPTER_WEIGHTS], overwrite)
    run = runs.open_run(run_dir, kind="lora", which=which)
    return write_peft_adapter(run.config, run.model, run.params, out_dir, base_model=base_model, save_base=save_base,
                              overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- import


def read_peft_adapter(peft_dir: str | os.PathLike) -> tuple[dict, StateDict]:
    """(adapter_config.json, weights as numpy) of a PEFT adapter dir (safetensors; .bin needs torch)."""
    d = Path(peft_dir)
    if not d.is_dir():
        raise ExportError(f"{d}: no such directory (expected a PEFT adapter dir with {ADAPTER_CONFIG} and "
                          f"{ADAPTER_WEIGHTS})")
    cfg_path = d / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise ExportError(f"{d} is not a PEFT adapter dir: missing {ADAPTER_CONFIG}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ExportError(f"{cfg_path}: expected a JSON object")
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


def _check_adapter_config(config: dict, where: str) -> None:
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
    unsupported = {"use_dora": False, "lora_bias": False, "bias": "none"}
    for key, want in unsupported.items():
        if config.get(key, want) != want:
            raise bad(f"{key}={config[key]!r} is not supported (this project's LoRA layer is x @ A^T @ B^T * "
                      f"scaling with {key}={want!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise bad(f"another rank layout: {key}={config[key]} gives some layers their own rank or alpha; this "
                      f"project holds one rank and one scale for all adapted layers (r={config['r']}, "
                      f"lora_alpha={config['lora_alpha']})")
    if config.get("layer_replication"):
        raise bad(f"layer_replication={config['layer_replication']} is not supported")


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
        for ln in (("ln_1", "ln_2") if i is not None else ("ln_f",)):
            module = f"transformer.h.{i}.{ln}" if i is not None else f"transformer.{ln}"
            if any(module.endswith(n) for n in names):  # PEFT's rule for modules_to_save: plain suffix
                keys |= {module + ".weight", module + ".bias"}
    keys.add(_SCORE_KEY)
    return keys


def base_dims(cfg: Config) -> tuple[int, int, int]:
    """(n_layer, n_embd, n_inner) of the base `cfg.model` names, from its config alone (no weights are read)."""
    from lora_kd_jax.config import resolved_size

    if cfg.model.init != "pretrained":
        n_layer, n_embd, _ = resolved_size(cfg.model)
        return n_layer, n_embd, 4 * n_embd
    from transformers import GPT2Config

    c = GPT2Config.from_pretrained(cfg.model.path or cfg.model.name)
    return int(c.n_layer), int(c.n_embd), int(c.n_inner or 4 * c.n_embd)


def _check_dims(lora: StateDict, norms: StateDict, score: np.ndarray, dims: tuple[int, int, int], base: str,
                where: str) -> None:
    """Every adapter tensor against the base's depth and widths, before any weight is loaded."""
    n_layer, e, inner = dims
    in_out = {"attn.c_attn": (e, 3 * e), "attn.c_proj": (e, e), "mlp.c_fc": (e, inner), "mlp.c_proj": (inner, e)}
    problems, beyond = [], set()
    for key, v in lora.items():
        m = _CONV_MODULE.match(_LORA_KEY.match(key[len(PEFT_PREFIX):]).group("module"))
        if int(m.group("layer")) >= n_layer:
            beyond.add(key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0])
            continue
        d_in, d_out = in_out[m.group("suffix")]
        got_in_out = v.shape[1] if ".lora_A." in key else v.shape[0]
        want = d_in if ".lora_A." in key else d_out
        if v.ndim != 2 or got_in_out != want:
            problems.append(f"{key}: shape {tuple(v.shape)}, the base wants "
                            f"{'(r, ' + str(d_in) + ')' if '.lora_A.' in key else '(' + str(d_out) + ', r)'}")
    if beyond:
        raise ExportError(f"{where}: another architecture: LoRA on {', '.join(convert._sorted_keys(beyond)[:4])}, but "
                          f"the base ({base}) has {n_layer} layers")
    for k, v in norms.items():
        layer = int(k.split(".")[2]) if k.startswith("transformer.h.") else -1
        if layer >= n_layer:
            problems.append(f"{PEFT_PREFIX}{k}: layer beyond the base's {n_layer}")
        elif tuple(v.shape) != (e,):
            problems.append(f"{PEFT_PREFIX}{k}: shape {tuple(v.shape)}, the base wants ({e},)")
    if score.ndim != 2 or tuple(score.shape) != (2, e):
        problems.append(f"{PEFT_PREFIX}{_SCORE_KEY}: shape {tuple(score.shape)}, the base wants (2, {e}) "
                        "(n_labels, n_embd)")
    if problems:
        raise ExportError(f"{where}: another architecture: shapes do not fit the base ({base}: {n_layer} layers, "
                          f"width {e}, MLP width {inner}): " + "; ".join(sorted(problems)[:8])
                          + (f" and {len(problems) - 8} more" if len(problems) > 8 else ""))


def _lora_targets_for(modules: set[str], n_layer: int) -> list[str]:
    """lora.targets naming exactly `modules` (GPT2ForSequenceClassification names): a suffix like `attn.c_attn`
    where every layer has it, else the explicit `h.{i}.attn.c_attn` paths."""
    inner = {m[len(TRANSFORMER_PREFIX):] for m in modules}
    targets = []
    for s in _CONV_SUFFIXES:
        have = sorted((p for p in inner if p.endswith("." + s)), key=lambda p: int(p.split(".")[1]))
        if len(have) == n_layer:
            targets.append(s)
        else:
            targets.extend(have)
    return targets


def _split_adapter_weights(config: dict, weights: StateDict, where: str) -> tuple[StateDict, StateDict, np.ndarray]:
    """(lora keys, LayerNorm keys, score.weight) with `base_model.model.` stripped; anything else is an error."""
    stray = [k for k in weights if not k.startswith(PEFT_PREFIX)]
    if stray:
        raise ExportError(f"{where}: keys without PEFT's '{PEFT_PREFIX}' prefix: {', '.join(sorted(stray)[:8])}")
    lora, norms, unexpected, score = {}, {}, [], None
    for key, v in weights.items():
        k = key[len(PEFT_PREFIX):]
        m = _LORA_KEY.match(k)
        if m and _CONV_MODULE.match(m.group("module")):
            lora[key] = v
        elif _LN_KEY.match(k):
            norms[k] = v
        elif k == _SCORE_KEY:
            score = v
        else:
            unexpected.append(key)
    if unexpected:
        hint = (" (LoRA on modules that are not GPT-2's attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)"
                if any(_LORA_KEY.match(k[len(PEFT_PREFIX):]) for k in unexpected) else "")
        raise ExportError(f"{where}: not a LoRA adapter for GPT2ForSequenceClassification{hint}: unexpected keys: "
                          f"{', '.join(convert._sorted_keys(unexpected)[:12])}"
                          f"{f' and {len(unexpected) - 12} more' if len(unexpected) > 12 else ''} "
                          f"(base_model_name_or_path: {config.get('base_model_name_or_path')!r})")
    if not lora:
        raise ExportError(f"{where}: no LoRA weights (missing keys like {PEFT_PREFIX}transformer.h.0.attn.c_attn."
                          "lora_A.weight)")
    if score is None:
        raise ExportError(f"{where}: missing keys: {PEFT_PREFIX}{_SCORE_KEY} (the classification head; PEFT saves "
                          "it for task_type SEQ_CLS)")
    return lora, norms, score


def lora_settings_from_adapter(config: dict, lora: StateDict, where: str) -> dict:
    """lora.* values that reproduce the adapter: rank r, alpha with alpha/rank = PEFT's scaling, dropout, targets."""
    r = config["r"]
    ranks = {}
    for key, v in lora.items():
        m = _LORA_KEY.match(key[len(PEFT_PREFIX):])
        ranks[f"{m.group('module')}.lora_{m.group('which')}"] = v.shape[0] if m.group("which") == "A" else v.shape[-1]
    off = {k: n for k, n in ranks.items() if n != r}
    if off:
        raise ExportError(f"{where}: another rank layout: adapter_config.json says r={r} but "
                          + ", ".join(f"{k} has rank {n}" for k, n in sorted(off.items())[:8]))
    alpha = float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return {"rank": int(r), "alpha": alpha if not config.get("use_rslora") else scaling * r,
            "dropout": float(config.get("lora_dropout") or 0.0), "init": "standard"}


def import_peft(peft_dir: str | os.PathLike, cfg: Config) -> tuple[Config, Any, Params]:
    """A PEFT LoRA adapter dir (for GPT2ForSequenceClassification) on the base `cfg.model` names ->
    (config with the adapter's lora.* settings, model, params {'gpt2', 'lora', 'head'}).

    LayerNorms the adapter saved (modules_to_save) replace the base's; the others stay as loaded. Fails with an
    ExportError / ConversionError naming what is missing or mismatched: another architecture (keys that are not
    GPT-2's), another rank layout (rank_pattern, alpha_pattern, factors of other ranks), keys that the adapter's
    own config promises but the weights lack, shapes that do not fit the base."""
    from lora_kd_jax.models.classifier import build_classifier

    where = f"PEFT adapter {peft_dir}"
    config, weights = read_peft_adapter(peft_dir)
    _check_adapter_config(config, where)
    lora_sd, norms, score = _split_adapter_weights(config, weights, where)
    settings = lora_settings_from_adapter(config, lora_sd, where)
    modules = {m.group("module") for k in lora_sd if (m := _LORA_KEY.match(k[len(PEFT_PREFIX):]))}
    half = [f"{PEFT_PREFIX}{m}.lora_{w}.weight" for m in modules for w in "AB"
            if f"{PEFT_PREFIX}{m}.lora_{w}.weight" not in lora_sd]
    if half:
        raise ExportError(f"{where}: missing keys: {', '.join(convert._sorted_keys(half))}")
    if cfg.model.init != "pretrained":
        log.warning("import-peft: model.init=%s: the adapter is applied to a random base, not the one it was "
                    "trained on", cfg.model.init)
    base_name = config.get("base_model_name_or_path")
    if base_name and base_name not in (cfg.model.name, cfg.model.path, _default_base_model(cfg)):
        log.warning("import-peft: the adapter was trained on %r; applying it to the base the config names (%s)",
                    base_name, cfg.model.path or cfg.model.name)
    dims = base_dims(cfg)
    n_layer = dims[0]
    _check_dims(lora_sd, norms, score, dims, cfg.model.path or cfg.model.name, where)
    missing = [f"{PEFT_PREFIX}{m}.lora_{w}.weight" for m in _peft_targets(config, n_layer) - modules for w in "AB"]
    missing += [PEFT_PREFIX + k for k in _modules_to_save_keys(config, n_layer) - set(norms) - {_SCORE_KEY}]
    if missing:
        raise ExportError(f"{where}: missing keys (adapter_config.json's target_modules / modules_to_save promise "
                          f"them): {', '.join(convert._sorted_keys(missing)[:12])}"
                          f"{f' and {len(missing) - 12} more' if len(missing) > 12 else ''}")
    new_lora = dataclasses.replace(cfg.lora, targets=_lora_targets_for(modules, n_layer), **settings)
    changed = {f"lora.{k}": v for k, v in dataclasses.asdict(new_lora).items() if getattr(cfg.lora, k) != v}
    if changed:
        log.info("import-peft: LoRA settings from the adapter: %s", ", ".join(f"{k}={v}" for k, v in changed.items()))
    cfg = dataclasses.replace(cfg, lora=new_lora)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ExportError(f"{where}: its settings do not make a valid config: {e}") from None
    model, params = build_classifier(cfg, run_keys(cfg.train.seed).model)
    params["lora"] = convert.peft_lora_to_flax(lora_sd, spec=model.spec)
    if norms:
        trained = convert.torch_gpt2_to_flax(norms, allow_missing=True)
        flat = dict(convert.flatten(params["gpt2"]))
        for path, v in convert.flatten(trained).items():
            if tuple(v.shape) != tuple(flat[path].shape):
                raise ConversionError(f"{where}: {TRANSFORMER_PREFIX}{convert._torch_key(path)[0]}: shape "
                                      f"{tuple(v.shape)}, the base has {tuple(flat[path].shape)}")
            flat[path] = jax.numpy.asarray(v)
        params["gpt2"] = convert.unflatten(flat)
    head = convert.torch_head_to_flax(score)
    want = tuple(params["head"]["kernel"].shape)
    if tuple(head["kernel"].shape) != want:
        raise ConversionError(f"{where}: {PEFT_PREFIX}{_SCORE_KEY}: shape {tuple(score.shape)}, expected "
                              f"{(want[1], want[0])} (n_labels, n_embd)")
    params["head"] = {"kernel": jax.numpy.asarray(head["kernel"])}
    params["lora"] = jax.tree.map(jax.numpy.asarray, params["lora"])
    return cfg, model, params


def write_imported_run(cfg: Config, params: Params, run_dir: str | os.PathLike,
                       source: str | os.PathLike | None = None) -> Path:
    """A run dir holding `params` as checkpoint step 0 (epoch 0, no history) plus its config.yaml, so that
    `lora-kd-jax train-lora RUN/config.yaml --resume` trains on from the imported weights, and
    `runs.open_run(RUN, which="latest")` / `lora-kd-jax merge RUN OUT --which latest` read them."""
    from lora_kd_jax import metrics as metrics_lib
    from lora_kd_jax import rundir
    from lora_kd_jax.checkpoint import CheckpointStore
    from lora_kd_jax.steps import init_state
    from lora_kd_jax.trainable import make_optimizer, partition

    run = Path(run_dir)
    ckpt = run / "checkpoints"
    if ckpt.exists() and any(ckpt.rglob("*")):
        raise ExportError(f"{run} already holds checkpoints; choose a new --out directory")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=os.fspath(run_dir)))
    rundir.prepare(cfg)
    trainable, _ = partition(params)
    state = init_state(trainable, make_optimizer(cfg.train.lr), run_keys(cfg.train.seed).dropout)
    store = CheckpointStore(ckpt)
    try:
        store.save(0, {"state": state, "train_sums": metrics_lib.zeros()},
                   {"kind": "lora", "epoch": 0, "next_batch": 0, "history": [], "wall_time_s": 0.0,
                    "imported_from": os.fspath(source) if source is not None else None})
    finally:
        store.close()
    log.info("wrote imported run to %s (checkpoints/latest step 0): continue with scripts/train_lora.py "
             "%s --resume", run, run / rundir.CONFIG_FILE)
    return run


# ----------------------------------------------------------------------------------------------- merge


def _hf_config(module_config: Any, n_labels: int) -> Any:
    from transformers import GPT2Config

    c = GPT2Config.from_dict(module_config.to_dict())
    c.architectures = ["GPT2ForSequenceClassification"]
    c.num_labels = n_labels
    c.pad_token_id = PAD_TOKEN_ID
    return c


def _save_hf_checkpoint(module_config: Any, params: Params, out_dir: Path) -> None:
    """config.json + flax_model.msgpack (FlaxGPT2Model's tree) + model.safetensors (PyTorch names: `transformer.*`
    and, with a head, `score.weight`)."""
    from flax import serialization

    head = params.get("head")
    n_labels = int(head["kernel"].shape[1]) if head is not None else 2
    base = jax.tree.map(lambda x: np.asarray(x, np.float32), params["gpt2"])
    _hf_config(module_config, n_labels).save_pretrained(os.fspath(out_dir))
    (out_dir / FLAX_WEIGHTS).write_bytes(serialization.to_bytes(base))
    torch_sd = convert.flax_gpt2_to_torch(base, prefix=TRANSFORMER_PREFIX)
    if head is not None:
        torch_sd.update(convert.flax_head_to_torch(head))
    _save_safetensors(torch_sd, out_dir / TORCH_WEIGHTS)


def save_merged(model: Any, params: Params, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fold the LoRA factors into the kernels and write a plain Hugging Face checkpoint (see the module doc)."""
    out = Path(out_dir)
    _check_out_dir(out, [HF_CONFIG, FLAX_WEIGHTS, TORCH_WEIGHTS], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    merged = model.merged(params)
    _save_hf_checkpoint(model.module.config, merged, out)
    log.info("wrote merged GPT-2 checkpoint (Flax msgpack, PyTorch safetensors with the head) to %s", out)
    return out


def merge_and_save(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, which: str = "best",
                   overwrite: bool = False) -> Path:
    """A LoRA run's `which` checkpoint -> merged plain checkpoint in out_dir."""
    runs.inspect_run(run_dir, kind="lora", which=which)
    _check_out_dir(Path(out_dir), [HF_CONFIG, FLAX_WEIGHTS, TORCH_WEIGHTS], overwrite)
    run = runs.open_run(run_dir, kind="lora", which=which)
    return save_merged(run.model, run.params, out_dir, overwrite=overwrite)


if __name__ == "__main__":  # `python -m lora_kd_jax.export export-peft|import-peft|merge ...`
    from lora_kd_jax.cli import main

    main()
