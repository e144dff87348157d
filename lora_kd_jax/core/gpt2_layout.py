"""GPT-2's names and sizes as plain data: the one place that spells them.

Plain Python on purpose (no jax, no transformers): `config` validates model names and LoRA targets before jax is
imported, while `models.gpt2`, `convert`, `peft_format` and `data` name the same layers, widths and pad id.
The module names are transformers' own, the same in its Flax and PyTorch GPT-2, so PEFT matches them too.
"""
from __future__ import annotations

GPT2_SIZES: dict[str, tuple[int, int, int]] = {  # name -> (n_layer, n_embd, n_head)
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
    "distilgpt2": (6, 768, 12),  # GPT-2's width and heads, half the blocks (distilled from gpt2)
}

# The Conv1D (dense) modules of every block `h.{i}`: what LoRA adapts by default and what PEFT's target_modules
# match. Each maps n_embd-wide hidden states; c_fc widens to n_inner (4 * n_embd unless the config says otherwise).
CONV1D_MODULES: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
BLOCK_LAYER_NORMS: tuple[str, ...] = ("ln_1", "ln_2")  # in every block `h.{i}`
FINAL_LAYER_NORM = "ln_f"  # after the last block
LAYER_NORMS: tuple[str, ...] = (*BLOCK_LAYER_NORMS, FINAL_LAYER_NORM)

# Kernel layout: transformers' Flax Conv1D stores (out_features, in_features) and computes x @ kernel.T;
# PyTorch's Conv1D stores the transpose, (in, out), which is why PEFT needs fan_in_fan_out=True on GPT-2.
KERNEL_LAYOUT = "out_in"

# GPT-2 has no pad token: its eos id pads every row, and the classifier configs we write name it as pad_token_id.
PAD_ID = 50256


def conv1d_in_out(n_embd: int | None, n_inner: int | None) -> dict[str, tuple[int | None, int | None]]:
    """(in, out) features of each Conv1D of a block; None where a width is not known."""
    return {"attn.c_attn": (n_embd, 3 * n_embd if n_embd else None), "attn.c_proj": (n_embd, n_embd),
            "mlp.c_fc": (n_embd, n_inner), "mlp.c_proj": (n_inner, n_embd)}
