"""The step core every trainer shares: the checkpointed train state, the per-step dropout key, and the guarded
jitted train step. LoRA, distillation and the RNN baseline differ only in the loss and the parameters they supply."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.training.trainable import apply_if_finite

Params = dict[str, Any]
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Any, Batch, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    trainable: Params
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data of the dropout key (checkpointable)


def init_state(trainable: Params, tx: optax.GradientTransformation, dropout_key: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                      rng=jax.random.key_data(dropout_key))


def step_key(state: TrainState) -> jax.Array:
    """A fresh dropout key per step, independent of how the run was split into sessions."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


@dataclasses.dataclass(frozen=True)
class Seeded:
    """How a step's arguments carry the seed axis: the state and the train batch have a leading axis of N seeds;
    `consts_axes` is the vmap `in_axes` of the constants (None: one copy shared by every seed, as the frozen base;
    or a pytree prefix such as {'teacher_logits': 0} for constants that differ per seed)."""

    consts_axes: Any = None


def make_guarded_step(loss_fn: LossFn, tx: optax.GradientTransformation, seeded: Seeded | None = None
                      ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
    """The one jitted train step: `loss_fn(trainable, consts, batch, rng) -> (mean loss, sums)` is differentiated
    w.r.t. the trainable tree only; a NaN/Inf loss skips the update (and is reported in the sums); the state is
    donated, so parameters and optimizer state are updated in place. With `seeded`, the same step runs under
    `jax.vmap` over the seed axis (compiled once for all seeds; the shared constants are not copied)."""

    def train_step(state: TrainState, consts: Any, batch: Batch) -> tuple[TrainState, dict]:
        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, consts, batch,
                                                                         step_key(state))
        trainable, opt_state = apply_if_finite(tx, loss, grads, state.opt_state, state.trainable)
        return (state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state),
                metrics_lib.guarded_step_sums(loss, state.step, sums))

    if seeded is not None:
        train_step = jax.vmap(train_step, in_axes=(0, seeded.consts_axes, 0))
    return jax.jit(train_step, donate_argnums=(0,))


def make_eval_step(logits_fn: Callable[[Params, Any, Batch], jax.Array], seeded: Seeded | None = None
                   ) -> Callable[[TrainState, Any, Batch], dict]:
    """The one jitted eval step: cross-entropy against the gold labels and confusion counts of
    `logits_fn(trainable, consts, batch)` (deterministic: no dropout). With `seeded`, every seed scores the same
    batch and the sums carry the seed axis."""

    def eval_step(state: TrainState, consts: Any, batch: Batch) -> dict:
        logits = logits_fn(state.trainable, consts, batch)
        _, total = metrics_lib.cross_entropy(logits, batch["labels"], batch["weights"])
        return metrics_lib.batch_sums(logits, batch["labels"], batch["weights"], total)

    if seeded is not None:
        eval_step = jax.vmap(eval_step, in_axes=(0, seeded.consts_axes, None))
    return jax.jit(eval_step)
