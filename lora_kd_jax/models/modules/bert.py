"""BERT (and RoBERTa, the same network) in linen, with the parameter tree, module paths and dropout placement of
the Flax BERT and RoBERTa of transformers 4:

    embeddings/{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}
    encoder/layer/{i}/{attention/{self/{query, key, value}, output/{dense, LayerNorm}},
                       intermediate/dense, output/{dense, LayerNorm}}
    pooler/dense                                    (only with `pooler`: BERT's classifier reads it, RoBERTa's not)

Post-LayerNorm blocks, bidirectional attention over the real tokens. RoBERTa differs only in its position ids
(counted from pad_token_id + 1), which the caller computes (`models.families`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_kd_jax.models.modules.arch import Arch
from lora_kd_jax.models.modules.layers import Dense, Stack, activation, attend, attention_bias


def _dense(arch: Arch, features: int, dtype: Any, name: str) -> Dense:
    return Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(arch.initializer_range), name=name)


def _norm(arch: Arch, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=arch.norm_eps, dtype=dtype, name="LayerNorm")


class BertEmbeddings(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, token_types: jax.Array, positions: jax.Array, deterministic: bool):
        a = self.arch
        embed = lambda n, name: nn.Embed(n, a.hidden_size, dtype=self.dtype, name=name,  # noqa: E731
                                         embedding_init=nn.initializers.normal(a.initializer_range))
        x = embed(a.vocab_size, "word_embeddings")(ids.astype("i4"))
        x = x + embed(a.type_vocab_size, "token_type_embeddings")(token_types.astype("i4"))
        x = x + embed(a.max_positions, "position_embeddings")(positions.astype("i4"))
        return nn.Dropout(a.hidden_dropout, name="dropout")(_norm(a, self.dtype)(x), deterministic=deterministic)


class BertSelfAttention(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        a = self.arch
        heads = lambda t: t.reshape(t.shape[:2] + (a.num_heads, a.head_width))  # noqa: E731
        q, k, v = (heads(_dense(a, a.hidden_size, self.dtype, n)(x)) for n in ("query", "key", "value"))
        return attend(self, q, k, v, bias, dropout=a.attention_dropout, deterministic=deterministic,
                      dtype=self.dtype)


class BertResidual(nn.Module):
    """dense -> dropout -> LayerNorm(+ residual): BERT's `attention.output` and `output`."""

    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool) -> jax.Array:
        h = _dense(self.arch, self.arch.hidden_size, self.dtype, "dense")(x)
        h = nn.Dropout(self.arch.hidden_dropout, name="dropout")(h, deterministic=deterministic)
        return _norm(self.arch, self.dtype)(h + residual)


class BertAttention(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        h = BertSelfAttention(self.arch, self.dtype, name="self")(x, bias, deterministic)
        return BertResidual(self.arch, self.dtype, name="output")(h, x, deterministic)


class BertIntermediate(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return activation(self.arch.activation)(_dense(self.arch, self.arch.intermediate_size, self.dtype, "dense")(x))


class BertLayer(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        h = BertAttention(self.arch, self.dtype, name="attention")(x, bias, deterministic)
        inner = BertIntermediate(self.arch, self.dtype, name="intermediate")(h)
        return BertResidual(self.arch, self.dtype, name="output")(inner, h, deterministic)



class BertEncoder(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        return Stack(BertLayer, self.arch, self.dtype, name="layer")(x, bias, deterministic)


class BertModel(nn.Module):
    """The encoder base: (last hidden states [B, L, hidden], the pooler's tanh(dense([CLS])) or None)."""

    arch: Arch
    dtype: Any = jnp.float32
    pooler: bool = True

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True
                 ) -> tuple[jax.Array, jax.Array | None]:
        types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = BertEmbeddings(self.arch, self.dtype, name="embeddings")(input_ids, types, position_ids, deterministic)
        x = BertEncoder(self.arch, self.dtype, name="encoder")(x, attention_bias(attention_mask, False, self.dtype),
                                                               deterministic)
        if not self.pooler:
            return x, None
        return x, BertPooler(self.arch, self.dtype, name="pooler")(x)


class BertPooler(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(_dense(self.arch, self.arch.hidden_size, self.dtype, "dense")(x[:, 0]))


def arch(hf: dict) -> Arch:
    """A BERT or RoBERTa config.json as this library's Arch; absolute positions only (the other position embedding
    types are refused by name)."""
    kind = hf.get("position_embedding_type") or "absolute"
    if kind != "absolute":
        raise ValueError(f"position_embedding_type={kind!r} is not computed here (expected 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("a BERT-style decoder (is_decoder / add_cross_attention) is not a sequence classifier base")
    return Arch(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                max_positions=hf["max_position_embeddings"], activation=hf.get("hidden_act", "gelu"),
                norm_eps=hf.get("layer_norm_eps", 1e-12), initializer_range=hf.get("initializer_range", 0.02),
                hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
                attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                classifier_dropout=hf.get("classifier_dropout"), type_vocab_size=hf.get("type_vocab_size", 2),
                pad_token_id=hf.get("pad_token_id") or 0)


def config_kwargs(n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int, *, pad: int = 0,
                  position_offset: int = 0, type_vocab_size: int = 2) -> dict:
    """BertConfig's (RobertaConfig's) keyword arguments for a random-init model: intermediate 4 x width; RoBERTa
    spends pad + 1 positions on its offset and has one token type."""
    return dict(vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
                intermediate_size=4 * n_embd, pad_token_id=pad, max_position_embeddings=n_positions + position_offset,
                type_vocab_size=type_vocab_size)
