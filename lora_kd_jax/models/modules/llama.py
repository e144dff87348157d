"""Llama in linen, with the parameter tree and module paths of the Flax Llama of transformers 4:

    embed_tokens/embedding, layers/{i}/{input_layernorm, self_attn/{q,k,v,o}_proj, post_attention_layernorm,
                                        mlp/{gate,up,down}_proj}, norm          (RMSNorms hold `weight`)

and what that Flax Llama left out and Llama 3.x checkpoints carry, computed as transformers 5's PyTorch LlamaModel does:
the rope base (`rope_theta`), an explicit `head_dim`, q/k/v/o biases (`attention_bias`), MLP biases (`mlp_bias`) and
the llama3 rope scaling. Causal attention over the real tokens, grouped-query attention (`num_key_value_heads`).
With `arch.qk_norm` it is Qwen3 (`modules.qwen3`): self_attn/{q_norm, k_norm}, RMSNorms over each head's width.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_kd_jax.models.modules.arch import Arch, Rope
from lora_kd_jax.models.modules.layers import Dense, RMSNorm, Stack, activation, apply_rope, attend, \
    attention_bias, rope_frequencies


def _dense(arch: Arch, features: int, bias: bool, dtype: Any, name: str) -> Dense:
    return Dense(features, use_bias=bias, dtype=dtype, kernel_init=nn.initializers.normal(arch.initializer_range),
                 name=name)


class LlamaAttention(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, positions: jax.Array, deterministic: bool) -> jax.Array:
        a, d = self.arch, self.arch.head_width
        proj = lambda n, name: _dense(a, n * d, a.attention_bias, self.dtype, name)(x)  # noqa: E731
        q = proj(a.num_heads, "q_proj").reshape(x.shape[:2] + (a.num_heads, d))
        k = proj(a.kv_heads, "k_proj").reshape(x.shape[:2] + (a.kv_heads, d))
        v = proj(a.kv_heads, "v_proj").reshape(x.shape[:2] + (a.kv_heads, d))
        if a.qk_norm:  # Qwen3: each head's queries and keys RMS-normed over head_dim, before the rotation
            q = RMSNorm(a.norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(a.norm_eps, self.dtype, name="k_norm")(k)
        inv_freq = rope_frequencies(a.rope or Rope(), d)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        out = attend(self, q, k, v, bias, dropout=a.attention_dropout, deterministic=deterministic, dtype=self.dtype,
                     softmax_fp32=self.dtype != jnp.float32)
        return _dense(a, a.hidden_size, a.attention_bias, self.dtype, "o_proj")(out)


class LlamaMLP(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.arch
        up = _dense(a, a.intermediate_size, a.mlp_bias, self.dtype, "up_proj")(x)
        gate = activation(a.activation)(_dense(a, a.intermediate_size, a.mlp_bias, self.dtype, "gate_proj")(x))
        return _dense(a, a.hidden_size, a.mlp_bias, self.dtype, "down_proj")(up * gate)


class LlamaLayer(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, positions: jax.Array, deterministic: bool) -> jax.Array:
        norm = lambda name: RMSNorm(self.arch.norm_eps, self.dtype, name=name)  # noqa: E731
        x = x + LlamaAttention(self.arch, self.dtype, name="self_attn")(norm("input_layernorm")(x), bias, positions,
                                                                         deterministic)
        return x + LlamaMLP(self.arch, self.dtype, name="mlp")(norm("post_attention_layernorm")(x))



class LlamaModel(nn.Module):
    """The Llama base: last hidden states after the final RMSNorm, [B, L, hidden]; no token types."""

    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True) -> tuple[jax.Array, None]:
        if token_type_ids is not None:
            raise ValueError("token_type_ids given to a llama model: Llama has no token types")
        a = self.arch
        x = nn.Embed(a.vocab_size, a.hidden_size, dtype=self.dtype, name="embed_tokens",
                     embedding_init=nn.initializers.normal(a.initializer_range))(input_ids.astype("i4"))
        x = Stack(LlamaLayer, a, self.dtype, name="layers")(x, attention_bias(attention_mask, True, self.dtype),
                                                      position_ids, deterministic)
        return RMSNorm(a.norm_eps, self.dtype, name="norm")(x), None


def rope(hf: dict) -> Rope:
    """The rope base and scaling of a Llama config.json: transformers 5's `rope_parameters`, or the older top-level
    `rope_theta` / `rope_scaling` keys. Scalings other than llama3 and linear are refused by name."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **params}
    if kind not in ("default", "llama3", "linear"):
        raise ValueError(f"rope_type={kind!r} is not computed here (expected default, linear or llama3)")
    if kind == "default":
        return Rope(theta=float(theta))
    if kind == "linear":
        return Rope(theta=float(theta), kind="linear", factor=float(scaling["factor"]))
    return Rope(theta=float(theta), kind="llama3", factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]), high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_positions=int(scaling["original_max_position_embeddings"]))


def arch(hf: dict) -> Arch:
    """A Llama config.json as this library's Arch: head_dim, grouped-query heads, biases and rope as the checkpoint
    says."""
    heads = hf["num_attention_heads"]
    pad = hf.get("pad_token_id")
    return Arch(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or 0, intermediate_size=hf["intermediate_size"],
                max_positions=hf["max_position_embeddings"], activation=hf.get("hidden_act", "silu"),
                norm_eps=hf.get("rms_norm_eps", 1e-6), initializer_range=hf.get("initializer_range", 0.02),
                attention_dropout=hf.get("attention_dropout", 0.0), pad_token_id=pad if pad is not None else 0,
                rope=rope(hf), attention_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)))


def config_kwargs(n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int) -> dict:
    """LlamaConfig's keyword arguments for a random-init model: intermediate 4 x width, no grouped-query attention,
    pad id 0, untied embeddings."""
    return dict(vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
                num_key_value_heads=n_head, intermediate_size=4 * n_embd, max_position_embeddings=n_positions,
                pad_token_id=0, tie_word_embeddings=False)
