"""The GPT-2 base: transformers' Flax GPT-2, loaded from the hub, a local dir, or random init by size.

The only module that imports transformers' Flax classes, so the 4.x pin stays replaceable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lora_kd_jax.core import precision
from lora_kd_jax.core.config import ModelConfig, resolved_size
from lora_kd_jax.core.errors import UserError, first_line
from lora_kd_jax.core.gpt2_layout import PAD_ID

log = logging.getLogger(__name__)

Params = dict[str, Any]


class ModelLoadError(UserError, OSError):
    """GPT-2 weights could not be loaded (no network for a hub name, a model.path without a checkpoint)."""
    label = "model error"


def _transformers():
    import warnings

    with warnings.catch_warnings():  # the 4.x line warns that Flax classes are deprecated; that is expected
        warnings.simplefilter("ignore", FutureWarning)
        from transformers import FlaxGPT2Model, GPT2Config
        from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2Module
    return FlaxGPT2Model, GPT2Config, FlaxGPT2Module


def gpt2_config(cfg: ModelConfig, base: Any = None):
    """A transformers GPT2Config for `cfg` (or `base`, a loaded config, with cfg's dropout applied)."""
    _, GPT2Config, _ = _transformers()
    if base is None:
        n_layer, n_embd, n_head = resolved_size(cfg)
        base = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=cfg.vocab_size,
                          n_positions=cfg.n_positions)
    base.resid_pdrop = base.embd_pdrop = base.attn_pdrop = cfg.dropout
    base.pad_token_id = PAD_ID
    return base


def build_module(cfg: ModelConfig, hf_config: Any = None):
    """The linen FlaxGPT2Module (the network without transformers' wrapper), computing in cfg.dtype."""
    _, _, FlaxGPT2Module = _transformers()
    return FlaxGPT2Module(gpt2_config(cfg, hf_config), dtype=precision.dtype(cfg.dtype, "compute"))


def _example_inputs(length: int = 8) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    ids = jnp.zeros((1, length), jnp.int32)
    return ids, jnp.ones_like(ids), jnp.arange(length, dtype=jnp.int32)[None]


def random_params(module: Any, key: jax.Array) -> Params:
    """GPT-2's own initialisers (normal 0.02, zero biases, unit LayerNorms) for the module's size."""
    return jax.jit(lambda k: module.init(k, *_example_inputs())["params"])(key)


def param_shapes(module: Any) -> Params:
    """Shapes and dtypes only (no memory, no weights): for --dry-run and restore targets."""
    return jax.eval_shape(lambda k: module.init(k, *_example_inputs())["params"], jax.random.key(0))


def _local_weights(path: Path) -> str:
    if (path / "flax_model.msgpack").is_file():
        return "flax"
    if (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file():
        return "pytorch"
    raise ModelLoadError(
        f"model.path={path}: no GPT-2 weights found (looked for flax_model.msgpack, model.safetensors, "
        "pytorch_model.bin); write one with save_pretrained, or set model.init=random")


def load_pretrained(cfg: ModelConfig) -> tuple[Any, Params]:
    """Load (module, params) from cfg.path (a save_pretrained dir), the hub id cfg.name (ORG/NAME: its cached
    snapshot, `families.hub_snapshot`) or a GPT-2 size name (transformers fetches it by name)."""
    from lora_kd_jax.core.config import is_hub_id

    FlaxGPT2Model, _, _ = _transformers()
    if not cfg.path and is_hub_id(cfg.name):  # a hub id: its cached snapshot, read as a model.path
        from lora_kd_jax.models.families import hub_snapshot

        return load_pretrained(dataclasses.replace(cfg, path=os.fspath(hub_snapshot(cfg.name))))
    source = cfg.path or cfg.name
    kwargs: dict[str, Any] = {}
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model.path={path}: {'is a file' if path.exists() else 'does not exist'}; expected "
                                 "a directory written by save_pretrained (config.json and the weights)")
        kwargs["from_pt"] = _local_weights(path) == "pytorch"
    try:
        with _quiet_hub():
            model = FlaxGPT2Model.from_pretrained(os.fspath(Path(source).expanduser() if cfg.path else source),
                                                  dtype=precision.dtype(cfg.dtype, "compute"), **kwargs)
    except Exception as e:  # hub and file errors come in many types; each is the user's to fix
        if cfg.path:
            raise ModelLoadError(f"model.path={cfg.path}: the checkpoint does not load ({type(e).__name__}: "
                                 f"{first_line(e)}); write it again with save_pretrained") from None
        raise ModelLoadError(
            f"model.name={cfg.name}: the pretrained weights could not be loaded from the Hugging Face hub (no network, "
            f"or not cached: {first_line(e)}); set model.path=DIR to a save_pretrained checkpoint, or "
            "model.init=random for a pipeline check without pretrained weights") from None
    hf_config = model.config
    if hf_config.vocab_size != cfg.vocab_size:
        raise ValueError(f"{source}: vocab_size {hf_config.vocab_size} != model.vocab_size {cfg.vocab_size}")
    params = jax.tree.map(jnp.asarray, model.params)
    log.info("loaded GPT-2 weights from %s (%d layers, width %d)", source, hf_config.n_layer, hf_config.n_embd)
    return build_module(cfg, hf_config), params


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs every retry of an unreachable hub; the error we raise says it once."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def with_checkpoint_size(cfg: Any) -> Any:
    """`cfg` with model.n_layer/n_embd/n_head/n_positions/vocab_size read from model.path's config.json, so that
    what a run records is what it trains. A size key set to another value than the checkpoint's is an error naming
    both; so is a data.max_length beyond the checkpoint's positions. Without model.path, `cfg` as it is."""
    import json

    m = cfg.model
    if m.init != "pretrained" or not m.path:
        return cfg
    path = Path(m.path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model.path={path}: {'is a file' if path.exists() else 'does not exist'}; expected "
                             "a directory written by save_pretrained (config.json and the weights)")
    config_file = path / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"model.path={path}: no config.json; expected a directory written by save_pretrained"
                             ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ModelLoadError(f"{config_file}: not a readable GPT-2 config ({e})") from None
    found = {key: hf.get(key) for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")}
    if not all(isinstance(v, int) for v in found.values()):
        raise ModelLoadError(f"{config_file}: missing or non-integer GPT-2 sizes ({found})")
    defaults = {"n_positions": 1024, "vocab_size": 50257}  # ModelConfig's defaults: not a user's choice
    for key, value in found.items():
        asked = getattr(m, key)
        if asked is not None and asked != value and asked != defaults.get(key):
            raise ModelLoadError(f"model.{key}={asked}, but the checkpoint in {path} has {key}={value}; model.path "
                                 f"decides the architecture: drop model.{key} or set it to {value}")
    if cfg.data.max_length > found["n_positions"]:
        raise ModelLoadError(f"data.max_length={cfg.data.max_length} exceeds the {found['n_positions']} positions of "
                             f"the checkpoint in {path}")
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **found))


def load_base(cfg: ModelConfig, key: jax.Array) -> tuple[Any, Params]:
    """(module, base params) as the config asks: pretrained weights or a random init from `key`."""
    if cfg.init == "pretrained":
        return load_pretrained(cfg)
    module = build_module(cfg)
    return module, random_params(module, key)


def hidden_states(module: Any, base_params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
                  deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
    """Last hidden states after ln_f, [batch, length, n_embd]; positions 0..L-1 (right padding)."""
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)
    rngs = {"dropout": rng} if (not deterministic and rng is not None) else None
    out = module.apply({"params": base_params}, input_ids, attention_mask, positions,
                       deterministic=deterministic, rngs=rngs)
    return out[0]


def save_random_checkpoint(cfg: ModelConfig, out_dir: str | os.PathLike, seed: int = 0, pytorch: bool = False):
    """Write a random GPT-2 of cfg's size with save_pretrained (what tests load as 'pretrained').

    Flax msgpack by default; `pytorch=True` writes transformers' PyTorch safetensors instead (needs torch).
    Returns the in-memory FlaxGPT2Model holding the same weights.
    """
    FlaxGPT2Model, _, _ = _transformers()
    model = FlaxGPT2Model(gpt2_config(cfg), seed=seed)
    if pytorch:
        from transformers import GPT2Model
        from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

        torch_model = load_flax_weights_in_pytorch_model(GPT2Model(model.config), model.params)
        torch_model.save_pretrained(os.fspath(out_dir))
    else:
        model.save_pretrained(os.fspath(out_dir))
    return model
