"""DoRA (weight-decomposed LoRA), computed as PEFT's `DoraLinearLayer` does.

A DoRA layer holds, beside the factors a (in, r) and b (r, out), a trained magnitude m (out,) per output feature:

    W' = m / ||W + scale * (a b)^T||_row  *  (W + scale * (a b)^T)          (W: the layer's (out, in) weight)

The norm runs over the input features of each output feature, and it is a constant for the gradient (PEFT detaches
it, as the DoRA paper's section 4.3 suggests): only m, a and b receive gradients, and the norm's own weight
(W + scale * a b) is built from detached factors. The layer's output is then PEFT's

    y = x W^T + bias + (g - 1) * (x_d W^T) + g * scale * (x_d a b),     g = m / norm

with x_d the adapter input after dropout: without dropout x_d W^T is the frozen output minus its bias (no second
matmul), with dropout PEFT runs the frozen weight again on x_d, and so does this. The update itself stays factored
(x_d @ a @ b); the norm needs one layer's dense weight, built inside that layer's call and nowhere else.
At init m = the norm, so the adapted layer starts as the frozen one whatever the factors are.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def out_in(kernel: jax.Array, layout: str) -> jax.Array:
    """The kernel as (out, in), float32."""
    k = kernel.astype(jnp.float32)
    return k if layout == "out_in" else k.T


def weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float, layout: str) -> jax.Array:
    """||W + scale * (a b)^T|| per output feature (out,), float32, with no gradient (PEFT detaches it)."""
    a, b = jax.lax.stop_gradient(a.astype(jnp.float32)), jax.lax.stop_gradient(b.astype(jnp.float32))
    w = jax.lax.stop_gradient(out_in(kernel, layout)) + scale * (a @ b).T
    return jax.lax.stop_gradient(jnp.linalg.norm(w, axis=1))


def add_magnitudes(base: Params, spec: Any, factors: Params,
                   value: Callable[[tuple[str, ...], Any], Any] | None = None) -> Params:
    """`factors` with each layer's magnitude m = its weight norm at these factors (PEFT's init), the weight being
    `value(path, kernel)` (QLoRA: the dequantized kernel the run computes with, as PEFT on bitsandbytes layers)."""
    out = jax.tree.map(lambda v: v, factors)
    for path in spec.paths:
        kernel, f = _at(base, path)["kernel"], _at(out, path)
        kernel = kernel if value is None else value(path + ("kernel",), kernel)
        f["m"] = weight_norm(kernel, f["a"], f["b"], spec.scale, spec.kernel_layout)
    return out


def output(spec: Any, f: Params, x_d: jax.Array, y: jax.Array, kernel: jax.Array, bias: jax.Array | None,
           dropped: bool, dtype: Any) -> jax.Array:
    """The DoRA layer's output from the frozen one `y` (= x W^T + bias) and the adapter input `x_d` (after
    dropout; `dropped` says whether dropout changed it)."""
    g = f["m"].astype(jnp.float32) / weight_norm(kernel, f["a"], f["b"], spec.scale, spec.kernel_layout)
    g = g.astype(dtype)
    x2 = x_d.reshape(-1, x_d.shape[-1]).astype(dtype)
    lora = ((x2 @ f["a"].astype(dtype)) @ f["b"].astype(dtype)).reshape(*x_d.shape[:-1], -1)
    if dropped:  # PEFT: the frozen weight once more, on the dropped input, without bias
        base = (x2 @ out_in(kernel, spec.kernel_layout).T.astype(dtype)).reshape(lora.shape)
    else:
        base = y if bias is None else y - bias.astype(dtype)
    return y + (g - 1) * base + g * (lora * jnp.asarray(spec.scale, dtype))


def merged_kernel(kernel: jax.Array, f: Params, scale: float, layout: str) -> jax.Array:
    """The plain kernel of a DoRA layer (PEFT's merge): m / norm * (W + scale * (a b)^T), in `kernel`'s layout and
    dtype; the bias is unchanged."""
    w = out_in(kernel, layout) + scale * (f["a"].astype(jnp.float32) @ f["b"].astype(jnp.float32)).T
    g = f["m"].astype(jnp.float32) / jnp.linalg.norm(w, axis=1)
    w = g[:, None] * w
    return (w if layout == "out_in" else w.T).astype(kernel.dtype)


def _at(tree: Params, path: tuple[str, ...]) -> Params:
    for p in path:
        tree = tree[p]
    return tree
