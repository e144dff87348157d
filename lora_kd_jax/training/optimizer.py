"""The one optimizer: `optax.multi_transform` over the model's parameter labels.

Every leaf carries a group label from its model (`models.interface`): the LoRA classifier's 'lora', 'norm', 'head'
and 'frozen'; a student's 'student'. Each trained group gets its own transform (`group_transform`: Adam with the
original's torch.optim.Adam defaults today; where a per-group learning rate or weight decay plugs in), and 'frozen'
gets `optax.set_to_zero`: the optimizer sees the whole tree, and frozen leaves receive zero updates through it.
"""
from __future__ import annotations

import jax
import optax

from lora_kd_jax.models.interface import FROZEN, GROUPS, Labels


def adam(lr: float) -> optax.GradientTransformation:
    """Adam with torch.optim.Adam's defaults (the original's optimizer for every run)."""
    return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def group_transform(group: str, lr: float) -> optax.GradientTransformation:
    """The transform of one trained group (every group: Adam at train.lr, as the original)."""
    if group not in GROUPS:
        raise ValueError(f"unknown parameter group {group!r}: expected one of {', '.join(GROUPS)} or {FROZEN}")
    return adam(lr)


def make_optimizer(lr: float, labels: Labels) -> optax.GradientTransformation:
    """multi_transform over `labels` (a tree of group names shaped like the parameters it will be given): one
    transform per group present, `set_to_zero` for frozen leaves."""
    present = sorted(set(jax.tree.leaves(labels)), key=lambda g: (g == FROZEN, g))
    transforms = {g: optax.set_to_zero() if g == FROZEN else group_transform(g, lr) for g in present}
    return optax.multi_transform(transforms, labels)
