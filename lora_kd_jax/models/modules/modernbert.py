"""ModernBERT in linen, with the parameter tree and module paths of transformers 5's PyTorch ModernBertModel:

    embeddings/{tok_embeddings, norm}, layers/{i}/{attn_norm (not in layer 0), attn/{Wqkv, Wo}, mlp_norm,
    mlp/{Wi, Wo}}, final_norm                       (LayerNorms without bias: `scale` only)

Pre-LayerNorm blocks: a fused Wqkv (its output is [q | k | v], each heads x head_dim), a GeGLU feed-forward (Wi's
output halves: act(input) * gate, then Wo), rotary positions. The blocks `layer_types` calls full_attention (every
`global_attn_every_n_layers`-th from block 0) read every real token with the global rope base; the others read the
real tokens within local_attention // 2 positions of the query (transformers' bidirectional sliding mask), with the
local rope base. The base returns the classifier's pooling as its pooled output (`classifier_pooling`: cls, the
first token; mean, over the real tokens); the head on it is `heads.DENSE_NORM_CLASSIFIER`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_kd_jax.models.modules.arch import Arch, Rope
from lora_kd_jax.models.modules.layers import Dense, Stack, activation, apply_rope, attend, attention_bias, \
    rope_frequencies

SLIDING = "sliding_attention"


def _dense(arch: Arch, features: int, bias: bool, dtype: Any, name: str) -> Dense:
    return Dense(features, use_bias=bias, dtype=dtype, kernel_init=nn.initializers.normal(arch.initializer_range),
                 name=name)


def _norm(arch: Arch, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=arch.norm_eps, use_bias=False, dtype=dtype, name=name)


class ModernBertAttention(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32
    local: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, positions: jax.Array, deterministic: bool) -> jax.Array:
        a, d = self.arch, self.arch.head_width
        qkv = _dense(a, 3 * a.num_heads * d, a.attention_bias, self.dtype, "Wqkv")(x)
        qkv = qkv.reshape(x.shape[:2] + (3, a.num_heads, d))
        inv_freq = rope_frequencies((a.local_rope if self.local else a.rope) or Rope(), d)
        q, k = (apply_rope(qkv[:, :, i], positions, inv_freq) for i in (0, 1))
        out = attend(self, q, k, qkv[:, :, 2], bias, dropout=a.attention_dropout, deterministic=deterministic,
                     dtype=self.dtype, softmax_fp32=self.dtype != jnp.float32)
        out = _dense(a, a.hidden_size, a.attention_bias, self.dtype, "Wo")(out)
        return nn.Dropout(a.attention_dropout)(out, deterministic=deterministic)


class ModernBertMLP(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        a = self.arch
        inputs, gate = jnp.split(_dense(a, 2 * a.intermediate_size, a.mlp_bias, self.dtype, "Wi")(x), 2, axis=-1)
        h = nn.Dropout(a.hidden_dropout)(activation(a.activation)(inputs) * gate, deterministic=deterministic)
        return _dense(a, a.hidden_size, a.mlp_bias, self.dtype, "Wo")(h)


class ModernBertLayer(nn.Module):
    """Block `index`: no attn_norm in block 0 (PyTorch's nn.Identity), the sliding mask and local rope in the
    blocks `layer_types` calls sliding_attention."""

    arch: Arch
    dtype: Any = jnp.float32
    index: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, biases: tuple[jax.Array, jax.Array], positions: jax.Array,
                 deterministic: bool) -> jax.Array:
        a = self.arch
        local = bool(a.layer_types) and a.layer_types[self.index] == SLIDING
        h = x if self.index == 0 else _norm(a, self.dtype, "attn_norm")(x)
        x = x + ModernBertAttention(a, self.dtype, local, name="attn")(h, biases[int(local)], positions,
                                                                       deterministic)
        return x + ModernBertMLP(a, self.dtype, name="mlp")(_norm(a, self.dtype, "mlp_norm")(x), deterministic)


def _layer(arch: Arch, dtype: Any, name: str) -> ModernBertLayer:
    """`Stack`'s layer factory: block `name` knows its index."""
    return ModernBertLayer(arch, dtype, int(name), name=name)


def pool(hidden: jax.Array, attention_mask: jax.Array, how: str) -> jax.Array:
    """ModernBertForSequenceClassification's pooling, in float32: the first token (cls), or the mean over the real
    tokens (mean)."""
    hidden = hidden.astype(jnp.float32)
    if how == "cls":
        return hidden[:, 0]
    mask = attention_mask.astype(jnp.float32)[..., None]
    return (hidden * mask).sum(axis=1) / mask.sum(axis=1)


class ModernBertModel(nn.Module):
    """The ModernBERT base: (last hidden states after final_norm [B, L, hidden], the pooled vector [B, hidden])."""

    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        if token_type_ids is not None:
            raise ValueError("token_type_ids given to a modernbert model: ModernBERT has no token types")
        a = self.arch
        if a.layer_types and len(a.layer_types) != a.num_layers:  # a block's kind and attn_norm follow its index
            raise ValueError(f"a modernbert of {a.num_layers} blocks with layer_types for {len(a.layer_types)}: its "
                             "blocks cannot be sliced out of a deeper one (a transformer student of a ModernBERT "
                             "teacher is not supported)")
        x = ModernBertEmbeddings(a, self.dtype, name="embeddings")(input_ids, deterministic)
        full = attention_bias(attention_mask, False, self.dtype)
        index = jnp.arange(input_ids.shape[-1])
        near = jnp.abs(index[:, None] - index[None, :]) <= a.sliding_window
        local = jnp.where(near[None, None], full, jnp.asarray(jnp.finfo(self.dtype).min, self.dtype))
        x = Stack(_layer, a, self.dtype, name="layers")(x, (full, local), position_ids, deterministic)
        x = _norm(a, self.dtype, "final_norm")(x)
        return x, pool(x, attention_mask, a.pooling)


class ModernBertEmbeddings(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, deterministic: bool) -> jax.Array:
        a = self.arch
        x = nn.Embed(a.vocab_size, a.hidden_size, dtype=self.dtype, name="tok_embeddings",
                     embedding_init=nn.initializers.normal(a.initializer_range))(ids.astype("i4"))
        return nn.Dropout(a.embedding_dropout)(_norm(a, self.dtype, "norm")(x), deterministic=deterministic)


def _rope(params: dict, legacy: Any, default: float) -> Rope:
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"rope_type={kind!r} is not computed here for ModernBERT (expected default)")
    return Rope(theta=float(params.get("rope_theta", legacy if legacy is not None else default)))


HEAD_AS_COMPUTED = {"classifier_bias": False, "norm_bias": False, "classifier_activation": "gelu", "norm_eps": 1e-5}


def arch(hf: dict) -> Arch:
    """A ModernBERT config.json as this library's Arch. The head is computed as released checkpoints have it (no
    dense bias, no norm bias, gelu, eps 1e-5); a config asking for another is refused by name."""
    for key, want in HEAD_AS_COMPUTED.items():
        if hf.get(key, want) != want:
            raise ValueError(f"{key}={hf[key]!r} is not computed here (ModernBERT's head and norms as released: "
                             f"{', '.join(f'{k}={v}' for k, v in HEAD_AS_COMPUTED.items())})")
    pooling = hf.get("classifier_pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise ValueError(f"classifier_pooling={pooling!r} is not one of cls, mean")
    n = hf["num_hidden_layers"]
    every = hf.get("global_attn_every_n_layers", 3)
    types = tuple(hf.get("layer_types") or ("sliding_attention" if i % every else "full_attention" for i in range(n)))
    rope = hf.get("rope_parameters") or {}
    pad = hf.get("pad_token_id")
    return Arch(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=n,
                num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                max_positions=hf["max_position_embeddings"], activation=hf.get("hidden_activation", "gelu"),
                norm_eps=hf.get("norm_eps", 1e-5), initializer_range=hf.get("initializer_range", 0.02),
                hidden_dropout=hf.get("mlp_dropout", 0.0), embedding_dropout=hf.get("embedding_dropout", 0.0),
                attention_dropout=hf.get("attention_dropout", 0.0),
                classifier_dropout=hf.get("classifier_dropout", 0.0), pad_token_id=pad if pad is not None else 0,
                rope=_rope(rope.get("full_attention") or {}, hf.get("global_rope_theta"), 160000.0),
                local_rope=_rope(rope.get("sliding_attention") or {}, hf.get("local_rope_theta"), 10000.0),
                attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
                layer_types=types, sliding_window=hf.get("local_attention", 128) // 2, pooling=pooling)


def config_kwargs(n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int) -> dict:
    """ModernBertConfig's keyword arguments for a random-init model: intermediate 1.5 x width (ModernBERT-base's
    1152 at 768), pad id 0 (its other defaults, a global block every third, local_attention 128, are the released
    ones)."""
    return dict(vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
                intermediate_size=3 * n_embd // 2, max_position_embeddings=n_positions, pad_token_id=0,
                bos_token_id=None, eos_token_id=None, cls_token_id=None, sep_token_id=None)
