"""The one optimizer: `optax.multi_transform` over the model's parameter labels.

Every leaf carries a group label from its model (`models.interface`): the LoRA classifier's 'lora', 'norm', 'head'
and 'frozen'; a student's 'student'. Each trained group gets its own transform (`group_transform`: Adam with
torch.optim.Adam's defaults at the run's learning rate schedule, AdamW's decoupled decay where train.weight_decay
asks and the group decays), and 'frozen' gets `optax.set_to_zero`: the optimizer sees the whole tree, and frozen
leaves receive zero updates through it. `train.max_grad_norm` clips the global norm of the trainable gradients
first (frozen gradients are zeroed before the norm is taken, so they never count).

With the defaults (constant rate, no warm-up, no decay, no clipping) the optimizer is exactly the original's Adam.

LoRA+ (`lr_scales`, from the model: `interface.lr_scales`) multiplies some groups' rates; its runs then hold every
trained group's learning rate in the optimizer state (`optax.inject_hyperparams`), where a reader can see it.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import optax
from flax import traverse_util

from lora_kd_jax.core.config import TrainConfig
from lora_kd_jax.models.interface import FROZEN, GROUPS, NORM, Labels

NO_DECAY_GROUPS = (NORM,)  # LayerNorm scales and biases keep their values under weight decay
NO_DECAY_LEAVES = ("bias", "m")  # nor does any bias, nor a DoRA magnitude (lora.variant=dora: its "m")


def adam(lr: float | optax.Schedule, weight_decay: float = 0.0, decay_mask: Any = None, *, visible: bool = False
         ) -> optax.GradientTransformation:
    """Adam with torch.optim.Adam's defaults (the original's optimizer for every run); AdamW when `weight_decay`.
    `visible` keeps the learning rate in the state (state.hyperparams['learning_rate'])."""
    if visible:
        if weight_decay:
            return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
                lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask)
        return optax.inject_hyperparams(optax.adam)(lr, b1=0.9, b2=0.999, eps=1e-8)
    if weight_decay:
        return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decay_mask)
    return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """train.warmup in steps: whole steps as given, or a fraction of all `total_steps`."""
    w = train.warmup
    return int(w) if w >= 1 else int(round(w * total_steps))


def total_steps(train: TrainConfig, n_batches: int) -> int:
    """The run's optimizer steps: train.epochs epochs of `n_batches`, or train.max_steps where that stops sooner."""
    steps = train.epochs * n_batches
    return min(steps, train.max_steps) if train.max_steps else steps


def learning_rate(train: TrainConfig, total_steps: int) -> float | optax.Schedule:
    """train.lr as the run's schedule over `total_steps` optimizer steps: a plain float for a constant rate without
    warm-up (the original), else an optax schedule (linear warm-up from 0, then constant, linear or cosine decay
    to 0 at the last step). Equal settings give the same schedule object (`_settings`)."""
    return _learning_rate(*_settings(train, total_steps))


# The TrainConfig keys an optimizer is built from (`make_optimizer`, `learning_rate`). Both build from a TrainConfig
# holding these keys alone, so equal settings give one transform object: a process that trains several runs the
# same way (a sweep, a notebook, the tests) then reuses their compiled steps (`steps.make_train_step`).
OPTIMIZER_KEYS = ("lr", "schedule", "warmup", "weight_decay", "max_grad_norm")


def _settings(train: TrainConfig, total_steps: int) -> tuple[tuple, int | None]:
    """(the optimizer's keys of `train`, total_steps, or None where the schedule does not depend on them)."""
    constant = train.schedule == "constant" and train.warmup == 0  # decided by the config alone: the optimizer
    # state's tree must not depend on total_steps (a reader rebuilds it without knowing them)
    return tuple(getattr(train, k) for k in OPTIMIZER_KEYS), None if constant else total_steps


@functools.lru_cache(maxsize=64)
def _learning_rate(settings: tuple, total_steps: int | None) -> float | optax.Schedule:
    train = TrainConfig(**dict(zip(OPTIMIZER_KEYS, settings)))
    if total_steps is None:
        return train.lr
    lr, warm = train.lr, warmup_steps(train, total_steps)
    decay_steps = max(total_steps - warm, 1)
    after = {"constant": optax.constant_schedule(lr),
             "linear": optax.linear_schedule(lr, 0.0, decay_steps),
             "cosine": optax.cosine_decay_schedule(lr, decay_steps)}[train.schedule]
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def _decays(path: tuple, _leaf: Any) -> bool:
    return getattr(path[-1], "key", None) not in NO_DECAY_LEAVES


def _scaled(lr: float | optax.Schedule, factor: float) -> float | optax.Schedule:
    if factor == 1.0:
        return lr
    return (lambda count: factor * lr(count)) if callable(lr) else factor * lr


def group_transform(group: str, train: TrainConfig, total_steps: int, lr_scale: float = 1.0, *,
                    visible: bool = False) -> optax.GradientTransformation:
    """The transform of one trained group: Adam (AdamW with train.weight_decay, except for LayerNorms and biases) at
    the run's learning rate schedule times `lr_scale`."""
    if group not in GROUPS:
        raise ValueError(f"unknown parameter group {group!r}: expected one of {', '.join(GROUPS)} or {FROZEN}")
    decay = 0.0 if group in NO_DECAY_GROUPS else train.weight_decay
    mask = (lambda params: jax.tree_util.tree_map_with_path(_decays, params)) if decay else None
    return adam(_scaled(learning_rate(train, total_steps), lr_scale), decay, mask, visible=visible)


def clip_trainable(max_norm: float, labels: Labels) -> optax.GradientTransformation:
    """Zero the frozen gradients, then clip the global norm of what is left (the trainable ones) to `max_norm`."""
    present = set(jax.tree.leaves(labels))
    keep = {g: optax.set_to_zero() if g == FROZEN else optax.identity() for g in present}
    return optax.chain(optax.multi_transform(keep, labels), optax.clip_by_global_norm(max_norm))


def make_optimizer(train: TrainConfig | float, labels: Labels, total_steps: int = 1,
                   lr_scales: Mapping[str, float] | None = None) -> optax.GradientTransformation:
    """multi_transform over `labels` (a tree of group names shaped like the parameters it will be given): one
    transform per group present, `set_to_zero` for frozen leaves. `train` is the run's TrainConfig (its schedule
    spans `total_steps` optimizer steps), or a learning rate alone (constant-rate Adam: the bench, the tests).
    `lr_scales` multiplies named groups' rates (LoRA+); then every group's rate is kept in the state. Equal
    arguments give the same transform object (`OPTIMIZER_KEYS`)."""
    if not isinstance(train, TrainConfig):
        train = TrainConfig(lr=float(train))
    settings, steps = _settings(train, total_steps)
    groups = tuple(sorted(traverse_util.flatten_dict(labels).items()))
    return _optimizer(settings, steps, groups, tuple(sorted((lr_scales or {}).items())))


@functools.lru_cache(maxsize=64)
def _optimizer(settings: tuple, total_steps: int | None, groups: tuple, lr_scales: tuple
               ) -> optax.GradientTransformation:
    train = TrainConfig(**dict(zip(OPTIMIZER_KEYS, settings)))
    labels = traverse_util.unflatten_dict(dict(groups))
    scales = dict(lr_scales)
    present = sorted(set(jax.tree.leaves(labels)), key=lambda g: (g == FROZEN, g))
    transforms = {g: optax.set_to_zero() if g == FROZEN else
                  group_transform(g, train, total_steps, scales.get(g, 1.0), visible=bool(scales)) for g in present}
    tx = optax.multi_transform(transforms, labels)
    if train.max_grad_norm:
        return optax.chain(clip_trainable(train.max_grad_norm, labels), tx)
    return tx
