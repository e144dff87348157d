"""The jitted steps every trainer shares. LoRA, distillation and the RNN baseline differ only in their model (the
one interface) and their objective; the frozen partition arrives as `consts['frozen']` (held once, never donated,
shared by every seed), anything else an objective reads (cached teacher logits) beside it in `consts`."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.models.interface import ClassifierModel
from lora_kd_jax.training.state import TrainState, combine, step_key

Params = dict[str, Any]
Batch = dict[str, jax.Array]
# (logits, consts, batch) -> (batch mean, batch sum) of the training loss
Objective = Callable[[jax.Array, Any, Batch], tuple[jax.Array, jax.Array]]


def cross_entropy_objective(logits: jax.Array, consts: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy on the gold labels (a one-output regression head: squared error, `supervised_loss`): the LoRA
    runs' and the RNN baseline's training loss."""
    return metrics_lib.supervised_loss(logits, batch["labels"], batch["weights"])


@dataclasses.dataclass(frozen=True)
class Seeded:
    """How a step's arguments carry the seed axis: the state and the train batch have a leading axis of N seeds;
    `consts_axes` is the vmap `in_axes` of the constants (None: one copy shared by every seed, as the frozen base;
    or a pytree prefix such as {'frozen': None, 'teacher_logits': 0} for constants that differ per seed)."""

    consts_axes: Any = None


def keep_like(tree: Params, like: Params) -> Params:
    """The leaves of `tree` at the paths `like` has (the trainable part of a whole-tree update)."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: flat[k] for k in traverse_util.flatten_dict(like)})


def apply_if_finite(tx: optax.GradientTransformation, loss: jax.Array, grads: tuple[Params, Params],
                    opt_state: optax.OptState, trainable: Params, frozen: Params) -> tuple[Params, optax.OptState]:
    """The optimizer step over the whole tree (`grads` = (trainable, frozen) gradients; the frozen ones reach
    `set_to_zero` and their zero update is dropped), taken only when the loss is finite.

    A `lax.cond` rather than a select over old and new trees: the update runs once, in place on donated buffers,
    instead of materialising both versions (for the 40M-parameter student the select cost a third of the step).
    """
    def update(operands):
        g_train, g_frozen, state, p = operands
        updates, state = tx.update(combine(g_train, g_frozen), state, combine(p, frozen))
        return optax.apply_updates(p, keep_like(updates, p)), state

    def skip(operands):
        return operands[3], operands[2]

    return jax.lax.cond(jnp.isfinite(loss), update, skip, (*grads, opt_state, trainable))


def loss_and_sums(model: ClassifierModel, params: Params, consts: Any, batch: Batch, objective: Objective, *,
                  deterministic: bool, rng: jax.Array | None) -> tuple[jax.Array, dict]:
    """(mean objective, metric sums) of the model's logits on one batch: what the train step differentiates."""
    logits = model.logits(params, batch["input_ids"], batch["attention_mask"], deterministic=deterministic, rng=rng)
    mean, total = objective(logits, consts, batch)
    return mean, metrics_lib.batch_sums(logits, batch["labels"], batch["weights"], total)


def make_train_step(model: ClassifierModel, tx: optax.GradientTransformation, objective: Objective,
                    seeded: Seeded | None = None) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
    """The one jitted train step: the model's logits in train mode (dropout key from `step_key`),
    `objective(logits, consts, batch)`, gradients of the whole tree, the optimizer update of the trainable leaves;
    a NaN/Inf loss skips the update (and is reported in the sums); the state is donated, so parameters and
    optimizer state are updated in place. With `seeded`, the same step runs under `jax.vmap` over the seed axis
    (compiled once for all seeds; the shared constants are not copied)."""

    def train_step(state: TrainState, consts: Any, batch: Batch) -> tuple[TrainState, dict]:
        def loss_fn(trainable: Params, frozen: Params) -> tuple[jax.Array, dict]:
            return loss_and_sums(model, combine(trainable, frozen), consts, batch, objective, deterministic=False,
                                 rng=step_key(state))

        frozen = consts["frozen"]
        (loss, sums), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(state.trainable, frozen)
        trainable, opt_state = apply_if_finite(tx, loss, grads, state.opt_state, state.trainable, frozen)
        return (state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state),
                metrics_lib.guarded_step_sums(loss, state.step, sums))

    if seeded is not None:
        train_step = jax.vmap(train_step, in_axes=(0, seeded.consts_axes, 0))
    return jax.jit(train_step, donate_argnums=(0,))


def make_eval_step(model: ClassifierModel, seeded: Seeded | None = None) -> Callable[[TrainState, Any, Batch], dict]:
    """The one jitted eval step: `metrics.eval_sums` of the model's eval-mode logits (no dropout). With `seeded`,
    every seed scores the same batch and the sums carry the seed axis."""

    def eval_step(state: TrainState, consts: Any, batch: Batch) -> dict:
        params = combine(state.trainable, consts["frozen"])
        return metrics_lib.eval_sums(model.logits(params, batch["input_ids"], batch["attention_mask"]), batch)

    if seeded is not None:
        eval_step = jax.vmap(eval_step, in_axes=(0, seeded.consts_axes, None))
    return jax.jit(eval_step)
