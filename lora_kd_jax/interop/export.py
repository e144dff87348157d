"""The three interoperability operations with PyTorch, for every family: PEFT adapters out and in, merged
checkpoints for deployment.

export-peft  a trained LoRA run -> a PEFT LoRA adapter dir for the family's *ForSequenceClassification, loadable
             with `peft.PeftModel.from_pretrained` (the format: `interop.peft`), the run's tokenizer beside it.
import-peft  a PEFT adapter dir (written by PEFT) -> our parameter tree on the base the config names, and optionally
             a run dir holding it as checkpoint step 0, from which `lora-kd-jax train-lora RUN/config.yaml --resume`
             continues training. The adapter decides the LoRA settings.
merge        a trained LoRA run -> a plain Hugging Face checkpoint with the adapters folded into the kernels:
             config.json (the run's labels and pad id), model.safetensors (PyTorch names, head included) and the
             tokenizer files; transformers 5 loads it with no file of this library.

The classifiers pool as PyTorch's do, on right-padded batches whose real tokens are not the pad id (how this library
encodes every split).
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

from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.core.config import Config, ConfigError, n_outputs, validate
from lora_kd_jax.core.keys import classifier_base_key, run_keys
from lora_kd_jax.interop import files, peft, peft_fit
from lora_kd_jax.interop.files import HF_CONFIG, TORCH_WEIGHTS
from lora_kd_jax.interop.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExportError
from lora_kd_jax.lora.decompose import decompose
from lora_kd_jax.models import hf_names
from lora_kd_jax.models.resolve import resolve
from lora_kd_jax.models.build import build_classifier, hf_config
from lora_kd_jax.models.families import FAMILIES
from lora_kd_jax.runs import reader as runs
from lora_kd_jax.runs import rundir
from lora_kd_jax.runs.checkpoint import CheckpointStore
from lora_kd_jax.training.restore import open_run
from lora_kd_jax.training.state import train_state

log = logging.getLogger(__name__)
Params = dict[str, Any]
MERGE_FILES = [HF_CONFIG, TORCH_WEIGHTS]


def default_base_model(cfg: Config) -> str | None:
    """base_model_name_or_path of a run's adapter: its model.path (absolute) or hub name; None for a random base."""
    if cfg.model.init != "pretrained":
        return None
    return os.fspath(Path(cfg.model.path).absolute()) if cfg.model.path else cfg.model.name


RANDOM_BASE = ("the run's base is a random init (model.init=random), which PEFT cannot rebuild: pass --save-base to "
               "write it beside the adapter, --base-model NAME_OR_DIR naming a copy of it, or use `merge` for a "
               "self-contained checkpoint")


def original_base(cfg: Config, model: Any) -> Params:
    """The base as the run loaded it (untrained: the modules it trained in full travel in the adapter): the one the
    model holds, or for PiSSA / OLoRA, which hold the residual, the base rebuilt from the config with the run's base
    key (PEFT's converted form applies to the original), checked to give the held residual again."""
    if model.base is None:
        raise ExportError("--save-base: the model holds no base weights")
    if model.start is None:
        return model.base
    plain, _ = build_classifier(cfg, classifier_base_key(cfg), base_key=classifier_base_key(cfg), with_lora=False)
    residual = hf_names.flatten(decompose(plain.base, model.spec, model.as_computed)[0])
    held = hf_names.flatten(model.base)
    differ = [p for p, v in held.items() if not np.array_equal(np.asarray(residual[p]), np.asarray(v))]
    if differ:
        raise ExportError(f"the base rebuilt from the run's config differs from the run's frozen weights at "
                          f"{', '.join('/'.join(p) for p in differ[:4])}")
    return plain.base


def save_checkpoint(cfg: Config, model: Any, params: Params, out_dir: Path) -> None:
    """config.json + model.safetensors (the family's *ForSequenceClassification keys, head included) of
    {prefix: base, 'head': ...}."""
    fam = model.family
    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_config(hf_config(cfg), fam, out_dir, pad_token_id=model.pad_id)
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    sd = hf_names.base_to_torch(fam, host[fam.prefix])
    sd.update(hf_names.head_to_torch(fam, host["head"]))
    files.save_safetensors(sd, out_dir / TORCH_WEIGHTS)


def write_peft_adapter(cfg: Config, model: Any, params: Params, out_dir: str | os.PathLike, *,
                       base_model: str | None = None, save_base: bool = False, overwrite: bool = False) -> Path:
    """Write (cfg, model, params) as a PEFT adapter dir. `base_model` goes into base_model_name_or_path (default: the
    run's model.path, absolute, or its hub name). `save_base` also writes the frozen base as a plain Hugging Face
    checkpoint in OUT_DIR/base and points base_model_name_or_path at it (for random-init bases)."""
    if model.spec is None or "lora" not in params:
        raise ExportError("the model has no LoRA adapters to export")
    out = Path(out_dir)
    files.check_out_dir(out, [ADAPTER_CONFIG, ADAPTER_WEIGHTS] + (["base"] if save_base else []), overwrite)
    if save_base:
        save_checkpoint(cfg, model, {model.family.prefix: original_base(cfg, model), "head": params["head"]},
                        out / "base")
        base_model = os.fspath((out / "base").absolute())
    elif base_model is None:
        base_model = default_base_model(cfg)
        if base_model is None:
            raise ExportError(RANDOM_BASE)
    out.mkdir(parents=True, exist_ok=True)
    config = peft.adapter_config(cfg.lora, model, base_model)
    files.save_safetensors(peft.adapter_state_dict(model, params), out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("wrote PEFT adapter (%s, r=%d, lora_alpha=%s, %d adapted layers) to %s", model.family.torch_class,
             config["r"], config["lora_alpha"], len(model.spec.paths), out)
    return out


def export_peft(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, which: str = "best",
                base_model: str | None = None, save_base: bool = False, overwrite: bool = False) -> Path:
    """A LoRA run's `which` checkpoint (best | latest) -> a PEFT adapter directory, the run's tokenizer beside it."""
    info = runs.inspect_run(run_dir, kind="lora", which=which)  # cheap checks first: the run, the output dir
    if info.config.model.init == "random" and base_model is None and not save_base:
        raise ExportError(f"{run_dir}: {RANDOM_BASE}")
    files.check_out_dir(Path(out_dir), [ADAPTER_CONFIG, ADAPTER_WEIGHTS], overwrite)
    run = open_run(info, kind="lora", which=which)
    out = write_peft_adapter(run.config, run.model, run.params, out_dir, base_model=base_model, save_base=save_base,
                             overwrite=overwrite)
    files.add_run_files(out, run.config)  # the tokenizer beside the adapter
    if save_base:
        files.add_run_files(out / "base", run.config)  # the base's config.json: the run's head and label names
    return out


def import_peft(peft_dir: str | os.PathLike, cfg: Config) -> tuple[Config, Any, Params]:
    """A PEFT LoRA adapter dir for the family's *ForSequenceClassification, on the base `cfg.model` names ->
    (config with the adapter's lora.* settings, model, params). The modules the adapter trained in full (LayerNorms,
    modules_to_save) replace the base's; the others stay as loaded. Fails naming what is missing or mismatched:
    another architecture, another rank layout, keys that the adapter's own config promises but the weights lack."""
    if cfg.train.seeds:
        raise ExportError(f"import-peft writes one run from one adapter; drop train.seeds={cfg.train.seeds} (set "
                          "train.seed) and train seeds from it one run at a time")
    cfg = resolve(cfg)
    fam = FAMILIES[cfg.model.type]
    adapter = peft.read_adapter(peft_dir, fam)
    if cfg.model.init != "pretrained":
        log.warning("import-peft: model.init=%s: the adapter is applied to a random base, not the one it was trained "
                    "on", cfg.model.init)
    base_name = adapter.config.get("base_model_name_or_path")
    if base_name and base_name not in (cfg.model.name, cfg.model.path, default_base_model(cfg)):
        log.warning("import-peft: the adapter was trained on %r; applying it to the base the config names (%s)",
                    base_name, cfg.model.path or cfg.model.name)
    shape_model, shapes = build_classifier(cfg, run_keys(cfg.train.seed).model, with_lora=False, shapes_only=True)
    a = shape_model.arch
    describe = f"{cfg.model.path or cfg.model.name}: {a.num_layers} layers, width {a.hidden_size}, MLP width " \
               f"{a.intermediate_size}"
    peft_fit.check_fits(adapter, fam, shapes[fam.prefix], shapes["head"], describe)
    linear = [".".join(k[:-1]) for k, v in hf_names.flatten(shapes[fam.prefix]).items()
              if k[-1] == "kernel" and len(v.shape) == 2]
    new_lora = dataclasses.replace(cfg.lora, targets=peft_fit.lora_targets(adapter, linear, fam),
                                   modules_to_save=peft_fit.modules_to_save(adapter, fam), **adapter.settings)
    changed = {f"lora.{k}": v for k, v in dataclasses.asdict(new_lora).items() if getattr(cfg.lora, k) != v}
    if changed:
        log.info("import-peft: LoRA settings from the adapter: %s", ", ".join(f"{k}={v}" for k, v in changed.items()))
    cfg = dataclasses.replace(cfg, lora=new_lora)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ExportError(f"{adapter.where}: its settings do not make a valid config: {e}") from None
    model, params = build_classifier(cfg, run_keys(cfg.train.seed).model, base_key=classifier_base_key(cfg))
    return cfg, model, jax.tree.map(jax.numpy.asarray, peft_fit.adapter_params(adapter, model, params))


def write_imported_run(cfg: Config, model: Any, params: Params, run_dir: str | os.PathLike,
                       source: str | os.PathLike | None = None) -> Path:
    """A run dir holding `params` as checkpoint step 0 (epoch 0, no history) plus its config.yaml, so that
    `lora-kd-jax train-lora RUN/config.yaml --resume` trains on from the imported weights, and
    `open_run(RUN, which="latest")` / `lora-kd-jax merge RUN OUT --which latest` read them."""
    run = Path(run_dir)
    ckpt = run / "checkpoints"
    if ckpt.exists() and any(ckpt.rglob("*")):
        raise ExportError(f"{run} already holds checkpoints; choose a new --out directory")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=os.fspath(run_dir)))
    rundir.prepare(cfg)
    state = train_state(model, params, cfg.train, run_keys(cfg.train.seed).dropout).state
    store = CheckpointStore(ckpt)
    try:
        store.save(0, {"state": state, "train_sums": metrics_lib.zeros(n_outputs(cfg))},
                   {"kind": "lora", "epoch": 0, "next_batch": 0, "history": [], "wall_time_s": 0.0,
                    "imported_from": os.fspath(source) if source is not None else None})
    finally:
        store.close()
    log.info("wrote imported run to %s (checkpoints/latest step 0): continue with lora-kd-jax train-lora %s --resume",
             run, run / rundir.CONFIG_FILE)
    return run


def save_merged(cfg: Config, model: Any, params: Params, out_dir: str | os.PathLike, *,
                overwrite: bool = False) -> Path:
    """Fold the LoRA factors into the kernels and write a plain Hugging Face checkpoint (see the module doc)."""
    out = Path(out_dir)
    files.check_out_dir(out, MERGE_FILES, overwrite)
    save_checkpoint(cfg, model, model.merged(params), out)
    log.info("wrote merged %s checkpoint (safetensors with the head) to %s", model.family.torch_class, out)
    return out


def merge_and_save(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, which: str = "best",
                   overwrite: bool = False) -> Path:
    """A LoRA run's `which` checkpoint -> merged plain checkpoint in out_dir, with the run's labels and tokenizer."""
    info = runs.inspect_run(run_dir, kind="lora", which=which)
    files.check_out_dir(Path(out_dir), MERGE_FILES, overwrite)
    run = open_run(info, kind="lora", which=which)
    out = save_merged(run.config, run.model, run.params, out_dir, overwrite=overwrite)
    files.add_run_files(out, run.config)  # label names, problem type, pad id and tokenizer: usable on its own
    return out
