"""A run's config -> its classifier (any family, with LoRA) and parameters, and the --dry-run report of it.

"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

from lora_kd_jax.core import precision
from lora_kd_jax.core.config import Config, ConfigError, n_outputs
from lora_kd_jax.lora import targets as targets_lib
from lora_kd_jax.lora import transform as lora_lib
from lora_kd_jax.models import hf_checkpoint
from lora_kd_jax.models.classifier import (Classifier, base_shapes, decompose_base, init_params, matches_module,
                                           random_base)
from lora_kd_jax.models.families import FAMILIES, Family
from lora_kd_jax.models.interface import FROZEN
from lora_kd_jax.models.modules.arch import Arch
from lora_kd_jax.models.resolve import checkpoint_dir, resolve, weights_dir

Params = dict[str, Any]


def hf_config(cfg: Config) -> dict:
    """The config.json (as a dict) of the run's base: its checkpoint's (model.path, a hub id), or transformers' config
    class of the family at the model.* sizes (a random init; a released size, whose other keys are the defaults)."""
    m = cfg.model
    where = checkpoint_dir(m)
    if where is not None:
        return hf_checkpoint.read_config(where, f"model.path={m.path}" if m.path else f"model.name={m.name}")
    from transformers import AutoConfig

    fam = FAMILIES[m.type]
    return AutoConfig.for_model(fam.name, **fam.config_kwargs(m.n_layer, m.n_embd, m.n_head, m.vocab_size,
                                                              m.n_positions)).to_dict()


def with_dropout(arch: Arch, rate: float) -> Arch:
    """The run's model.dropout in every dropout of the base (a checkpoint's own rates are the pretraining's)."""
    return dataclasses.replace(arch, hidden_dropout=rate, embedding_dropout=rate, attention_dropout=rate)


def arch_of(cfg: Config, hf: dict | None = None) -> Arch:
    fam = FAMILIES[cfg.model.type]
    try:
        arch = fam.arch(hf if hf is not None else hf_config(cfg))
    except ValueError as e:
        raise hf_checkpoint.ModelLoadError(f"model.type={fam.name}: {e}") from None
    return with_dropout(arch, cfg.model.dropout)


def modules_to_save(names: list[str], family: Family, shapes: Params) -> list[str]:
    """The base modules lora.modules_to_save names (the head's own names skipped: it always trains), without the
    family prefix; a name that matches no module is an error naming the modules it could match."""
    modules = sorted({".".join(k[:-1]) for k in traverse_util.flatten_dict(shapes)})
    head_names = {layer.torch.split(".")[0] for layer in family.head.layers} | {"head", "classifier", "score"}
    out = []
    for name in names:
        if name in head_names:
            continue
        short = name[len(family.torch_prefix) + 1:] if name.startswith(family.torch_prefix + ".") else name
        if not any(m == short or m.endswith("." + short) for m in modules):
            raise lora_lib.LoraTargetError(
                f"lora.modules_to_save: {name!r} matches no module of the {family.name} base; its module paths are "
                f"{targets_lib.named_like(modules)}")
        out.append(short)
    return out


def build_classifier(cfg: Config, key: jax.Array, *, base_key: jax.Array | None = None, with_lora: bool = True,
                     shapes_only: bool = False,
                     sharding_for: Callable[[tuple[str, ...], tuple[int, ...]], Any] | None = None
                     ) -> tuple[Classifier, Params]:
    """(model, full parameter tree) of the run's classifier. `key` draws the adapters and head (and a random-init base,
    unless `base_key` is given: the seeds of a seeded run share one base). `shapes_only` builds ShapeDtypeStructs
    (no weights, no I/O). `sharding_for(path, shape)` places each base leaf as it is read (the run's mesh)."""
    cfg = resolve(cfg)  # idempotent: the family and sizes, from the checkpoint or the named size
    m, lc = cfg.model, cfg.lora
    fam = FAMILIES[m.type]
    arch = arch_of(cfg)
    dtype = precision.dtype(m.dtype, "compute")
    module = fam.module(arch, dtype)
    shapes = base_shapes(fam, module)
    spec = None
    if with_lora:
        spec = lora_lib.make_spec(shapes, targets_lib.select(lc.targets, fam, shapes), rank=lc.rank, alpha=lc.alpha,
                                  dropout=lc.dropout, init=lc.init, kernel_layout=fam.kernel_layout,
                                  scaling=lc.scaling, variant=lc.variant)
    to_save = tuple(dict.fromkeys((*fam.trained_modules, *modules_to_save(lc.modules_to_save, fam, shapes))))
    embeddings = [".".join(k[:-1]) for k in traverse_util.flatten_dict(shapes)
                  if k[-1] == "embedding" and matches_module(".".join(k[:-1]), to_save)]
    if with_lora and lc.plus_ratio != 1.0 and embeddings:
        raise ConfigError(f"lora.plus_ratio={lc.plus_ratio} with lora.modules_to_save training embeddings "
                          f"({', '.join(embeddings)}): PEFT's LoRA+ gives embeddings their own rate "
                          "(loraplus_lr_embedding), which this library does not hold; drop one of the two")
    model = Classifier(fam, arch, dtype, spec, None, n_outputs(cfg), to_save, None,
                       lc.plus_ratio if with_lora else 1.0, m.path or m.name, lc.quantize, lc.double_quant)
    flat_shapes = traverse_util.flatten_dict(shapes)
    on_host = lambda path: model.quantized_kernel(path, flat_shapes[path])  # noqa: E731
    if shapes_only:
        base = shapes
    elif m.init == "pretrained":
        base = hf_checkpoint.read_base(weights_dir(m), fam, shapes, sharding_for=sharding_for, on_host=on_host)
    else:
        base = random_base(fam, module, jax.random.split(key, 3)[0] if base_key is None else base_key)
        flat = traverse_util.flatten_dict(base)
        base = traverse_util.unflatten_dict({p: np.asarray(v) if on_host(p) else v if sharding_for is None
                                             else jax.device_put(v, sharding_for(p, v.shape))
                                             for p, v in flat.items()})
    # QLoRA's kernels stay float32 on the host (numpy) until the run quantizes them one by one
    # (training.state.stored_frozen): the device never holds the float32 block kernels
    base, start = decompose_base(base, spec, shapes_only=shapes_only, value=model.as_computed)
    model = dataclasses.replace(model, base=None if shapes_only else base, start=start)
    return model, init_params(model, base, key, shapes_only=shapes_only)


def title(cfg: Config) -> str:
    """The model's name in logs and progress bars: model.name (a size, a hub id, custom), or the family."""
    return cfg.model.name if cfg.model.name != "custom" else cfg.model.type


def plan(model: Classifier, params: Params, report: Any) -> str:
    """What --dry-run prints: the parameter counts, the family and its pooling, the adapted modules (layer indices
    folded) with their (in, out) and count, and what else trains in full."""
    fam = model.family
    lines = [str(report), f"model: {fam.name} ({fam.torch_class}): {fam.head.describe}"]
    if model.spec is not None:
        groups: dict[tuple[str, tuple[int, int]], list[str]] = {}
        for path, shape in zip(model.spec.paths, model.spec.shapes):
            name = re.sub(r"\.\d+\.", ".{i}.", ".".join(path))
            groups.setdefault((name, shape), []).append(".".join(path))
        dora = ", DoRA magnitudes included" if model.spec.variant == "dora" else ""
        lines.append(f"LoRA rank {model.spec.rank} on {len(model.spec.paths)} modules "
                     f"({lora_lib.count(model.spec):,} params{dora}):")
        lines += [f"  {name if len(ps) > 1 else ps[0]} ({a} -> {b}) x{len(ps)}" for (name, (a, b)), ps in groups.items()]
    labels = traverse_util.flatten_dict(model.param_labels(params))
    full: dict[str, int] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if labels[path] != FROZEN and path[0] != "lora":  # the factors (LoRA+: B, magnitudes too) are counted above
            name = "head" if path[0] == "head" else re.sub(r"\.\d+\.", ".{i}.", ".".join(path[1:-1]))
            full[name] = full.get(name, 0) + int(np.prod(leaf.shape))
    lines.append("trained in full: " + ", ".join(f"{k} ({v:,} params)" for k, v in full.items()))
    return "\n".join(lines)
