"""The one place that decides which parameters train, and the optimizer that enforces it.

Trainable: every LoRA factor, every LayerNorm scale and bias, the classification head. Frozen: everything
else (token and position embeddings, attention/MLP kernels and biases). The decision is made from parameter
paths; `optax.multi_transform` gives frozen leaves `set_to_zero`, and the train step differentiates only the
trainable partition, so no gradient is ever formed for a frozen weight.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lora_kd_jax.training import precision

Params = dict[str, Any]
TRAINABLE, FROZEN = "trainable", "frozen"


def is_trainable(path: tuple[str, ...]) -> bool:
    """LoRA factors, the head, and LayerNorms (GPT-2 names them ln_1, ln_2, ln_f)."""
    return path[0] in ("lora", "head") or any(p.startswith("ln_") for p in path)


def param_labels(params: Params) -> Params:
    """A tree like `params` with 'trainable' or 'frozen' at every leaf."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: TRAINABLE if is_trainable(k) else FROZEN for k in flat})


def partition(params: Params) -> tuple[Params, Params]:
    """(trainable, frozen): two nested dicts holding disjoint leaves of `params`."""
    flat = traverse_util.flatten_dict(params)
    train = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def combine(trainable: Params, frozen: Params) -> Params:
    """Inverse of `partition`."""
    flat = dict(traverse_util.flatten_dict(frozen))
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def cast_frozen(frozen: Params, dtype: str) -> Params:
    """Store the frozen base in `dtype`, "float32" or "bfloat16" (halves its memory and bandwidth); a config's
    setting is resolved by `precision.base_dtype(cfg.model)`. Trainable leaves are not touched (they stay fp32)."""
    target = precision.dtype(dtype, "base")
    if target == jnp.float32:
        return frozen
    return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)


def adam(lr: float) -> optax.GradientTransformation:
    """Adam with the original's torch.optim.Adam defaults: the student's optimizer, and LoRA's on trainable leaves."""
    return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def make_optimizer(lr: float) -> optax.GradientTransformation:
    """Adam on trainable leaves; frozen leaves get zero updates."""
    return optax.multi_transform({TRAINABLE: adam(lr), FROZEN: optax.set_to_zero()}, param_labels)


def apply_if_finite(tx: optax.GradientTransformation, loss: jax.Array, grads: Params, opt_state: optax.OptState,
                    params: Params) -> tuple[Params, optax.OptState]:
    """The optimizer step, taken only when the loss is finite (a NaN/Inf batch leaves params and state untouched).

    A `lax.cond` rather than a select over old and new trees: the update runs once, in place on donated buffers,
    instead of materialising both versions (for the 40M-parameter student the select cost a third of the step).
    """
    def update(operands):
        g, state, p = operands
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    def skip(operands):
        _, state, p = operands
        return p, state

    return jax.lax.cond(jnp.isfinite(loss), update, skip, (grads, opt_state, params))


@dataclasses.dataclass(frozen=True)
class ParamReport:
    total: int
    trainable: int

    @property
    def reduction(self) -> float:
        return 1.0 - self.trainable / self.total

    def __str__(self) -> str:
        return (f"params: total {self.total / 1e6:.2f}M ({self.total:,}), trainable {self.trainable / 1e6:.2f}M "
                f"({self.trainable:,}), reduction {100 * self.reduction:.2f}%")


def param_report(params: Params) -> ParamReport:
    """Counts from shapes alone, so it works on `jax.eval_shape` trees too."""
    flat = traverse_util.flatten_dict(params)
    size = lambda v: int(np.prod(v.shape))  # noqa: E731
    return ParamReport(total=sum(size(v) for v in flat.values()),
                       trainable=sum(size(v) for k, v in flat.items() if is_trainable(k)))

