"""The jitted steps every trainer shares. LoRA, distillation and the RNN baseline differ only in their model (the
one interface) and their objective; the frozen partition arrives as `consts['frozen']` (held once, never donated,
shared by every seed), anything else an objective reads (cached teacher logits) beside it in `consts`."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.models.interface import ClassifierModel, token_inputs
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

    def __hash__(self) -> int:  # a dict of axes is unhashable: hash its tree structure and leaves
        return hash((jax.tree.structure(self.consts_axes), tuple(jax.tree.leaves(self.consts_axes))))


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
    logits = model.logits(params, batch["input_ids"], batch["attention_mask"], deterministic=deterministic, rng=rng,
                          **token_inputs(batch))
    mean, total = objective(logits, consts, batch)
    return mean, metrics_lib.batch_sums(logits, batch["labels"], batch["weights"], total)


def step_scalars(grads: Params, step: jax.Array, lr: float | optax.Schedule | None) -> dict:
    """A step's learning rate (the schedule at this step; the optimizer's own count only lags it after a skipped
    non-finite batch) and the global norm of its trainable gradients (before any clipping): on device, read by the
    loop with the epoch's metrics (training.trace)."""
    rate = lr(step) if callable(lr) else (lr if lr is not None else jnp.nan)
    return {"lr": jnp.asarray(rate, jnp.float32), "grad_norm": optax.tree.norm(grads).astype(jnp.float32)}


def micro_batches(batch: Batch, k: int) -> Batch:
    """The batch as [k, B/k, ...]: micro-batch i holds rows i, i+k, i+2k, ... (strided, so the rows of each device
    of a data-parallel batch stay on it)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)


def accumulated_grads(model: ClassifierModel, objective: Objective, k: int, trainable: Params, consts: Any,
                      batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict, Params]:
    """(full-batch mean objective, metric sums, trainable gradients) of `batch` from `k` micro-batches run one after
    another under `lax.scan`: each differentiates its objective *sum* over the full batch's weight total, so the
    summed gradients are the full-batch mean's whatever the padding (a partial last batch's zero-weight rows count
    in no micro-batch's sum nor in the divisor). Only one micro-batch's activations live at a time. Micro-batch i
    draws its dropout from fold_in(rng, i)."""
    frozen = consts["frozen"]
    denom = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

    def micro_loss(p: Params, mb: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        logits = model.logits(combine(p, frozen), mb["input_ids"], mb["attention_mask"], deterministic=False,
                              rng=key, **token_inputs(mb))
        _, total = objective(logits, consts, mb)
        return total / denom, metrics_lib.batch_sums(logits, mb["labels"], mb["weights"], total)

    def body(carry, xs):
        mb, i = xs
        (loss, sums), grads = jax.value_and_grad(micro_loss, has_aux=True)(trainable, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

    micro = micro_batches(batch, k)
    # the sums' keys follow the head (two classes, N classes, regression: metrics.batch_sums): shaped, not listed
    sums_shape = jax.eval_shape(lambda: micro_loss(trainable, jax.tree.map(lambda x: x[0], micro), rng)[1])
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
             jax.tree.map(jnp.zeros_like, trainable))
    (loss, sums, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
    return loss, sums, grads


# The arrays a model holds for its `init` alone (the base weights, a student's start and token table): the steps
# never read them, and a step kept for reuse must not keep them alive.
INIT_ONLY = ("base", "start", "embedding")


def for_steps(model: ClassifierModel) -> ClassifierModel:
    """`model` without its INIT_ONLY arrays: what a jitted step closes over."""
    present = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else set()
    held = {name: None for name in INIT_ONLY if name in present and getattr(model, name) is not None}
    return dataclasses.replace(model, **held) if held else model


def _reused(build: Callable[..., Any], cache: Callable[..., Any], *key: Any) -> Any:
    """`build(*key)` through `cache` (an lru_cache of it) when every part of the key hashes by value, else built
    afresh: a caller's own optimizer or objective closure still works, it only compiles for itself."""
    try:
        hash(key)
    except TypeError:
        return build(*key)
    return cache(*key)


def make_train_step(model: ClassifierModel, tx: optax.GradientTransformation, objective: Objective,
                    seeded: Seeded | None = None, *, accumulate: int = 1, lr: float | optax.Schedule | None = None,
                    state_sharding: Any = None) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
    """The one jitted train step: the model's logits in train mode (dropout key from `step_key`),
    `objective(logits, consts, batch)`, gradients of the whole tree, the optimizer update of the trainable leaves;
    a NaN/Inf loss skips the update (and is reported in the sums); the state is donated, so parameters and
    optimizer state are updated in place. With `seeded`, the same step runs under `jax.vmap` over the seed axis
    (compiled once for all seeds; the shared constants are not copied).

    `accumulate` = K > 1 splits the batch into K micro-batches whose gradients are summed (`accumulated_grads`)
    before the one optimizer update: the same update as the whole batch, with a K-th of its activation memory.
    The sums also carry the step's `step_scalars` (`lr`: the run's rate or schedule, from optimizer.learning_rate).

    `state_sharding` (the placement's, `Placement.state_sharding`) keeps the new state where the old one was: without
    it, on an FSDP mesh the propagation from the split frozen base hands back a trainable state split over fsdp, the
    next call sees other input shardings, and the step compiles again (three times on a 2 x 4 mesh).

    Equal arguments give the same jitted function (models compare by value; `optimizer.make_optimizer` and
    `learning_rate` give one object for equal settings), so the runs of one configuration in a process trace,
    lower and compile their step once: a sweep's, a notebook's, the tests'.
    """
    return _reused(_build_train_step, _cached_train_step, for_steps(model), tx, objective, seeded, accumulate, lr,
                   state_sharding)


def _build_train_step(model: ClassifierModel, tx: optax.GradientTransformation, objective: Objective,
                      seeded: Seeded | None, accumulate: int, lr: float | optax.Schedule | None,
                      state_sharding: Any) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
    def train_step(state: TrainState, consts: Any, batch: Batch) -> tuple[TrainState, dict]:
        def loss_fn(trainable: Params, frozen: Params) -> tuple[jax.Array, dict]:
            return loss_and_sums(model, combine(trainable, frozen), consts, batch, objective, deterministic=False,
                                 rng=step_key(state))

        frozen = consts["frozen"]
        if accumulate == 1:  # the frozen gradients only reach set_to_zero: zeros (a quantized base has int leaves)
            (loss, sums), g_train = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, frozen)
            grads = (g_train, jax.tree.map(jnp.zeros_like, frozen))
        else:  # as above, not K summed gradients of the base
            loss, sums, g_train = accumulated_grads(model, objective, accumulate, state.trainable, consts, batch,
                                                    step_key(state))
            grads = (g_train, jax.tree.map(jnp.zeros_like, frozen))
        trainable, opt_state = apply_if_finite(tx, loss, grads, state.opt_state, state.trainable, frozen)
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        if state_sharding is not None:
            new = jax.lax.with_sharding_constraint(new, state_sharding)
        return (new,
                {**metrics_lib.guarded_step_sums(loss, state.step, sums), "loss": loss,
                 **step_scalars(grads[0], state.step, lr)})

    if seeded is not None:
        train_step = jax.vmap(train_step, in_axes=(0, seeded.consts_axes, 0))
    return jax.jit(train_step, donate_argnums=(0,))


def make_eval_step(model: ClassifierModel, seeded: Seeded | None = None) -> Callable[[TrainState, Any, Batch], dict]:
    """The one jitted eval step: `metrics.eval_sums` of the model's eval-mode logits (no dropout). With `seeded`,
    every seed scores the same batch and the sums carry the seed axis. Equal arguments: the same jitted function."""
    return _reused(_build_eval_step, _cached_eval_step, for_steps(model), seeded)


def _build_eval_step(model: ClassifierModel, seeded: Seeded | None) -> Callable[[TrainState, Any, Batch], dict]:
    def eval_step(state: TrainState, consts: Any, batch: Batch) -> dict:
        params = combine(state.trainable, consts["frozen"])
        logits = model.logits(params, batch["input_ids"], batch["attention_mask"], **token_inputs(batch))
        return metrics_lib.eval_sums(logits, batch)

    if seeded is not None:
        eval_step = jax.vmap(eval_step, in_axes=(0, seeded.consts_axes, None))
    return jax.jit(eval_step)


# a few configurations' steps (each holds its compiled programs, no weights): a sweep's runs alternate among few
_cached_train_step = functools.lru_cache(maxsize=16)(_build_train_step)
_cached_eval_step = functools.lru_cache(maxsize=16)(_build_eval_step)
