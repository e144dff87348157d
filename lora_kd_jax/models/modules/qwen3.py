"""Qwen3: the Llama module (`modules.llama.LlamaModel`) with Qwen3's per-head q/k RMSNorms (`Arch.qk_norm`), so its
parameter tree is transformers 5's PyTorch Qwen3Model's:

    embed_tokens/embedding, layers/{i}/{input_layernorm, self_attn/{q_proj, k_proj, v_proj, q_norm, k_norm, o_proj},
                                        post_attention_layernorm, mlp/{gate,up,down}_proj}, norm

What differs from Llama is only what its config.json says: an explicit head_dim (128 at every released size, whatever
hidden / heads is), grouped-query attention, rope_theta (1e6), q/k/v/o biases (`attention_bias`), no MLP biases.
Qwen3's sliding-window layers (`use_sliding_window`, off in every released checkpoint) are refused by name.
"""
from __future__ import annotations

import dataclasses

from lora_kd_jax.models.modules import llama
from lora_kd_jax.models.modules.arch import Arch


def arch(hf: dict) -> Arch:
    """A Qwen3 config.json as this library's Arch: Llama's reading of it (rope, head_dim, grouped-query heads,
    attention biases) plus the q/k norms."""
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true (Qwen3's sliding-window layers) is not computed here; every "
                         "released Qwen3 has it off")
    return dataclasses.replace(llama.arch({**hf, "mlp_bias": False}), qk_norm=True)


def config_kwargs(n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int) -> dict:
    """Qwen3Config's keyword arguments for a random-init model: head_dim = width / heads (Qwen3Config's default is
    128 whatever the width), intermediate 3 x width (Qwen3-0.6B's ratio), no grouped-query attention, pad id 0."""
    return dict(vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
                num_key_value_heads=n_head, head_dim=n_embd // n_head, intermediate_size=3 * n_embd,
                max_position_embeddings=n_positions, pad_token_id=0, tie_word_embeddings=False)
