"""The one place that turns a dtype setting ("float32", "bfloat16" or "auto") into a jnp dtype.

"auto" picks per backend, from what was measured rather than what is fashionable:
- cpu: everything float32. On the 2-core test machine XLA:CPU ran bf16 slower than fp32 (gpt2 LoRA step
  490 vs 396 ms; student step 106 vs 96 ms), and fp32 is what the PyTorch parity tests check.
- gpu / tpu: the GPT-2 teacher computes in bfloat16 and stores its frozen base in bfloat16 (a plain JAX build on
  an H200 ran the gpt2 LoRA step in 13.5 ms vs 27.8 ms fp32, ../shared/docs/PEER_BENCH.md); LoRA factors, heads
  and optimizer state stay float32 whatever the compute dtype. The RNN student stays float32: a bf16 `nn.RNN`
  scan was 8x slower than fp32 on that H200 (its per-step matmuls are tiny, so bf16 buys no bandwidth and
  costs conversions inside the sequential loop). TPU figures are not measured here; bf16 there follows the MXU.
"""
from __future__ import annotations

import logging
from typing import Literal

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

Role = Literal["compute", "base", "student"]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
AUTO: dict[str, dict[str, str]] = {
    "cpu": {"compute": "float32", "base": "float32", "student": "float32"},
    "gpu": {"compute": "bfloat16", "base": "bfloat16", "student": "float32"},
    "tpu": {"compute": "bfloat16", "base": "bfloat16", "student": "float32"},
}
ROLE_KEYS = {"compute": "model.dtype", "base": "model.base_dtype", "student": "student.dtype"}


def resolve(name: str, role: Role, backend: str | None = None) -> str:
    """The dtype name `name` means for `role` on `backend` (default: JAX's default backend)."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"{ROLE_KEYS[role]}={name!r}: expected one of auto, {', '.join(DTYPES)}")
        return name
    backend = backend or jax.default_backend()
    table = AUTO.get("gpu" if backend in ("cuda", "rocm") else backend)
    if table is None:  # an unmeasured platform: the exact choice
        log.warning("%s=auto: no measured choice for backend %r, using float32", ROLE_KEYS[role], backend)
        return "float32"
    return table[role]


def dtype(name: str, role: Role, backend: str | None = None) -> jnp.dtype:
    """`resolve` as a jnp dtype."""
    return DTYPES[resolve(name, role, backend)]
