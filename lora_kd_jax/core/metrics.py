"""Classification metrics as summable on-device counts, turned into numbers once per epoch.

Steps return sums (loss sum, confusion counts), never means, so that batches with padding rows, epochs and
devices combine exactly; `summarize` divides once at the end. Accuracy and Matthews correlation (the standard
CoLA metric, which exposes a classifier that predicts one class) come from the same confusion counts.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

SUM_KEYS = ("loss_sum", "count", "tp", "fp", "tn", "fn")
# Training steps also report non-finite losses: how many, and the first step (min over batches) where one was seen.
FAULT_KEYS = ("nonfinite", "first_nonfinite_step")
NO_STEP = float(2**31)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weighted mean CE over real rows, weighted CE sum). Padding rows carry weight 0."""
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    total = jnp.sum(per_row * weights)
    return total / jnp.maximum(jnp.sum(weights), 1.0), total


def batch_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array, loss_sum: jax.Array) -> dict:
    """Confusion counts (positive class = 1) and loss sum for one batch, as float32 scalars."""
    pred = jnp.argmax(logits, axis=-1)
    w = weights.astype(jnp.float32)
    pos, neg = (labels == 1), (labels == 0)
    return {
        "loss_sum": loss_sum.astype(jnp.float32),
        "count": jnp.sum(w),
        "tp": jnp.sum(w * (pos & (pred == 1))),
        "fp": jnp.sum(w * (neg & (pred == 1))),
        "tn": jnp.sum(w * (neg & (pred == 0))),
        "fn": jnp.sum(w * (pos & (pred == 0))),
    }


def eval_sums(logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict:
    """`batch_sums` with the cross-entropy against the gold labels: what every evaluation sums."""
    _, total = cross_entropy(logits, batch["labels"], batch["weights"])
    return batch_sums(logits, batch["labels"], batch["weights"], total)


def zeros() -> dict:
    out = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
    out["nonfinite"] = jnp.zeros((), jnp.float32)
    out["first_nonfinite_step"] = jnp.asarray(NO_STEP, jnp.float32)
    return out


def add(a: Mapping, b: Mapping) -> dict:
    """Accumulate batch sums `b` into `a` (a from `zeros()`); fault keys are optional in `b`."""
    out = {k: a[k] + b[k] for k in SUM_KEYS}
    out["nonfinite"] = a["nonfinite"] + b.get("nonfinite", 0.0)
    out["first_nonfinite_step"] = jnp.minimum(a["first_nonfinite_step"], b.get("first_nonfinite_step", NO_STEP))
    return out


def fault_sums(loss: jax.Array, step: jax.Array) -> dict:
    """Per-step record of a non-finite loss (0 / NO_STEP when the loss is finite)."""
    bad = ~jnp.isfinite(loss)
    return {"nonfinite": bad.astype(jnp.float32),
            "first_nonfinite_step": jnp.where(bad, step.astype(jnp.float32), NO_STEP)}


def keep_if_finite(loss: jax.Array, new: Any, old: Any) -> Any:
    """`new` only when the loss is finite: a NaN batch never poisons parameters, optimizer state or metrics."""
    ok = jnp.isfinite(loss)
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def guarded_step_sums(loss: jax.Array, step: jax.Array, sums: Mapping) -> dict:
    """A train step's sums: zero for a non-finite batch (it is skipped), plus the fault record."""
    clean = keep_if_finite(loss, dict(sums), jax.tree.map(jnp.zeros_like, dict(sums)))
    return {**clean, **fault_sums(loss, step)}


def matthews(tp: float, fp: float, tn: float, fn: float) -> float:
    """Matthews correlation; 0 when a marginal is empty (e.g. a one-class predictor), as sklearn does."""
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def summarize(sums: Mapping) -> dict[str, float]:
    """Host-side: loss, accuracy, mcc, count from accumulated sums (one device->host transfer).

    The loss is over finite batches; `nonfinite` (and `first_nonfinite_step`) appear when a batch was not."""
    s = {k: float(v) for k, v in jax.device_get(dict(sums)).items()}
    n = s["count"]
    faults = {}
    if s.get("nonfinite", 0.0) > 0:
        faults = {"nonfinite": int(s["nonfinite"]), "first_nonfinite_step": int(s["first_nonfinite_step"])}
    return {
        "loss": s["loss_sum"] / n if n else float("nan"),
        "accuracy": (s["tp"] + s["tn"]) / n if n else float("nan"),
        "mcc": matthews(s["tp"], s["fp"], s["tn"], s["fn"]),
        "count": int(round(n)),
        **faults,
    }

