"""Classification metrics as summable on-device counts, turned into numbers once per epoch.

Steps return sums (loss sum, confusion counts), never means, so that batches with padding rows, epochs and
devices combine exactly; `summarize` divides once at the end. Accuracy and Matthews correlation (the standard
CoLA metric, which exposes a classifier that predicts one class) come from the same confusion counts.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

SUM_KEYS = ("loss_sum", "count", "tp", "fp", "tn", "fn")


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


def zeros() -> dict:
    return {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}


def add(a: Mapping, b: Mapping) -> dict:
    return {k: a[k] + b[k] for k in SUM_KEYS}


def matthews(tp: float, fp: float, tn: float, fn: float) -> float:
    """Matthews correlation; 0 when a marginal is empty (e.g. a one-class predictor), as sklearn does."""
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def summarize(sums: Mapping) -> dict[str, float]:
    """Host-side: loss, accuracy, mcc, count from accumulated sums (one device->host transfer)."""
    s = {k: float(v) for k, v in jax.device_get(dict(sums)).items()}
    n = s["count"]
    return {
        "loss": s["loss_sum"] / n if n else float("nan"),
        "accuracy": (s["tp"] + s["tn"]) / n if n else float("nan"),
        "mcc": matthews(s["tp"], s["fp"], s["tn"], s["fn"]),
        "count": int(round(n)),
    }


def accuracy_np(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(labels)))
