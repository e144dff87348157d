"""export-peft, import-peft and merge for BERT, RoBERTa and Llama: `export` hands these the runs whose model.type is
not GPT-2. The adapter is what PEFT writes for the family's *ForSequenceClassification with
task_type SEQ_CLS (`encoder_format` spells the keys): the factors (fan_in_fan_out false), the head as
modules_to_save (`classifier`, Llama's `score`), and the base modules lora.modules_to_save trained. The merged
checkpoint is config.json + model.safetensors (PyTorch names, head included) + flax_model.msgpack
(Flax*ForSequenceClassification; for Llama, which transformers has no Flax classifier of, FlaxLlamaModel's base).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lora_kd_jax.core.config import Config, ConfigError, validate
from lora_kd_jax.core.errors import read_json_object
from lora_kd_jax.core.families import ENCODERS, Family
from lora_kd_jax.lora import convert, encoder_format, peft_format
from lora_kd_jax.lora.convert import PEFT_PREFIX
from lora_kd_jax.lora.files import check_out_dir, save_safetensors
from lora_kd_jax.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExportError

log = logging.getLogger(__name__)
Params = dict[str, Any]


def target_modules(model: Any) -> list[str]:
    """PEFT's target_modules: the short names (`query`) when every module of those names is adapted, else the
    full module names (PEFT matches those exactly)."""
    family, paths = model.family, model.spec.paths
    base = model.base if model.base is not None else {}
    names = sorted({p[-1] for p in paths})
    every = {k[:-1] for k in convert.flatten(base) if k[-1] == "kernel" and k[-2] in names}
    if every == set(paths):
        return names
    return encoder_format.module_names(sorted(paths), family)


def _saved_modules(model: Any, base: Params) -> Params:
    """The base leaves lora.modules_to_save trains (a subtree that keeps its paths)."""
    flat = convert.flatten(base)
    return convert.unflatten({p: v for p, v in flat.items() if model.label_of((model.family.prefix, *p)) != "frozen"})


def adapter_state_dict(model: Any, params: Params) -> dict[str, np.ndarray]:
    """The factors (DoRA magnitudes too; a PiSSA / OLoRA run's in PEFT's converted rank-2r form, as GPT-2's), the
    head and the modules_to_save under PEFT's keys."""
    fam = model.family
    start = getattr(model, "start", None)
    factors = params["lora"] if start is None else peft_format.converted_factors(params["lora"], start)
    out = encoder_format.lora_to_peft(factors, fam)
    out.update(encoder_format.head_to_torch(params["head"], prefix=PEFT_PREFIX))
    out.update(encoder_format.to_torch(_saved_modules(model, params[fam.prefix]), PEFT_PREFIX + fam.prefix + "."))
    return out


def original_base(cfg: Config, model: Any) -> Params:
    """The base as the run loaded it: the held one, or for PiSSA / OLoRA (which hold the residual) the base
    rebuilt from the config with the run's base key (PEFT's converted form applies to the original)."""
    if getattr(model, "start", None) is None:
        return model.base
    from lora_kd_jax.core.keys import classifier_base_key
    from lora_kd_jax.models import families

    plain, _ = families.build(cfg, classifier_base_key(cfg), base_key=classifier_base_key(cfg), with_lora=False)
    return plain.base


def write_adapter(cfg: Config, model: Any, params: Params, out: Path, *, base_model: str | None = None,
                  save_base: bool = False) -> Path:
    """A PEFT adapter for the family's AutoModelForSequenceClassification into `out` (see the module doc);
    `export.write_peft_adapter` calls it once the model has adapters and `out` is free."""
    if save_base:
        if model.base is None:
            raise ExportError("--save-base: the model holds no base weights")
        save_checkpoint(model, {model.family.prefix: original_base(cfg, model), "head": params["head"]},
                        out / "base")
        base_model = os.fspath((out / "base").absolute())
    elif base_model is None:
        if cfg.model.init != "pretrained":
            raise ExportError("the run's base is a random init (model.init=random), which PEFT cannot rebuild: pass "
                              "--save-base, --base-model NAME_OR_DIR, or use `merge`")
        base_model = os.fspath(Path(cfg.model.path).absolute()) if cfg.model.path else cfg.model.name
    config = peft_format.adapter_config(cfg, model.spec, 0, base_model)
    config.update(fan_in_fan_out=False, target_modules=target_modules(model),
                  modules_to_save=[*model.family.head_modules, *model.to_save])
    save_safetensors(adapter_state_dict(model, params), out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("wrote PEFT adapter (%s, r=%d, %d adapted layers) to %s", model.family.torch_class, model.spec.rank,
             len(model.spec.paths), out)
    return out


# ---------------------------------------------------------------------------------------------- import


def _read(peft_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    if not (peft_dir / ADAPTER_CONFIG).is_file():
        raise ExportError(f"{peft_dir} is not a PEFT adapter dir: missing {ADAPTER_CONFIG}")
    if not (peft_dir / ADAPTER_WEIGHTS).is_file():
        raise ExportError(f"{peft_dir} is not a PEFT adapter dir: missing {ADAPTER_WEIGHTS}")
    from safetensors.numpy import load_file

    return read_json_object(peft_dir / ADAPTER_CONFIG, ExportError), load_file(os.fspath(peft_dir / ADAPTER_WEIGHTS))


def _check(config: dict, where: str) -> None:
    wrong = {k: config.get(k) for k, want in (("peft_type", "LORA"), ("task_type", "SEQ_CLS"),
                                              ("fan_in_fan_out", False), ("bias", "none"))
             if config.get(k, want) != want}
    if config.get("init_lora_weights", True) not in (True, False, "gaussian", "pissa"):
        wrong["init_lora_weights"] = config["init_lora_weights"]
    if wrong:
        raise ExportError(f"{where}: not supported here: {', '.join(f'{k}={v!r}' for k, v in wrong.items())} "
                          "(expected a LoRA or DoRA adapter for sequence classification, nn.Linear layout, "
                          "init_lora_weights true, false, gaussian or pissa)")
    for key in ("rank_pattern", "alpha_pattern", "layer_replication"):
        if config.get(key):
            raise ExportError(f"{where}: {key}={config[key]} is not supported (one rank and one scale for all layers)")


def _split(weights: dict[str, np.ndarray], family: Family, where: str) -> tuple[dict, dict, dict]:
    """(lora keys, head keys without the PEFT prefix, base keys of modules_to_save without any prefix)."""
    lora, head, saved, stray = {}, {}, {}, []
    base_prefix = PEFT_PREFIX + family.prefix + "."
    for k, v in weights.items():
        if ".lora_A." in k or ".lora_B." in k or k.endswith("." + convert.PEFT_MAGNITUDE):
            lora[k] = v
        elif k.startswith(PEFT_PREFIX) and encoder_format.is_head_key(k[len(PEFT_PREFIX):]):
            head[k[len(PEFT_PREFIX):]] = v
        elif k.startswith(base_prefix):
            saved[k[len(base_prefix):]] = v
        else:
            stray.append(k)
    if stray or not lora:
        raise ExportError(f"{where}: not a LoRA adapter for {family.torch_class}: "
                          + (f"unexpected keys {', '.join(sorted(stray)[:6])}" if stray else "no lora_A/lora_B keys"))
    return lora, head, saved


def _targets(lora: dict, family: Family, n_layer: int) -> list[str]:
    """lora.targets naming exactly the adapted modules: a short name where every layer has it, else full paths."""
    strip = PEFT_PREFIX + family.prefix + "."
    mods = sorted({k[len(strip):].split(".lora_")[0] for k in lora})
    by_name: dict[str, list[str]] = {}
    for m in mods:
        by_name.setdefault(m.split(".")[-1], []).append(m)
    out = []
    for name, ms in sorted(by_name.items()):
        out += [name] if len(ms) == n_layer else ms
    return out


def import_peft(peft_dir: str | os.PathLike, cfg: Config) -> tuple[Config, Any, Params]:
    """A PEFT adapter for the family's *ForSequenceClassification on the base `cfg.model` names -> (config with the
    adapter's lora.* settings, model, params)."""
    from lora_kd_jax.core.keys import classifier_base_key, run_keys
    from lora_kd_jax.models import families

    d = Path(peft_dir)
    where = f"PEFT adapter {d}"
    family = ENCODERS[cfg.model.type]
    config, weights = _read(d)
    _check(config, where)
    lora, head, saved = _split(weights, family, where)
    settings = peft_format._settings(config, lora, where)  # rank, alpha (rsLoRA folded in), dropout, init
    # PEFT appends its classifier names ("classifier", "score") to every SEQ_CLS adapter's modules_to_save
    to_save = [m for m in (config.get("modules_to_save") or []) if m not in ("classifier", "score")]
    new_lora = dataclasses.replace(cfg.lora, targets=_targets(lora, family, cfg.model.n_layer or 0),
                                   modules_to_save=to_save, **settings)
    cfg = dataclasses.replace(cfg, lora=new_lora)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ExportError(f"{where}: its settings do not make a valid config: {e}") from None
    model, params = families.build(cfg, run_keys(cfg.train.seed).model, base_key=classifier_base_key(cfg))
    out = dict(params)
    out["lora"] = encoder_format.lora_from_peft(lora, family, spec=model.spec)
    out["head"] = encoder_format.head_from_torch(head, params["head"], where)
    if saved:
        trained, extra = encoder_format.from_torch(saved, params[family.prefix], where, allow_missing=True)
        if extra:
            raise ExportError(f"{where}: keys the {family.name} base does not have: {', '.join(sorted(extra)[:6])}")
        flat = dict(convert.flatten(params[family.prefix]))
        flat.update(convert.flatten(trained))
        out[family.prefix] = convert.unflatten(flat)
    return cfg, model, jax.tree.map(jax.numpy.asarray, out)


# ----------------------------------------------------------------------------------------------- merge


def save_checkpoint(model: Any, params: Params, out_dir: str | os.PathLike) -> Path:
    """config.json, model.safetensors (the family's *ForSequenceClassification keys) and flax_model.msgpack
    (Flax*ForSequenceClassification's tree) of {prefix: base, 'head': ...}."""
    from flax import serialization

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fam = model.family
    c = model.module.config.__class__.from_dict(model.module.config.to_dict())
    c.architectures = [fam.torch_class]
    c.num_labels = model.n_labels
    c.save_pretrained(os.fspath(out))
    base = jax.tree.map(lambda x: np.asarray(x, np.float32), params[fam.prefix])
    head = jax.tree.map(lambda x: np.asarray(x, np.float32), params["head"])
    sd = encoder_format.base_to_torch(base, fam)
    sd.update(encoder_format.head_to_torch(head))
    save_safetensors(sd, out / "model.safetensors")
    if fam.name == "llama":  # transformers has no Flax Llama classifier: the base alone, as FlaxLlamaModel's
        flax_tree = base
    else:
        flax_tree = {fam.prefix: base, **head} if "classifier" in head else {fam.prefix: base, "classifier": head}
    (out / "flax_model.msgpack").write_bytes(serialization.to_bytes(flax_tree))
    return out


def save_merged(model: Any, params: Params, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    out = Path(out_dir)
    check_out_dir(out, ["config.json", "model.safetensors", "flax_model.msgpack"], overwrite)
    save_checkpoint(model, model.merged(params), out)
    log.info("wrote merged %s checkpoint (PyTorch safetensors with the head, Flax msgpack) to %s",
             model.family.torch_class, out)
    return out
