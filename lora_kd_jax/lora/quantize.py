"""QLoRA's frozen kernels (`lora.quantize`): NF4 and int8 storage, dequantized inside the jitted step.

Every frozen linear kernel of the transformer blocks is stored quantized (not the embeddings, norms, the head, the
LoRA factors, or a module trained in full); each layer dequantizes its own kernel as it runs (`models.modules.layers.
kernel_value`), in the run's compute dtype. Both schemes work on the PyTorch-layout weight W (out, in), row-major: a
kernel stored (in, out) (`nn.Dense`'s layout: BERT, RoBERTa, Llama) is transposed first, GPT-2's (out, in) kernel is
W itself (transformers' bitsandbytes integration transposes PyTorch's Conv1D weight to the same W).

nf4   bitsandbytes' `quantize_4bit(W, blocksize=64, quant_type="nf4")`: blocks of 64 consecutive values of W
      (the last one partial), absmax per block (float32), each value x * (1 / absmax) (the partial block: x / absmax)
      clamped to [-1, 1] and rounded to the nearest of the 16 NF4 values (a tie goes to the lower one: torch's
      bucketize over the midpoints); two codes per byte, the first in the high nibble. Dequantized: NF4[code] * absmax
      (float32), then the compute dtype. `lora.double_quant` (bitsandbytes' compress_statistics): the absmax values
      less their mean (the offset) are quantized again in blocks of 256 with bitsandbytes' signed 8-bit dynamic
      code, by the same rule (absmax2 float32 per block), and dequantized as DYNAMIC[q] * absmax2 + offset.
      The rule is bitsandbytes' PyTorch kernel's, which its CUDA kernel follows; its native CPU kernel
      (quantize_blockwise on float32 CPU tensors) searches approximately (0.094% of values get a neighbour of the
      nearest code: docs/qlora.md), so no nearest-code rule equals it. The offset is
      the mean summed in float64 and rounded to float32; torch's float32 sum can differ in the last bit (its
      order depends on the CPU). `quantize_nf4(..., offset=)` takes a given offset (a bitsandbytes quant state's).
int8  LLM.int8()'s weight format (`bitsandbytes.functional.int8_vectorwise_quant`, what Linear8bitLt stores): per row
      of W (output feature) s = max|W_row| (float32), q = round(W * (127 * (1 / s))) (half to even; torch's 127.0 / s
      is 127 times the reciprocal) as int8; dequantized
      (bitsandbytes' int8_vectorwise_dequant) as q * s * (1/127), float32. Only the weight is quantized: the
      layer's matmul runs in the compute dtype on the dequantized weight (LLM.int8() also quantizes the
      activations; this does not).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

Params = dict[str, Any]
SCHEMES = ("none", "nf4", "int8")
NF4_BLOCK, ABSMAX_BLOCK = 64, 256
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)  # bitsandbytes' get_4bit_type("nf4")
INT8_SCALE = np.float32(7.874015718698502e-3)  # bitsandbytes' 1/127 of int8_vectorwise_dequant


def _linspace(n: int) -> np.ndarray:
    """torch.linspace(0.1, 1, n, dtype=float32) on CPU: a float32 step, the halves counted from either end."""
    step = np.float32((np.float32(1) - np.float32(0.1)) / np.float32(n - 1))
    i = np.arange(n)
    lo = np.float64(np.float32(0.1)) + i * np.float64(step)
    hi = 1.0 - (n - 1 - i) * np.float64(step)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed=True): the 256 values of the signed 8-bit dynamic type, sorted."""
    data: list[float] = [0.0, 1.0]
    for i in range(7):
        b = _linspace(2 ** i + 1)
        means = ((b[:-1] + b[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (-6 + i))
        data += list((scale * means).astype(np.float32)) + list((-scale * means).astype(np.float32))
    return np.sort(np.array(data, np.float32))


DYNAMIC = dynamic_code()


def out_in(kernel: jax.Array, layout: str) -> jax.Array:
    return kernel if layout == "out_in" else kernel.T


def _from_out_in(w: jax.Array, layout: str) -> jax.Array:
    return w if layout == "out_in" else w.T


@struct.dataclass
class NF4Kernel:
    """A kernel stored in NF4 (see the module doc). `shape` is the kernel's own (as it would be stored unquantized),
    so code that reads shapes (targets, parameter counts) sees the kernel."""

    packed: jax.Array  # uint8 (ceil(n / 2),)
    absmax: jax.Array  # float32 (blocks,); uint8 (blocks,) with double quantization
    shape: tuple[int, int] = struct.field(pytree_node=False)
    layout: str = struct.field(pytree_node=False, default="out_in")
    dtype: Any = struct.field(pytree_node=False, default="float32")  # what `dequantize` returns
    absmax2: jax.Array | None = None  # double quantization: float32 (ceil(blocks / 256),)
    offset: jax.Array | None = None  # double quantization: float32 ()

    def block_absmax(self) -> jax.Array:
        """The float32 absmax of every block of 64 (double quantization undone)."""
        if self.absmax2 is None:
            return self.absmax
        n = self.absmax.shape[0]
        vals = jnp.asarray(DYNAMIC)[self.absmax.astype(jnp.int32)]
        p = blockwise(vals, self.absmax2, ABSMAX_BLOCK, n)
        # bitsandbytes rounds the product, then the sum. Inside jit, LLVM would contract p + offset into one FMA
        # (one rounding; an optimization barrier does not stop it) unless p has a second use: (p - p) is that use,
        # and adds an exact 0 (tests/test_qlora.py checks the jitted values bit for bit).
        return (p + self.offset) + (p - p)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        n = self.shape[0] * self.shape[1]
        codes = jnp.stack([self.packed >> 4, self.packed & 15], axis=-1).reshape(-1)[:n]
        w = blockwise(jnp.asarray(NF4)[codes.astype(jnp.int32)], self.block_absmax(), NF4_BLOCK, n)
        w = w.reshape(self.shape if self.layout == "out_in" else self.shape[::-1])
        return _from_out_in(w, self.layout).astype(dtype or self.dtype)


@struct.dataclass
class Int8Kernel:
    """A kernel stored as LLM.int8()'s row-wise int8 weight (see the module doc)."""

    data: jax.Array  # int8 (out, in)
    scale: jax.Array  # float32 (out,): max |W_row|
    shape: tuple[int, int] = struct.field(pytree_node=False)
    layout: str = struct.field(pytree_node=False, default="out_in")
    dtype: Any = struct.field(pytree_node=False, default="float32")

    def dequantize(self, dtype: Any = None) -> jax.Array:
        w = self.data.astype(jnp.float32) * self.scale[:, None] * jnp.float32(INT8_SCALE)
        return _from_out_in(w, self.layout).astype(dtype or self.dtype)


Quantized = (NF4Kernel, Int8Kernel)


def is_quantized(x: Any) -> bool:
    return isinstance(x, Quantized)


def value(kernel: Any, dtype: Any = None) -> Any:
    """A kernel as an array: a quantized one dequantized (in `dtype`, default its own), any other as it is."""
    return kernel.dequantize(dtype) if is_quantized(kernel) else kernel


def blockwise(vals: jax.Array, scales: jax.Array, block: int, n: int) -> jax.Array:
    """vals[i] * scales[i // block] for the n values (the last block may be partial), float32."""
    blocks = scales.shape[0]
    padded = jnp.pad(vals.astype(jnp.float32), (0, blocks * block - n))
    return (padded.reshape(blocks, block) * scales[:, None]).reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=("block",))
def _codes(x: jax.Array, code: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """(uint8 index of the nearest code value, absmax per block) of a float32 vector, as bitsandbytes' quantize_4bit
    and quantize_blockwise compute them (its PyTorch kernels; CUDA's binary search picks the same but for exact
    ties): x * (1 / absmax) (the partial last block: x / absmax), clamped to [-1, 1], bucketed by the midpoints of
    the sorted code (a value on a midpoint takes the lower code)."""
    n = x.shape[0]
    blocks = -(-n // block)
    xb = jnp.pad(x, (0, blocks * block - n)).reshape(blocks, block)
    absmax = jnp.max(jnp.abs(xb), axis=1)
    safe = jnp.maximum(absmax, jnp.float32(1e-38))[:, None]
    partial = (jnp.arange(blocks) >= n // block)[:, None]
    inv = jax.lax.optimization_barrier(jnp.float32(1) / safe)  # XLA would fold x * (1 / s) into x / s
    scaled = jnp.clip(jnp.where(partial, xb / safe, xb * inv), -1, 1).reshape(-1)[:n]
    bounds = (code[:-1] + code[1:]) / jnp.float32(2)
    return jnp.searchsorted(bounds, scaled, side="left").astype(jnp.uint8), absmax


@functools.partial(jax.jit, static_argnames=("layout",))
def _nf4(kernel: jax.Array, layout: str) -> tuple[jax.Array, jax.Array]:
    """(packed codes, absmax) of a kernel: bitsandbytes' quantize_4bit(W, blocksize=64, quant_type="nf4")."""
    x = out_in(kernel.astype(jnp.float32), layout).reshape(-1)
    codes, absmax = _codes(x, jnp.asarray(NF4), NF4_BLOCK)
    codes = jnp.pad(codes, (0, x.shape[0] % 2))
    return (codes[0::2] << 4) | codes[1::2], absmax


def _mean(x: jax.Array) -> jax.Array:
    """The float32 mean of a float32 vector, summed in float64 (on the host; deterministic on any mesh)."""
    host = lambda v: np.asarray(np.asarray(v, np.float64).mean(), np.float32)  # noqa: E731
    return jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.float32), x)


def quantize_nf4(kernel: jax.Array, *, layout: str = "out_in", double_quant: bool = False, dtype: Any = "float32",
                 offset: jax.Array | float | None = None) -> NF4Kernel:
    """`kernel` (float, stored in `layout`) in NF4; see the module doc."""
    packed, absmax = _nf4(kernel, layout)
    q = NF4Kernel(packed, absmax, tuple(kernel.shape), layout, dtype)
    if not double_quant:
        return q
    off = _mean(absmax) if offset is None else jnp.asarray(offset, jnp.float32)
    codes, absmax2 = _codes(absmax - off, jnp.asarray(DYNAMIC), ABSMAX_BLOCK)
    return q.replace(absmax=codes, absmax2=absmax2, offset=off)


@functools.partial(jax.jit, static_argnames=("layout", "dtype"))
def quantize_int8(kernel: jax.Array, *, layout: str = "out_in", dtype: Any = "float32") -> Int8Kernel:
    """`kernel` as LLM.int8()'s row-wise int8 weight; see the module doc (an all-zero row stays zero)."""
    w = out_in(kernel.astype(jnp.float32), layout)
    scale = jnp.max(jnp.abs(w), axis=1)
    # torch's 127.0 / scale: 127 * (1 / scale) (a scalar over a tensor); kept apart from w by a barrier
    factor = jax.lax.optimization_barrier(jnp.float32(127.0) * jax.lax.optimization_barrier(1 / scale))
    q = jnp.round(w * factor[:, None])
    q = jnp.where(scale[:, None] > 0, q, 0).astype(jnp.int8)
    return Int8Kernel(q, scale, tuple(kernel.shape), layout, dtype)


def quantizer(scheme: str, *, layout: str, double_quant: bool, dtype: Any) -> Callable[[jax.Array], Any]:
    if scheme == "nf4":
        return functools.partial(quantize_nf4, layout=layout, double_quant=double_quant, dtype=dtype)
    if scheme == "int8":
        return functools.partial(quantize_int8, layout=layout, dtype=dtype)
    raise ValueError(f"lora.quantize={scheme!r}: expected one of {', '.join(SCHEMES)}")


def block_kernel(path: tuple[str, ...], leaf: Any, blocks: tuple[str, ...]) -> bool:
    """Is this leaf of a base tree (path without the family prefix) a linear kernel of a transformer block?"""
    return (path[:len(blocks)] == blocks and path[-1] == "kernel" and len(getattr(leaf, "shape", ())) == 2
            and not is_quantized(leaf))


def quantize_base(base: Params, scheme: str, *, blocks: tuple[str, ...], layout: str, double_quant: bool = False,
                  dtype: Any = "float32") -> Params:
    """`base` (a family's base tree, or any subtree of it holding the same paths) with every block kernel
    quantized by `scheme` (none: unchanged), one at a time: a kernel held on the host (numpy, as a QLoRA run loads
    them) is on the device in float32 only while it is quantized. Works on ShapeDtypeStructs under
    `jax.eval_shape`."""
    if scheme == "none":
        return base
    quant = quantizer(scheme, layout=layout, double_quant=double_quant, dtype=dtype)

    def one(v: Any) -> Any:  # a host kernel goes to the device alone: its float32 copy is gone before the next
        q = quant(v)
        return jax.block_until_ready(q) if isinstance(v, np.ndarray) else q

    flat = traverse_util.flatten_dict(base)
    return traverse_util.unflatten_dict({p: one(v) if block_kernel(p, v, blocks) else v for p, v in flat.items()})


def dequantize_tree(tree: Params, dtype: Any = jnp.float32) -> tuple[Params, int]:
    """(`tree` with every quantized kernel replaced by its dequantized weights in `dtype`, how many there were)."""
    flat = traverse_util.flatten_dict(tree)
    n = sum(is_quantized(v) for v in flat.values())
    return traverse_util.unflatten_dict({p: value(v, dtype) for p, v in flat.items()}), n


def nbytes(tree: Any) -> int:
    """Bytes of every array leaf (quantized kernels: their codes and statistics), from shapes alone."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
