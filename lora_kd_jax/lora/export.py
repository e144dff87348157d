"""The three interoperability operations with PyTorch: PEFT adapters out and in, merged checkpoints for deployment.

export-peft  a trained LoRA run -> a PEFT LoRA adapter directory for transformers' GPT2ForSequenceClassification,
             loadable with `peft.PeftModel.from_pretrained` (the format: `peft_format`).
import-peft  a PEFT adapter directory (written by PEFT) -> our parameter tree {'gpt2', 'lora', 'head'} on the base
             the config names, and optionally a run directory holding it as checkpoint step 0, from which
             `lora-kd-jax train-lora RUN/config.yaml --resume` continues training (or
             `runs.open_run(RUN, which="latest")` reads back). The adapter defines the LoRA settings.
merge        a trained LoRA run -> a plain Hugging Face GPT-2 checkpoint with the adapters folded into the kernels:
             `config.json`, `flax_model.msgpack` (FlaxGPT2Model) and `model.safetensors` (PyTorch
             GPT2ForSequenceClassification: `transformer.*` + the head `score.weight`). No file of this project is
             needed to load it.

The classifier pools the hidden state of the last real token; transformers' GPT2ForSequenceClassification pools
the last token that is not `config.pad_token_id` (GPT-2's eos, written into every config here). The two agree on
right-padded batches whose real tokens are not the pad id, which is how this project encodes CoLA.

Command line: `lora-kd-jax {export-peft,import-peft,merge} ...`.
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

from lora_kd_jax.lora import convert
from lora_kd_jax.lora import peft_format
from lora_kd_jax.data import hf_files
from lora_kd_jax.runs import reader as runs
from lora_kd_jax.core.config import Config, ConfigError, n_outputs, validate
from lora_kd_jax.lora.convert import TRANSFORMER_PREFIX
from lora_kd_jax.core.keys import classifier_base_key, run_keys
from lora_kd_jax.core.gpt2_layout import PAD_ID
from lora_kd_jax.lora.files import check_out_dir as _check_out_dir, save_safetensors as _save_safetensors
from lora_kd_jax.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExportError

log = logging.getLogger(__name__)

Params = dict[str, Any]

HF_CONFIG = "config.json"
FLAX_WEIGHTS = "flax_model.msgpack"
TORCH_WEIGHTS = "model.safetensors"


# ---------------------------------------------------------------------------------------------- export


def _default_base_model(cfg: Config) -> str | None:
    if cfg.model.init != "pretrained":
        return None
    return os.fspath(Path(cfg.model.path).absolute()) if cfg.model.path else cfg.model.name


def original_base(cfg: Config, params: Params, spec: Any = None) -> Params:
    """The frozen base as the run loaded it, with its own (untrained) LayerNorms: rebuilt from the config with the
    key `build_classifier` uses for the run, and checked against the frozen leaves of `params` (a PiSSA / OLoRA run's
    hold the residual of the base under the LoRA `spec`; the original is returned)."""
    from lora_kd_jax.lora.decompose import decompose
    from lora_kd_jax.models import gpt2
    from lora_kd_jax.models.classifier import DECOMPOSED, param_labels
    from lora_kd_jax.training.state import partition

    _, base = gpt2.load_base(cfg.model, classifier_base_key(cfg))
    held = decompose(base, spec)[0] if spec is not None and spec.init in DECOMPOSED else base
    _, frozen_rebuilt = partition({"gpt2": held}, param_labels({"gpt2": held}))
    _, frozen = partition({"gpt2": params["gpt2"]}, param_labels({"gpt2": params["gpt2"]}))
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
    if getattr(model, "family", None) is not None:  # BERT, RoBERTa: their own format
        from lora_kd_jax.lora import encoder_interop

        return encoder_interop.write_adapter(cfg, model, params, out, base_model=base_model, save_base=save_base)
    if save_base:
        base_dir = out / "base"
        base_dir.mkdir(exist_ok=True)
        _save_hf_checkpoint(model.module.config, {"gpt2": original_base(cfg, params, model.spec)}, base_dir)
        base_model = os.fspath(base_dir.absolute())
    elif base_model is None:
        base_model = _default_base_model(cfg)
        if base_model is None:
            raise ExportError("the run's base is a random init (model.init=random), which PEFT cannot rebuild: "
                              "pass --save-base to write it beside the adapter, --base-model NAME_OR_DIR naming a "
                              "copy of it, or use `merge` for a self-contained checkpoint")
    config = peft_format.adapter_config(cfg, model.spec, len(params["gpt2"]["h"]), base_model)
    _save_safetensors(peft_format.adapter_state_dict(params, model.start), out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("wrote PEFT adapter (r=%d, lora_alpha=%s, %d adapted layers) to %s", config["r"],
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
    run = runs.open_run(info, kind="lora", which=which)
    out = write_peft_adapter(run.config, run.model, run.params, out_dir, base_model=base_model, save_base=save_base,
                             overwrite=overwrite)
    hf_files.add_run_files(out, run.config)  # the tokenizer beside the adapter
    if save_base:
        hf_files.add_run_files(out / "base", run.config)  # the base's config.json: the run's head and label names
    return out


# ---------------------------------------------------------------------------------------------- import


def base_dims(cfg: Config) -> tuple[int, int, int]:
    """(n_layer, n_embd, n_inner) of the base `cfg.model` names, from its config alone (no weights are read)."""
    from lora_kd_jax.core.config import resolved_size

    if cfg.model.init != "pretrained":
        n_layer, n_embd, _ = resolved_size(cfg.model)
        return n_layer, n_embd, 4 * n_embd
    from transformers import GPT2Config

    c = GPT2Config.from_pretrained(cfg.model.path or cfg.model.name)
    return int(c.n_layer), int(c.n_embd), int(c.n_inner or 4 * c.n_embd)


def import_peft(peft_dir: str | os.PathLike, cfg: Config) -> tuple[Config, Any, Params]:
    """A PEFT LoRA adapter dir (for GPT2ForSequenceClassification) on the base `cfg.model` names ->
    (config with the adapter's lora.* settings, model, params {'gpt2', 'lora', 'head'}).

    LayerNorms the adapter saved (modules_to_save) replace the base's; the others stay as loaded. Fails with an
    ExportError / ConversionError naming what is missing or mismatched: another architecture (keys that are not
    GPT-2's), another rank layout (rank_pattern, alpha_pattern, factors of other ranks), keys that the adapter's
    own config promises but the weights lack, shapes that do not fit the base."""
    from lora_kd_jax.models import families
    from lora_kd_jax.models.classifier import build_classifier

    if cfg.train.seeds:
        raise ExportError(f"import-peft writes one run from one adapter; drop train.seeds={cfg.train.seeds} (set "
                          "train.seed) and train seeds from it one run at a time")
    cfg = families.with_checkpoint(cfg)
    if cfg.model.type != "gpt2":  # BERT, RoBERTa: their own format
        from lora_kd_jax.lora import encoder_interop

        return encoder_interop.import_peft(peft_dir, cfg)
    adapter = peft_format.read_adapter(peft_dir)
    if cfg.model.init != "pretrained":
        log.warning("import-peft: model.init=%s: the adapter is applied to a random base, not the one it was "
                    "trained on", cfg.model.init)
    base_name = adapter.config.get("base_model_name_or_path")
    if base_name and base_name not in (cfg.model.name, cfg.model.path, _default_base_model(cfg)):
        log.warning("import-peft: the adapter was trained on %r; applying it to the base the config names (%s)",
                    base_name, cfg.model.path or cfg.model.name)
    dims = base_dims(cfg)
    peft_format.check_fits(adapter, dims, cfg.model.path or cfg.model.name)
    new_lora = dataclasses.replace(cfg.lora, targets=peft_format.lora_targets(adapter, dims[0]), **adapter.settings)
    changed = {f"lora.{k}": v for k, v in dataclasses.asdict(new_lora).items() if getattr(cfg.lora, k) != v}
    if changed:
        log.info("import-peft: LoRA settings from the adapter: %s", ", ".join(f"{k}={v}" for k, v in changed.items()))
    cfg = dataclasses.replace(cfg, lora=new_lora)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ExportError(f"{adapter.where}: its settings do not make a valid config: {e}") from None
    model, params = build_classifier(cfg, run_keys(cfg.train.seed).model, base_key=classifier_base_key(cfg))
    params = jax.tree.map(jax.numpy.asarray, peft_format.adapter_params(adapter, params, model.spec))
    return cfg, model, params

def write_imported_run(cfg: Config, model: Any, params: Params, run_dir: str | os.PathLike,
                       source: str | os.PathLike | None = None) -> Path:
    """A run dir holding `params` as checkpoint step 0 (epoch 0, no history) plus its config.yaml, so that
    `lora-kd-jax train-lora RUN/config.yaml --resume` trains on from the imported weights, and
    `runs.open_run(RUN, which="latest")` / `lora-kd-jax merge RUN OUT --which latest` read them."""
    from lora_kd_jax.core import metrics as metrics_lib
    from lora_kd_jax.runs import rundir
    from lora_kd_jax.runs.checkpoint import CheckpointStore
    from lora_kd_jax.training.state import train_state

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
    log.info("wrote imported run to %s (checkpoints/latest step 0): continue with lora-kd-jax train-lora "
             "%s --resume", run, run / rundir.CONFIG_FILE)
    return run


# ----------------------------------------------------------------------------------------------- merge


def _hf_config(module_config: Any, n_labels: int) -> Any:
    from transformers import GPT2Config

    c = GPT2Config.from_dict(module_config.to_dict())
    c.architectures = ["GPT2ForSequenceClassification"]
    c.num_labels = n_labels
    c.pad_token_id = PAD_ID
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
    if getattr(model, "family", None) is not None:  # BERT, RoBERTa: their own format
        from lora_kd_jax.lora import encoder_interop

        return encoder_interop.save_merged(model, params, out_dir, overwrite=overwrite)
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
    info = runs.inspect_run(run_dir, kind="lora", which=which)
    _check_out_dir(Path(out_dir), [HF_CONFIG, FLAX_WEIGHTS, TORCH_WEIGHTS], overwrite)
    run = runs.open_run(info, kind="lora", which=which)
    out = save_merged(run.model, run.params, out_dir, overwrite=overwrite)
    hf_files.add_run_files(out, run.config)  # label names, problem type and tokenizer: usable on its own
    return out
