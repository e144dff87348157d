"""BERT, RoBERTa and Llama sequence classifiers: transformers' Flax base + LoRA + the head PyTorch puts on it.

The tree is {<family prefix>: base, 'lora': factors, 'head': ...} ('bert' / 'roberta' / 'model', the PyTorch
attribute names). The head computes exactly what transformers' PyTorch classes do (`core.families` spells it):
BertForSequenceClassification pools [CLS] through the base's pooler (dense + tanh), then dropout, `classifier`;
RobertaForSequenceClassification takes <s> (no pooler), dropout, dense + tanh, dropout, `out_proj`;
LlamaForSequenceClassification takes the last real token, bias-free `score`, no dropout.
What trains: the LoRA factors and the head (PEFT's default for SEQ_CLS), and every base module that
`lora.modules_to_save` names; the rest of the base is frozen and held once (`training.state`).
Padding: positions outside the attention mask are given the family's pad id before the base runs, so a batch padded
with another id computes exactly what PyTorch computes on the tokenizer's own padding (the batcher pads with the
split's own pad id, `data.EncodedSplit.pad_id`, so its fill rows hold ids of this vocabulary);
RoBERTa's position ids count real tokens from pad_id + 1, as PyTorch's `create_position_ids_from_input_ids`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_kd_jax.core import precision
from lora_kd_jax.core.config import Config, ConfigError, n_outputs
from lora_kd_jax.core.families import ENCODERS, Family
from lora_kd_jax.lora import encoder_format
from lora_kd_jax.lora import transform as lora_lib
from lora_kd_jax.models.gpt2 import ModelLoadError
from lora_kd_jax.models import classifier
from lora_kd_jax.models.interface import FROZEN, HEAD, LORA, LORA_B, NORM, Labels, last_token_index

log = logging.getLogger(__name__)
Params = dict[str, Any]
KERNEL_LAYOUT = "in_out"  # flax nn.Dense stores (in, out)


def _transformers(family: str):
    import warnings

    with warnings.catch_warnings():  # the 4.x line warns that Flax classes are deprecated; that is expected
        warnings.simplefilter("ignore", FutureWarning)
        if family == "bert":
            from transformers import BertConfig as C
            from transformers.models.bert.modeling_flax_bert import FlaxBertModule as M
        elif family == "roberta":
            from transformers import RobertaConfig as C
            from transformers.models.roberta.modeling_flax_roberta import FlaxRobertaModule as M
        else:
            from transformers import LlamaConfig as C
            from transformers.models.llama.modeling_flax_llama import FlaxLlamaModule as M
    return C, M


def hf_config(cfg: Config, family: Family) -> Any:
    """The transformers config: read from the checkpoint (model.path or model.name's hub id), or built from model.* sizes (intermediate 4 x width); the
    run's dropout (model.dropout) and head size applied either way."""
    HFConfig, _ = _transformers(family.name)
    m = cfg.model
    from lora_kd_jax.models.families import checkpoint_dir

    where = checkpoint_dir(m)  # model.path, or the hub id's cached snapshot
    if where is not None:
        c = HFConfig.from_pretrained(os.fspath(where))
    elif family.name == "llama":
        c = HFConfig(vocab_size=m.vocab_size, hidden_size=m.n_embd, num_hidden_layers=m.n_layer,
                     num_attention_heads=m.n_head, num_key_value_heads=m.n_head, intermediate_size=4 * m.n_embd,
                     max_position_embeddings=m.n_positions, pad_token_id=0, tie_word_embeddings=False)
    else:
        pad = 1 if family.name == "roberta" else 0
        c = HFConfig(vocab_size=m.vocab_size, hidden_size=m.n_embd, num_hidden_layers=m.n_layer,
                     num_attention_heads=m.n_head, intermediate_size=4 * m.n_embd, pad_token_id=pad,
                     max_position_embeddings=m.n_positions + (pad + 1 if family.name == "roberta" else 0),
                     type_vocab_size=1 if family.name == "roberta" else 2)
    if family.name == "llama":
        c.attention_dropout = m.dropout  # Llama's only dropout
    else:
        c.hidden_dropout_prob = c.attention_probs_dropout_prob = m.dropout
    c.num_labels = n_outputs(cfg)
    return c


def build_module(config: Any, family: Family, dtype: str = "float32") -> Any:
    """The linen base module (no transformers wrapper); RoBERTa's classifier has no pooler, BERT's uses it."""
    _, Module = _transformers(family.name)
    if family.name == "llama":
        return Module(config, dtype=precision.dtype(dtype, "compute"))
    return Module(config, dtype=precision.dtype(dtype, "compute"), add_pooling_layer=family.name == "bert")


def _inputs(module: Any, ids: jax.Array, mask: jax.Array, positions: jax.Array,
            token_types: jax.Array | None = None) -> tuple:
    """The positional arguments of the base module: Llama's are (ids, mask, positions), the encoders' have token
    types (BERT's pairs: 0 / 1; None: all 0, single sentences and RoBERTa) before the positions."""
    if "Llama" in type(module).__name__:
        return ids, mask, positions
    return ids, mask, jnp.zeros_like(ids) if token_types is None else token_types, positions


def _example(module: Any) -> tuple:
    ids = jnp.zeros((1, 4), jnp.int32)
    return _inputs(module, ids, jnp.ones_like(ids), jnp.arange(4, dtype=jnp.int32)[None] + 2)


def param_shapes(module: Any) -> Params:
    return jax.eval_shape(lambda k: module.init(k, *_example(module), return_dict=False)["params"],
                          jax.random.key(0))


def random_params(module: Any, key: jax.Array) -> Params:
    """transformers' own initialisers (normal(initializer_range), zero biases, unit norms)."""
    return jax.jit(lambda k: module.init(k, *_example(module), return_dict=False)["params"])(key)


def load_weights(path: Path, family: Family, like: Params) -> Params:
    """Base weights from a save_pretrained dir: model.safetensors (PyTorch, *Model or *ForSequenceClassification)
    or flax_model.msgpack (Flax*Model). Keys the classifier has no use for are counted and logged."""
    if (path / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        base, skipped = encoder_format.base_from_torch(load_file(os.fspath(path / "model.safetensors")), family,
                                                       like)
    elif (path / "flax_model.msgpack").is_file():
        from flax import serialization

        tree = serialization.msgpack_restore((path / "flax_model.msgpack").read_bytes())
        tree = tree.get(family.prefix, tree)
        flat = traverse_util.flatten_dict(tree)
        want = traverse_util.flatten_dict(like)
        skipped = ["/".join(k) for k in flat if k not in want]
        base = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in want})
        encoder_format.convert.check_shapes(base, like, f"{path / 'flax_model.msgpack'}")
    else:
        raise ModelLoadError(f"model.path={path}: no {family.name} weights found (looked for model.safetensors, "
                             "flax_model.msgpack); write them with save_pretrained(safe_serialization=True)")
    if skipped:
        log.info("model.path=%s: %d tensors not used by the %s classifier's base (%s)", path, len(skipped),
                 family.name, ", ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""))
    return jax.tree.map(jnp.asarray, base)


def init_head(key: jax.Array, family: Family, n_embd: int, n_labels: int, std: float) -> Params:
    """transformers' init: normal(0, initializer_range) kernels, zero biases."""
    k1, k2 = jax.random.split(key)

    def dense(k, n_in, n_out):
        return {"kernel": std * jax.random.normal(k, (n_in, n_out), jnp.float32), "bias": jnp.zeros((n_out,))}

    if family.name == "llama":  # `score`: no bias
        return {"score": {"kernel": std * jax.random.normal(k1, (n_embd, n_labels), jnp.float32)}}
    if family.name == "bert":
        return {"classifier": dense(k1, n_embd, n_labels)}
    return {"dense": dense(k1, n_embd, n_embd), "out_proj": dense(k2, n_embd, n_labels)}


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _matches(module: str, names: tuple[str, ...]) -> bool:
    """PEFT's modules_to_save rule: the module's dotted name ends with one of the names."""
    return any(module == n or module.endswith("." + n) for n in names)


@dataclasses.dataclass(frozen=True, eq=False)
class EncoderClassifier:
    """An encoder module, its family, an optional LoRA spec and the base weights every seed's adapters are drawn
    over (None when built from shapes only); `logits` is the pure apply function."""

    module: Any
    family: Family
    spec: lora_lib.LoraSpec | None = None
    base: Params | None = dataclasses.field(default=None, repr=False)
    n_labels: int = 2
    to_save: tuple[str, ...] = ()  # base modules trained fully (lora.modules_to_save), PyTorch names sans prefix
    name: str = ""
    start: Params | None = dataclasses.field(default=None, repr=False)  # pissa/olora: the factors of the base
    plus_ratio: float = 1.0  # LoRA+ (lora.plus_ratio): the learning rate of B, magnitudes and 1-D leaves / A's

    @property
    def lr_scales(self) -> dict[str, float]:
        """LoRA+ (training.optimizer): B, the DoRA magnitudes and every trained 1-D leaf at plus_ratio x the rate,
        PEFT's create_loraplus_optimizer groups (its groupB: lora_B and ndim == 1)."""
        return {LORA_B: self.plus_ratio, NORM: self.plus_ratio} if self.plus_ratio != 1.0 else {}

    @property
    def pad_id(self) -> int:
        pad = self.module.config.pad_token_id
        return int(pad) if pad is not None else 0  # Llama checkpoints may name none: padding is masked anyway

    def init(self, key: jax.Array) -> Params:
        if self.base is None:
            raise ValueError("this EncoderClassifier holds no base weights (built with shapes_only)")
        return init_params(self, self.base, key)

    def label_of(self, path: tuple[str, ...], ndim: int = 2) -> str:
        """The group of one leaf; with LoRA+ B, the magnitudes and every trained 1-D leaf (`ndim`: biases, norms)
        form the scaled groups (LORA_B; norms stay NORM, which LoRA+ scales too)."""
        plus = self.plus_ratio != 1.0
        if path[0] == "lora":
            return LORA_B if plus and path[-1] in ("b", "m") else LORA
        if path[0] == "head":
            return LORA_B if plus and ndim == 1 else HEAD
        if self.to_save and _matches(".".join(path[1:-1]), self.to_save):
            if any("norm" in p.lower() for p in path):
                return NORM
            return LORA_B if plus and ndim == 1 else HEAD
        return FROZEN

    def param_labels(self, params: Params) -> Labels:
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict({k: self.label_of(k, len(getattr(v, "shape", ())))
                                             for k, v in flat.items()})

    def describe(self) -> str:
        rank = f", LoRA rank {self.spec.rank}" if self.spec is not None else ""
        return f"{self.name or self.family.name}{rank}"

    def logits(self, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool = True, rng: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
        """`token_type_ids`: BERT's segment ids of a sentence pair (0 first text, 1 second; padding 0); None = all 0.
        Llama takes none (an error if given) and RoBERTa's single type makes them all 0."""
        if token_type_ids is not None and self.family.name == "llama":
            raise ValueError("token_type_ids given to a llama classifier: Llama has no token types")
        base_rng = lora_rng = head_rng = None
        if rng is not None and not deterministic:
            base_rng, lora_rng, head_rng = jax.random.split(rng, 3)
        pad = self.pad_id
        ids = jnp.where(attention_mask > 0, input_ids, pad)  # padding reads as the pad token, as PyTorch's does
        if self.family.name == "roberta":  # PyTorch: cumsum(ids != pad) * (ids != pad) + pad
            real = (ids != pad).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=1) * real + pad
        else:  # BERT, and Llama (right padding: real tokens sit at 0..n-1, as PyTorch's cache positions)
            positions = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)

        def run():
            return self.module.apply({"params": params[self.family.prefix]},
                                     *_inputs(self.module, ids, attention_mask, positions, token_type_ids),
                                     deterministic=deterministic,
                                     rngs={"dropout": base_rng} if base_rng is not None else None,
                                     return_dict=False)

        if self.spec is not None and "lora" in params:
            with lora_lib.lora_context(self.spec, params["lora"], rng=lora_rng, deterministic=deterministic):
                out = run()
        else:
            out = run()
        return self.head(params["head"], out, head_rng, attention_mask)

    def head(self, head: Params, out: tuple, rng: jax.Array | None, attention_mask: jax.Array) -> jax.Array:
        if self.family.name == "llama":  # the last real token (PyTorch: the rightmost non-pad one), no dropout
            idx = last_token_index(attention_mask)
            pooled = jnp.take_along_axis(out[0], idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
            return pooled @ head["score"]["kernel"]
        c = self.module.config
        rate = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        k1, k2 = jax.random.split(rng) if rng is not None else (None, None)
        if self.family.name == "bert":
            pooled = _dropout(out[1].astype(jnp.float32), rate, k1)
            return pooled @ head["classifier"]["kernel"] + head["classifier"]["bias"]
        x = _dropout(out[0][:, 0].astype(jnp.float32), rate, k1)
        x = jnp.tanh(x @ head["dense"]["kernel"] + head["dense"]["bias"])
        x = _dropout(x, rate, k2)
        return x @ head["out_proj"]["kernel"] + head["out_proj"]["bias"]

    def merged(self, params: Params) -> Params:
        """The same function with LoRA folded into the kernels (plain base weights + head)."""
        if self.spec is None or "lora" not in params:
            return params
        base = lora_lib.merge(params[self.family.prefix], self.spec, params["lora"], KERNEL_LAYOUT)
        return {self.family.prefix: base, "head": params["head"]}


def init_params(model: EncoderClassifier, base: Params, key: jax.Array, *, shapes_only: bool = False) -> Params:
    """{prefix: base, 'lora': factors, 'head': ...}, the factors and head drawn from `key` (split as GPT-2's)."""
    _, k_lora, k_head = jax.random.split(key, 3)
    c = model.module.config
    params: Params = {model.family.prefix: base}
    if model.spec is not None:
        init = functools.partial(classifier.init_factors, model)
        params["lora"] = jax.eval_shape(init, base, k_lora) if shapes_only else init(base, k_lora)
    head = functools.partial(init_head, family=model.family, n_embd=c.hidden_size, n_labels=model.n_labels,
                             std=c.initializer_range)
    params["head"] = jax.eval_shape(head, k_head) if shapes_only else head(k_head)
    return params


def build_encoder(cfg: Config, family_name: str, key: jax.Array, *, base_key: jax.Array | None = None,
                  with_lora: bool = True, shapes_only: bool = False) -> tuple[EncoderClassifier, Params]:
    """Model and full tree for a BERT / RoBERTa / Llama config (as `classifier.build_classifier` for GPT-2)."""
    from lora_kd_jax.lora import targets as targets_lib

    family = ENCODERS[family_name]
    config = hf_config(cfg, family)
    module = build_module(config, family, cfg.model.dtype)
    shapes = param_shapes(module)
    if shapes_only:
        base = shapes
    elif cfg.model.init == "pretrained":
        from lora_kd_jax.models.families import checkpoint_dir

        base = load_weights(checkpoint_dir(cfg.model), family, shapes)
    else:
        base = random_params(module, jax.random.split(key, 3)[0] if base_key is None else base_key)
    spec = None
    if with_lora:
        lc = cfg.lora
        patterns = targets_lib.select(lc.targets, family.name, base)
        spec = lora_lib.make_spec(base, patterns, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, init=lc.init,
                                  kernel_layout=KERNEL_LAYOUT, scaling=lc.scaling, variant=lc.variant)
    base, start = classifier.decompose_base(base, spec, shapes_only=shapes_only)
    to_save = tuple(targets_lib.modules_to_save(cfg.lora.modules_to_save, family, shapes))
    embeddings = [".".join(k[:-1]) for k in traverse_util.flatten_dict(shapes)
                  if k[-1] == "embedding" and _matches(".".join(k[:-1]), to_save)]
    if with_lora and cfg.lora.plus_ratio != 1.0 and embeddings:
        raise ConfigError(f"lora.plus_ratio={cfg.lora.plus_ratio} with lora.modules_to_save training embeddings "
                          f"({', '.join(embeddings)}): PEFT's LoRA+ gives embeddings their own rate "
                          "(loraplus_lr_embedding), which this project does not hold; drop one of the two")
    model = EncoderClassifier(module, family, spec, None if shapes_only else base, n_outputs(cfg), to_save,
                              cfg.model.path or family.name, start, cfg.lora.plus_ratio if with_lora else 1.0)
    return model, init_params(model, base, key, shapes_only=shapes_only)

