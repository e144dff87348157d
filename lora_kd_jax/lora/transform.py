"""LoRA as a transformation of a parameter tree and of an apply function.

`LoraSpec` is built from parameter paths (which kernels get adapters); `init_lora` makes the factor tree;
`lora_context` wraps any linen `apply` so that each targeted layer adds the factored low-rank term
`scale * dropout(x) @ a @ b` to its frozen output (no dense W + dW is ever formed, so no dense weight gradient
either); `merge` folds the factors into plain weights for inference and export.

Factor convention (every init): `a` is (in, rank), `b` is (rank, out), delta(x) = scale * x @ a @ b.
  seed init (the original): a = U (in, r), b = V^T with V (out, r), both Xavier-uniform, scale 1.
  standard init (PEFT):     a = A^T, b = B^T, A Kaiming-uniform(a=sqrt 5), B zero, scale alpha / rank
                            (lora.scaling=rslora: alpha / sqrt(rank)).
  pissa / olora init:       factors of the frozen weight itself (`decompose`), which then holds the residual.
The DoRA variant (`dora`) adds a magnitude `m` (out,) per adapted layer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_kd_jax.core.errors import UserError
from lora_kd_jax.lora import dora, quantize

Params = dict[str, Any]
Path = tuple[str, ...]
log = logging.getLogger(__name__)


class LoraTargetError(UserError, ValueError):
    """A target pattern matched no kernel, or the tree has no kernels to adapt."""
    label = "config error"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which layers carry adapters, and how the adapter computes. Static: safe to close over in jit."""

    paths: tuple[Path, ...]  # module paths (the kernel's parent) in a stable order
    shapes: tuple[tuple[int, int], ...]  # (in, out) of each adapted layer
    rank: int
    scale: float
    dropout: float
    init: str  # seed | standard | pissa | olora
    variant: str = "lora"  # lora | dora (then each layer's factors hold a magnitude 'm' too)
    kernel_layout: str = "out_in"  # how the adapted kernels are stored: (out, in) or (in, out)

    def index(self, path: Path) -> int | None:
        try:
            return self.paths.index(tuple(path))
        except ValueError:
            return None


def _matches(dotted: str, pattern: str) -> bool:
    """`attn.c_attn` matches `h.0.attn.c_attn` (dot-bounded suffix); glob characters are allowed too."""
    return dotted == pattern or dotted.endswith("." + pattern) or fnmatch.fnmatchcase(dotted, pattern)


def make_spec(base_params: Params, targets: Sequence[str], *, rank: int, alpha: float = 4.0,
              dropout: float = 0.0, init: str = "seed", kernel_layout: str = "out_in", scaling: str = "standard",
              variant: str = "lora") -> LoraSpec:
    """Select every 2-D `kernel` whose module path matches one of `targets`; fail on a pattern that matches none."""
    flat = traverse_util.flatten_dict(base_params)
    kernels = {k[:-1]: v.shape for k, v in flat.items() if k[-1] == "kernel" and len(v.shape) == 2}
    if not kernels:
        raise LoraTargetError("the parameter tree has no 2-D 'kernel' leaves to adapt")
    chosen: dict[Path, tuple[int, int]] = {}
    for pattern in targets:
        hits = [p for p in kernels if _matches(".".join(p), pattern)]
        if not hits:
            examples = ", ".join(sorted({".".join(p[2:]) if p[0] == "h" else ".".join(p) for p in kernels}))
            raise LoraTargetError(f"lora.targets: pattern '{pattern}' matches no kernel; kernels are named like "
                                  f"{examples}")
        for p in hits:
            out_dim, in_dim = kernels[p] if kernel_layout == "out_in" else kernels[p][::-1]
            chosen[p] = (in_dim, out_dim)
    order = sorted(chosen, key=lambda p: tuple((0, int(s)) if s.isdigit() else (1, s) for s in p))
    scale = 1.0 if init == "seed" else alpha / (math.sqrt(rank) if scaling == "rslora" else rank)
    return LoraSpec(paths=tuple(order), shapes=tuple(chosen[p] for p in order), rank=rank, scale=scale,
                    dropout=dropout, init=init, variant=variant, kernel_layout=kernel_layout)


def _xavier_uniform(key: jax.Array, shape: tuple[int, int], fan_sum: int) -> jax.Array:
    bound = math.sqrt(6.0 / fan_sum)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init_lora(spec: LoraSpec, key: jax.Array) -> Params:
    """The factor tree, nested like the base tree: {..path..: {'a': (in, r), 'b': (r, out)}}."""
    flat = {}
    for i, (path, (d_in, d_out)) in enumerate(zip(spec.paths, spec.shapes)):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        r = spec.rank
        if spec.init == "seed":  # U (in, r) and V (out, r), torch xavier_uniform_: bound sqrt(6 / (rows + cols))
            a = _xavier_uniform(ka, (d_in, r), d_in + r)
            b = _xavier_uniform(kb, (d_out, r), d_out + r).T
        else:  # PEFT: A (r, in) kaiming_uniform_(a=sqrt(5)) -> bound 1/sqrt(in); B zero
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(ka, (r, d_in), jnp.float32, -bound, bound).T
            b = jnp.zeros((r, d_out), jnp.float32)
        flat[path + ("a",)] = a
        flat[path + ("b",)] = b
    return traverse_util.unflatten_dict(flat)


def dropout_keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
    """(keep mask, exact keep probability) from 16-bit uniforms, two per 32-bit random word.

    Random bits dominate the cost of adapter dropout on CPU (threefry: ~11 ns per word); 16 bits per decision
    halve it. The keep probability is round((1 - rate) * 2^16) / 2^16 (|error| <= 7.7e-6) and the survivors are
    scaled by its exact inverse, so the layer stays unbiased: E[dropout(x)] = x.
    """
    threshold = int(round((1.0 - rate) * 65536))
    n = math.prod(shape)
    words = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n]
    return (halves < threshold).reshape(shape), threshold / 65536.0


def adapter_input(spec: LoraSpec, x: jax.Array, *, rng: jax.Array | None, deterministic: bool) -> jax.Array:
    """dropout(x) when training with lora.dropout, else x itself."""
    if not deterministic and spec.dropout > 0.0:
        if rng is None:
            raise ValueError("LoRA dropout is on (deterministic=False) but no rng was given")
        keep, keep_prob = dropout_keep_mask(rng, spec.dropout, x.shape)
        x = jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)
    return x


def lora_delta(spec: LoraSpec, factors: Params, x: jax.Array, *, rng: jax.Array | None, deterministic: bool,
               dtype: Any) -> jax.Array:
    """scale * dropout(x) @ a @ b, computed factored in the layer's compute dtype."""
    x = adapter_input(spec, x, rng=rng, deterministic=deterministic)
    # Flattened to 2-D: XLA:CPU runs the rank-r gradient dots (x^T dh) about twice as fast as on [B, L, in].
    x2 = x.reshape(-1, x.shape[-1]).astype(dtype)
    out = (x2 @ factors["a"].astype(dtype)) @ factors["b"].astype(dtype)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out * jnp.asarray(spec.scale, dtype) if spec.scale != 1.0 else out


def _subtree(tree: Params, path: Path) -> Params:
    for p in path:
        tree = tree[p]
    return tree


@contextlib.contextmanager
def lora_context(spec: LoraSpec, factors: Params, *, rng: jax.Array | None = None,
                 deterministic: bool = True) -> Iterator[None]:
    """Within this context, every targeted layer's __call__ returns frozen(x) + delta(x).

    Works on any linen model whose adapted layers are modules called as `layer(x)` and named by their
    parameter path (true for transformers' Flax GPT-2 Conv1D). Dropout keys: fold_in(rng, layer index).
    """

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        i = spec.index(context.module.path)
        if i is None:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        key = None if rng is None else jax.random.fold_in(rng, i)
        f = _subtree(factors, spec.paths[i])
        if spec.variant == "dora":
            x_d = adapter_input(spec, args[0], rng=key, deterministic=deterministic)
            m = context.module
            bias = m.get_variable("params", "bias") if m.has_variable("params", "bias") else None
            return dora.output(spec, f, x_d, y, quantize.value(m.get_variable("params", "kernel")), bias,
                               dropped=x_d is not args[0], dtype=y.dtype)
        delta = lora_delta(spec, f, args[0], rng=key,
                           deterministic=deterministic, dtype=y.dtype)
        return y + delta

    with nn.intercept_methods(interceptor):
        yield


def merge(base_params: Params, spec: LoraSpec, factors: Params, kernel_layout: str = "out_in") -> Params:
    """Plain weights: kernel + scale * a @ b (transposed for out_in layouts), DoRA's m / norm * (that) for the
    dora variant. The result has no LoRA. A quantized base (QLoRA) is merged into its dequantized weights (float32),
    every quantized kernel dequantized, as PEFT merges into a bitsandbytes layer's dequantized weight."""
    base_params, n = quantize.dequantize_tree(base_params)
    if n:
        log.warning("merging into the dequantized weights of %d quantized kernels (lora.quantize): the merged "
                    "checkpoint holds them in float32, not the original base's values", n)
    flat = dict(traverse_util.flatten_dict(base_params))
    for path in spec.paths:
        f = _subtree(factors, path)
        if spec.variant == "dora":
            flat[path + ("kernel",)] = dora.merged_kernel(flat[path + ("kernel",)], f, spec.scale, kernel_layout)
            continue
        delta = spec.scale * (f["a"].astype(jnp.float32) @ f["b"].astype(jnp.float32))  # (in, out)
        kernel = flat[path + ("kernel",)]
        update = delta.T if kernel_layout == "out_in" else delta
        flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def count(spec: LoraSpec) -> int:
    return sum(spec.rank * (d_in + d_out) + (d_out if spec.variant == "dora" else 0) for d_in, d_out in spec.shapes)
