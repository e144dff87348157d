"""GPT-2 in linen, with the parameter tree, module paths and dropout placement of the Flax GPT-2 of transformers 4:

    wte/embedding, wpe/embedding, h/{i}/{ln_1, attn/{c_attn, c_proj}, ln_2, mlp/{c_fc, c_proj}}, ln_f

Pre-LayerNorm blocks, fused q/k/v (`c_attn`, Conv1D layout), learned positions, causal attention.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_kd_jax.models.modules.arch import Arch
from lora_kd_jax.models.modules.layers import Conv1D, Stack, activation, attend, attention_bias


class GPT2Attention(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        a = self.arch
        q, k, v = jnp.split(Conv1D(3 * a.hidden_size, self.dtype, name="c_attn")(x), 3, axis=2)
        heads = lambda t: t.reshape(t.shape[:2] + (a.num_heads, a.head_width))  # noqa: E731
        out = attend(self, heads(q), heads(k), heads(v), bias, dropout=a.attention_dropout,
                     deterministic=deterministic, dtype=self.dtype)
        out = Conv1D(a.hidden_size, self.dtype, name="c_proj")(out)
        return nn.Dropout(a.hidden_dropout, name="resid_dropout")(out, deterministic=deterministic)


class GPT2MLP(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        a = self.arch
        h = activation(a.activation)(Conv1D(a.intermediate_size, self.dtype, name="c_fc")(x))
        h = Conv1D(a.hidden_size, self.dtype, name="c_proj")(h)
        return nn.Dropout(a.hidden_dropout, name="dropout")(h, deterministic=deterministic)


class GPT2Block(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        norm = lambda name: nn.LayerNorm(epsilon=self.arch.norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        x = x + GPT2Attention(self.arch, self.dtype, name="attn")(norm("ln_1")(x), bias, deterministic)
        return x + GPT2MLP(self.arch, self.dtype, name="mlp")(norm("ln_2")(x), deterministic)



class GPT2Model(nn.Module):
    """The GPT-2 base: last hidden states after ln_f, [B, L, hidden]. Token types are not read (GPT-2 has none)."""

    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True) -> tuple[jax.Array, None]:
        a = self.arch
        embed = lambda n, name: nn.Embed(n, a.hidden_size, dtype=self.dtype, name=name,  # noqa: E731
                                         embedding_init=nn.initializers.normal(a.initializer_range))
        x = embed(a.vocab_size, "wte")(input_ids.astype("i4")) + embed(a.max_positions, "wpe")(
            position_ids.astype("i4"))
        x = nn.Dropout(a.embedding_dropout, name="dropout")(x, deterministic=deterministic)
        bias = attention_bias(attention_mask, True, self.dtype)
        x = Stack(GPT2Block, a, self.dtype, name="h")(x, bias, deterministic)
        return nn.LayerNorm(epsilon=a.norm_eps, dtype=self.dtype, name="ln_f")(x), None


def arch(hf: dict) -> Arch:
    """A GPT-2 config.json (GPT2Config's keys) as this library's Arch; the attention variants GPT-2 checkpoints do
    not use are refused by name rather than computed wrongly."""
    for key, plain in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, plain) != plain:
            raise ValueError(f"{key}={hf[key]}: GPT-2 attention with that setting is not computed here "
                             f"(expected {key}={plain}, as the released GPT-2 checkpoints have)")
    width, vocab = hf["n_embd"], hf["vocab_size"]
    pads = [p for p in (hf.get("pad_token_id"), hf.get("eos_token_id", 50256)) if p is not None and p < vocab]
    return Arch(vocab_size=hf["vocab_size"], hidden_size=width, num_layers=hf["n_layer"], num_heads=hf["n_head"],
                intermediate_size=hf.get("n_inner") or 4 * width, max_positions=hf["n_positions"],
                activation=hf.get("activation_function", "gelu_new"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                initializer_range=hf.get("initializer_range", 0.02), hidden_dropout=hf.get("resid_pdrop", 0.0),
                embedding_dropout=hf.get("embd_pdrop", 0.0), attention_dropout=hf.get("attn_pdrop", 0.0),
                pad_token_id=pads[0] if pads else 0)  # GPT-2 pads with its eos; a smaller vocabulary with 0


def config_kwargs(n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int) -> dict:
    """GPT2Config's keyword arguments for a random-init model of these sizes (its other keys at their defaults)."""
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, n_positions=n_positions)
