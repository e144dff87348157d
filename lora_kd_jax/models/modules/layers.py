"""The layers every family's module is built from: linear layers in both kernel layouts, attention, RMSNorm, rotary
positions, activations.

Linear layers are this library's own (not `nn.Dense`) so that a frozen kernel can be stored another way (QLoRA's
quantized kernels) without changing the tree; they compute exactly what `nn.Dense` computes. Parameter names and
the order they are created in are transformers' (kernel, then bias), so a random init draws the same values as
transformers' Flax classes did from the same key.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.attention import dot_product_attention_weights
from flax.linen.dtypes import promote_dtype

from lora_kd_jax.models.modules.arch import Arch, Rope

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.swish,
    "swish": nn.swish,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one this library computes; expected one of "
                         f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Stack(nn.Module):
    """`arch.num_layers` copies of `layer`, named '0', '1', ... as transformers' ModuleList names them; each takes
    the hidden states first and returns them, the other arguments passed on unchanged."""

    layer: Callable[..., nn.Module]
    arch: Arch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *args: Any) -> jax.Array:
        for i in range(self.arch.num_layers):
            x = self.layer(self.arch, self.dtype, name=str(i))(x, *args)
        return x


def kernel_value(module: nn.Module, shape: tuple[int, int], init: Callable) -> jax.Array:
    """The module's 'kernel' param as an array. A quantized kernel (`lora.quantize`: a pytree of codes and scales
    with `dequantize()`) is read as it is stored (flax's shape check would compare its codes with
    the kernel's shape) and dequantized here, in the step, in its compute dtype."""
    if module.has_variable("params", "kernel"):
        stored = module.get_variable("params", "kernel")
        if hasattr(stored, "dequantize"):
            if tuple(stored.shape) != tuple(shape):
                raise ValueError(f"{module.path}: quantized kernel of shape {stored.shape}, expected {shape}")
            return stored.dequantize()
    return module.param("kernel", init, shape, jnp.float32)


class Dense(nn.Module):
    """y = x @ kernel + bias, kernel stored (in, out) as `nn.Dense` (BERT, RoBERTa, Llama)."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = kernel_value(self, (x.shape[-1], self.features), self.kernel_init)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


class Conv1D(nn.Module):
    """GPT-2's linear layer: kernel stored (out, in), as transformers' Flax GPT-2 stored it (PyTorch's Conv1D holds
    the transpose); normal(0.02) init whatever the config's initializer_range, as there."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        kernel = kernel_value(self, (self.features, x.shape[-1]), nn.initializers.normal(0.02))
        kernel = jnp.asarray(kernel.T, self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y + jnp.asarray(self.param("bias", nn.initializers.zeros, (self.features,)), self.dtype)


class RMSNorm(nn.Module):
    """Llama's RMSNorm as PyTorch computes it: in float32, x * rsqrt(mean(x²) + eps), cast to the compute dtype,
    times `weight` (in the compute dtype, as a bf16 PyTorch model holds it)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", lambda _, shape: jnp.ones(shape), x.shape[-1])
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * h.astype(self.dtype)


def rope_frequencies(rope: Rope, head_dim: int) -> np.ndarray:
    """Inverse frequencies (head_dim // 2,), float32, as transformers' default and llama3 rope parameters: float32
    arithmetic, as torch computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.kind == "linear":
        return (inv / np.float32(rope.factor)).astype(np.float32)
    if rope.kind != "llama3":
        return inv
    low_wavelen = rope.original_max_positions / rope.low_freq_factor
    high_wavelen = rope.original_max_positions / rope.high_freq_factor
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(rope.factor), inv).astype(np.float32)
    smooth = ((rope.original_max_positions / wavelen - rope.low_freq_factor)
              / (rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [B, L, heads, head_dim] rotated by its positions [B, L] (cos and sin in float32, then x's dtype)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def attention_bias(attention_mask: jax.Array, causal: bool, dtype: Any) -> jax.Array:
    """[B, 1, Lq, Lk]: 0 where a query may read a key (a real key, and not a later one when `causal`), the dtype's
    lowest value elsewhere (what transformers' Flax classes added to the scores)."""
    length = attention_mask.shape[-1]
    allowed = attention_mask[:, None, None, :] > 0
    if causal:
        allowed = allowed & (jnp.arange(length)[None, :] <= jnp.arange(length)[:, None])[None, None]
    return jnp.where(allowed, jnp.asarray(0.0, dtype), jnp.asarray(jnp.finfo(dtype).min, dtype))


def attend(module: nn.Module, query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array, *,
           dropout: float, deterministic: bool, dtype: Any, softmax_fp32: bool = False) -> jax.Array:
    """softmax(q kᵀ / sqrt(d) + bias) v for [B, L, heads, d] inputs (keys and values repeated for grouped-query
    attention), attention dropout drawn from `module`'s 'dropout' stream; returns [B, L, heads * d]."""
    groups = query.shape[2] // key.shape[2]
    if groups > 1:
        key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
    rng = module.make_rng("dropout") if not deterministic and dropout > 0.0 else None
    weights = dot_product_attention_weights(query, key, bias=bias, dropout_rng=rng, dropout_rate=dropout,
                                            deterministic=deterministic,
                                            dtype=jnp.float32 if softmax_fp32 else dtype)
    out = jnp.einsum("...hqk,...khd->...qhd", weights.astype(dtype), value)
    return out.reshape(out.shape[:2] + (-1,))
