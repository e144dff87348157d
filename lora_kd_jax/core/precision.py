"""The one place that turns a dtype setting ("float32", "bfloat16" or "auto") into a dtype.

"auto" picks per backend from measurements (the figures are in the README's performance section):
- cpu: everything float32 (XLA:CPU ran bf16 slower, and fp32 is what the PyTorch parity tests check).
- gpu / tpu: the GPT-2 teacher computes in bfloat16; LoRA factors, heads and optimizer state stay float32 whatever
  the compute dtype. The RNN student stays float32: its per-step matmuls are tiny, so bf16 buys no bandwidth and
  costs conversions inside the sequential scan.
- model.base_dtype=auto stores the frozen base in the resolved compute dtype (`model.dtype=float32` alone gives an
  fp32 model, e.g. for parity checks on a GPU).

A run dir's config.yaml records the resolved dtypes (`resolved_config`), so a run started in bf16 on a GPU is not
silently continued in fp32 elsewhere.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import jax
import jax.numpy as jnp

from lora_kd_jax.core.config import Config, ModelConfig, StudentConfig

log = logging.getLogger(__name__)

Role = Literal["compute", "base", "student"]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
AUTO: dict[str, dict[str, str]] = {  # backend -> role -> dtype (base: see base_dtype)
    "cpu": {"compute": "float32", "student": "float32"},
    "gpu": {"compute": "bfloat16", "student": "float32"},
    "tpu": {"compute": "bfloat16", "student": "float32"},
}
ROLE_KEYS = {"compute": "model.dtype", "base": "model.base_dtype", "student": "student.dtype"}


def resolve(name: str, role: Role, backend: str | None = None) -> str:
    """The dtype name `name` means for `role` on `backend` (default: JAX's default backend). For the frozen base
    use `base_dtype`, whose auto depends on the compute dtype."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"{ROLE_KEYS[role]}={name!r}: expected one of auto, {', '.join(DTYPES)}")
        return name
    if role == "base":
        raise ValueError("model.base_dtype=auto follows the compute dtype: resolve it with precision.base_dtype")
    backend = backend or jax.default_backend()
    table = AUTO.get("gpu" if backend in ("cuda", "rocm") else backend)
    if table is None:  # an unmeasured platform: the exact choice
        log.warning("%s=auto: no measured choice for backend %r, using float32", ROLE_KEYS[role], backend)
        return "float32"
    return table[role]


def compute_dtype(model: ModelConfig, backend: str | None = None) -> str:
    return resolve(model.dtype, "compute", backend)


def base_dtype(model: ModelConfig, backend: str | None = None) -> str:
    """Storage dtype of the frozen base: model.base_dtype, or (auto) the resolved compute dtype."""
    return compute_dtype(model, backend) if model.base_dtype == "auto" else resolve(model.base_dtype, "base")


def student_dtype(student: StudentConfig, backend: str | None = None) -> str:
    return resolve(student.dtype, "student", backend)


def dtype(name: str, role: Role, backend: str | None = None) -> jnp.dtype:
    """`resolve` as a jnp dtype."""
    return DTYPES[resolve(name, role, backend)]


def resolved_config(cfg: Config, backend: str | None = None) -> Config:
    """`cfg` with every "auto" dtype replaced by what it means on `backend` (what a run dir records)."""
    model = dataclasses.replace(cfg.model, dtype=compute_dtype(cfg.model, backend),
                                base_dtype=base_dtype(cfg.model, backend))
    student = dataclasses.replace(cfg.student, dtype=student_dtype(cfg.student, backend))
    return dataclasses.replace(cfg, model=model, student=student)
