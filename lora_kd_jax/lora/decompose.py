"""PiSSA and OLoRA: LoRA factors taken from the frozen weight itself, the base keeping the residual.

Both follow PEFT's `pissa_init` / `olora_init` on the (out, in) weight W of each adapted layer (float32):

    pissa: W = V S U^T (SVD, singular values descending); S_r = S[:r] / scale;
           A = diag(sqrt S_r) U_r^T (r, in),  B = V_r diag(sqrt S_r) (out, r)
    olora: W = Q R (QR);  A = R[:r] (r, in),  B = Q[:, :r] (out, r)
    residual = W - scale * B A   (stored in the kernel's dtype: the base the run trains on and checkpoints)

so that at init the residual plus the adapter is W again. Here a = A^T, b = B^T (`transform`'s convention).
PEFT's own `olora_init` ignores fan_in_fan_out, so on GPT-2's Conv1D it factorises the (in, out) matrix and fails on
non-square layers; this module factorises the (out, in) weight for every layer, as PEFT does for nn.Linear.
The SVD is jax's (on CPU its singular vectors agree with torch.linalg.svd's, signs included, on the tested weights).
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_kd_jax.lora import dora

Params = dict[str, Any]


def factorise(w: jnp.ndarray, rank: int, scale: float, method: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(A (r, in), B (out, r)) of an (out, in) float32 weight, PEFT's pissa_init / olora_init."""
    if method == "pissa":
        v, s, uh = jnp.linalg.svd(w, full_matrices=False)
        sr = s[:rank] / scale
        return jnp.sqrt(sr)[:, None] * uh[:rank], v[:, :rank] * jnp.sqrt(sr)[None, :]
    if method == "olora":
        q, r = jnp.linalg.qr(w)
        return r[:rank], q[:, :rank]
    raise ValueError(f"unknown decomposition {method!r}: expected pissa or olora")


def decompose(base: Params, spec: Any, value: Callable[[tuple[str, ...], Any], Any] | None = None
              ) -> tuple[Params, Params]:
    """(residual base, initial factors {'a', 'b'}) for every layer of `spec` (spec.init: pissa | olora), of each
    kernel's `value(path, kernel)` (QLoRA: the dequantized weight, whose residual is quantized again, as PEFT does
    on bitsandbytes layers). A kernel held on the host (numpy) gets its residual on the host."""
    flat = dict(traverse_util.flatten_dict(base))
    factors = {}
    for path in spec.paths:
        kernel = flat[path + ("kernel",)]
        w = dora.out_in(kernel if value is None else value(path + ("kernel",), kernel), spec.kernel_layout)
        A, B = factorise(w, spec.rank, spec.scale, spec.init)
        residual = w - spec.scale * (B @ A)
        residual = (residual if spec.kernel_layout == "out_in" else residual.T).astype(kernel.dtype)
        flat[path + ("kernel",)] = np.asarray(residual) if isinstance(kernel, np.ndarray) else residual
        factors[path + ("a",)] = A.T
        factors[path + ("b",)] = B.T
    return traverse_util.unflatten_dict(flat), traverse_util.unflatten_dict(factors)
