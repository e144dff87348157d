"""The distillation losses: T²·KL(softmax(t/T) ‖ softmax(s/T)) (batch mean) + alpha·CE(s, labels); alpha=0 is the
original's `kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T*T`. The README explains the default
T=2. `distill.loss=mse` swaps the KL term for Tang et al.'s (2019) squared distance between the logits (no
temperature). `teacher_objective` is the objective the student's train step minimises (`training.steps.Objective`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.models.interface import ClassifierModel, token_inputs
from lora_kd_jax.training.steps import Objective, for_steps

Batch = dict[str, jax.Array]


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
            weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(weighted batch mean, weighted sum) of T² · KL(softmax(t/T) ‖ softmax(s/T)) per row.

    With all weights 1 the mean is torch's `kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T*T`;
    padding rows (weight 0) count neither in the sum nor in the divisor.
    """
    t = teacher_logits.astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_p = jax.nn.log_softmax(t, axis=-1)
    per_row = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(s, axis=-1)), axis=-1) * temperature ** 2
    if weights is None:
        weights = jnp.ones(per_row.shape, jnp.float32)
    total = jnp.sum(per_row * weights)
    return total / jnp.maximum(jnp.sum(weights), 1.0), total


def logit_mse(student_logits: jax.Array, teacher_logits: jax.Array,
              weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(weighted batch mean, weighted sum) of ‖t − s‖² per row, Tang et al.'s distillation loss on logits: summed
    over the classes (torch: `mse_loss(s, t, reduction="sum") / B`); padding rows (weight 0) count nowhere."""
    diff = student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32)
    per_row = jnp.sum(jnp.square(diff), axis=-1)
    if weights is None:
        weights = jnp.ones(per_row.shape, jnp.float32)
    total = jnp.sum(per_row * weights)
    return total / jnp.maximum(jnp.sum(weights), 1.0), total


def kd_objective(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                 weights: jax.Array, temperature: float, alpha: float, loss: str = "kl") -> tuple[jax.Array, jax.Array]:
    """(mean, sum) of the distillation term (`loss`: kl = kd_loss, mse = logit_mse) + alpha · cross-entropy on the
    hard labels (alpha=0: the original, KL only). A regression (one output) has one loss whichever is named: the
    squared error between student and teacher outputs (no temperature) + alpha · the squared error against the
    targets."""
    if student_logits.shape[-1] == 1:
        mean, total = metrics_lib.squared_error(student_logits, teacher_logits[..., 0], weights)
    elif loss == "mse":
        mean, total = logit_mse(student_logits, teacher_logits, weights)
    else:
        mean, total = kd_loss(student_logits, teacher_logits, temperature, weights)
    if alpha:
        ce_mean, ce_total = metrics_lib.supervised_loss(student_logits, labels, weights)
        mean, total = mean + alpha * ce_mean, total + alpha * ce_total
    return mean, total


@dataclasses.dataclass(frozen=True)
class TeacherObjective:
    """The KD objective reading teacher logits from consts: the cached array {'teacher_logits': [N, 2]} gathered
    by batch['index'] (teacher=None), or a teacher forward pass on {'teacher': merged params}. A value (equal
    settings are equal objectives), so equal distillation runs share their compiled steps."""

    temperature: float
    alpha: float
    teacher: ClassifierModel | None = None
    loss: str = "kl"

    def __call__(self, logits: jax.Array, consts: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        if self.teacher is None:
            t = consts["teacher_logits"][batch["index"]]
        else:
            t = self.teacher.logits(consts["teacher"], batch["input_ids"], batch["attention_mask"], deterministic=True,
                                    **token_inputs(batch))  # a BERT teacher's pairs: their segment ids
        return kd_objective(logits, jax.lax.stop_gradient(t), batch["labels"], batch["weights"],
                            self.temperature, self.alpha, self.loss)


def teacher_objective(temperature: float, alpha: float, teacher: ClassifierModel | None = None,
                      loss: str = "kl") -> Objective:
    """The student's objective (`TeacherObjective`): T, alpha, the live teacher or None (cached logits), kl | mse."""
    return TeacherObjective(temperature, alpha, None if teacher is None else for_steps(teacher), loss)
