"""PyTorch's default initialisers, for the students that track their PyTorch originals step for step: embedding
N(0, 1); RNN, LSTM and Linear weights and biases U(±1/sqrt(fan)), Conv1d U(±1/sqrt(in * width)).

A leaf module: every student imports it, it imports none of them.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_uniform(fan: int) -> nn.initializers.Initializer:
    """torch's default for RNN weights/biases and Linear biases: U(-1/sqrt(fan), 1/sqrt(fan))."""
    bound = 1.0 / math.sqrt(fan)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_linear_kernel() -> nn.initializers.Initializer:
    """torch Linear weight init (kaiming_uniform a=sqrt(5)) = U(±1/sqrt(fan_in)); Flax kernels are (in, out)."""
    return lambda key, shape, dtype=jnp.float32: torch_uniform(shape[0])(key, shape, dtype)


def torch_dense(features: int, fan_in: int, dtype: Any, name: str) -> nn.Dense:
    """A Dense with torch.nn.Linear's init (fan_in is the input width: U(±1/sqrt(fan_in)) for weight and bias)."""
    return nn.Dense(features, kernel_init=torch_linear_kernel(), bias_init=torch_uniform(fan_in), dtype=dtype,
                    name=name)


def embed_tokens(module: nn.Module, input_ids: jax.Array) -> jax.Array:
    """The student's token embedding ('embed', torch's N(0, 1) init) in the module's compute dtype."""
    return nn.Embed(module.vocab_size, module.embed_dim, embedding_init=nn.initializers.normal(1.0),
                    dtype=module.dtype, name="embed")(input_ids)
