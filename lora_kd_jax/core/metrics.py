"""Metrics as summable on-device counts, turned into numbers once per epoch.

Steps return sums (loss sum, confusion counts, moments), never means, so that batches with padding rows, epochs and
devices combine exactly; `summarize` divides once at the end. Which sums a batch gives follows from the width of
the logits (static under jit): two classes -> tp/fp/tn/fn (class 1 positive; the CoLA study's sums), more ->
a confusion matrix [gold, predicted], one output (regression) -> the moments of labels and predictions.
Accuracy, Matthews correlation (the standard CoLA metric, which exposes a classifier that predicts one class),
F1 (binary) and macro-F1 come from the confusion counts, Pearson's r from the moments. Spearman's rho needs ranks,
which do not sum: a regression's eval step also hands back its rows (`RANKED`: label, prediction, weight), which
`add` leaves out and `ranked_scores` turns into Spearman's rho and an exact Pearson's r (float64, on the host) once
per epoch; the moments' Pearson is what a training epoch (which keeps no rows) reports.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

SUM_KEYS = ("loss_sum", "count", "tp", "fp", "tn", "fn")  # two classes (the CoLA study)
MULTICLASS_KEYS = ("loss_sum", "count", "confusion")  # confusion [gold, predicted], more than two classes
REGRESSION_KEYS = ("loss_sum", "count", "sum_y", "sum_p", "sum_yy", "sum_pp", "sum_yp")  # one output
# Training steps also report non-finite losses: how many, and the first step (min over batches) where one was seen.
FAULT_KEYS = ("nonfinite", "first_nonfinite_step")
NO_STEP = float(2**31)
RANKED = "ranked"  # a regression eval step's rows {label, prediction, weight}: Spearman's rho needs them all


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weighted mean CE over real rows, weighted CE sum). Padding rows carry weight 0."""
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    total = jnp.sum(per_row * weights)
    return total / jnp.maximum(jnp.sum(weights), 1.0), total


def squared_error(outputs: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weighted mean, weighted sum) of the squared error of one-output logits [B, 1] against real targets [B]."""
    per_row = jnp.square(outputs[..., 0].astype(jnp.float32) - targets.astype(jnp.float32))
    total = jnp.sum(per_row * weights)
    return total / jnp.maximum(jnp.sum(weights), 1.0), total


def supervised_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The loss against the gold labels: mean squared error for a one-output (regression) head, as transformers'
    problem_type=regression; cross-entropy otherwise."""
    if logits.shape[-1] == 1:
        return squared_error(logits, labels, weights)
    return cross_entropy(logits, labels, weights)


def batch_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array, loss_sum: jax.Array) -> dict:
    """The summable metric counts of one batch and its loss sum, as float32: confusion counts (two classes:
    tp/fp/tn/fn with class 1 positive; more: a confusion matrix), or the moments of a regression."""
    w = weights.astype(jnp.float32)
    n_outputs = logits.shape[-1]
    if n_outputs == 1:
        y, p = labels.astype(jnp.float32), logits[..., 0].astype(jnp.float32)
        return {"loss_sum": loss_sum.astype(jnp.float32), "count": jnp.sum(w), "sum_y": jnp.sum(w * y),
                "sum_p": jnp.sum(w * p), "sum_yy": jnp.sum(w * y * y), "sum_pp": jnp.sum(w * p * p),
                "sum_yp": jnp.sum(w * y * p)}
    pred = jnp.argmax(logits, axis=-1)
    if n_outputs > 2:
        gold = jax.nn.one_hot(labels, n_outputs, dtype=jnp.float32) * w[:, None]
        return {"loss_sum": loss_sum.astype(jnp.float32), "count": jnp.sum(w),
                "confusion": gold.T @ jax.nn.one_hot(pred, n_outputs, dtype=jnp.float32)}
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
    """`batch_sums` with the loss against the gold labels (`supervised_loss`): what every evaluation sums; a
    regression's also carry the batch's rows under `RANKED` (ranks do not sum; `add` drops them)."""
    _, total = supervised_loss(logits, batch["labels"], batch["weights"])
    sums = batch_sums(logits, batch["labels"], batch["weights"], total)
    if logits.shape[-1] == 1:
        sums[RANKED] = {"label": batch["labels"].astype(jnp.float32),
                        "prediction": logits[..., 0].astype(jnp.float32), "weight": batch["weights"]}
    return sums


def zeros(n_outputs: int = 2) -> dict:
    """Empty sums for a head of `n_outputs` (the keys `batch_sums` gives for it), with the fault record."""
    if n_outputs == 1:
        out = {k: jnp.zeros((), jnp.float32) for k in REGRESSION_KEYS}
    elif n_outputs > 2:
        out = {"loss_sum": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32),
               "confusion": jnp.zeros((n_outputs, n_outputs), jnp.float32)}
    else:
        out = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
    out["nonfinite"] = jnp.zeros((), jnp.float32)
    out["first_nonfinite_step"] = jnp.asarray(NO_STEP, jnp.float32)
    return out


def add(a: Mapping, b: Mapping) -> dict:
    """Accumulate batch sums `b` into `a` (a from `zeros()`); fault keys are optional in `b`."""
    out = {k: a[k] + b[k] for k in a if k not in FAULT_KEYS}
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


def f1(tp: float, fp: float, fn: float) -> float:
    """F1 of one class; 0 when it is neither predicted nor present (sklearn's zero_division=0)."""
    return 0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def confusion_scores(confusion: np.ndarray) -> dict[str, float]:
    """accuracy, multi-class MCC (Gorodkin's R_K, as sklearn's matthews_corrcoef; 0 when a marginal is a single
    class) and macro-F1 (mean F1 over the classes present in gold or predictions, as sklearn's f1_score with
    average='macro') from a confusion matrix [gold, predicted]."""
    c = np.asarray(confusion, np.float64)
    n, correct = c.sum(), np.trace(c)
    gold, pred = c.sum(axis=1), c.sum(axis=0)
    denom = math.sqrt((n * n - pred @ pred) * (n * n - gold @ gold))
    present = (gold + pred) > 0
    per_class = [f1(c[k, k], pred[k] - c[k, k], gold[k] - c[k, k]) for k in np.flatnonzero(present)]
    return {"accuracy": correct / n if n else float("nan"),
            "mcc": 0.0 if denom == 0 else (correct * n - pred @ gold) / denom,
            "macro_f1": float(np.mean(per_class)) if per_class else 0.0}


def pearson(n: float, sum_y: float, sum_p: float, sum_yy: float, sum_pp: float, sum_yp: float) -> float:
    """Pearson's r from summed moments; 0 when either side is constant (no correlation to speak of)."""
    cov = sum_yp - sum_y * sum_p / n if n else 0.0
    var_y, var_p = (sum_yy - sum_y ** 2 / n, sum_pp - sum_p ** 2 / n) if n else (0.0, 0.0)
    return 0.0 if var_y <= 0 or var_p <= 0 else cov / math.sqrt(var_y * var_p)


def spearman(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Spearman's rho (Pearson's r of the average ranks, ties sharing theirs, as scipy); 0 when either side is
    constant. Host-side, from all predictions: ranks cannot be summed over batches."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x), np.float64)
        r[order] = np.arange(1, len(x) + 1)
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return (sums / counts)[inverse]

    y, p = ranks(np.asarray(labels, np.float64)), ranks(np.asarray(predictions, np.float64))
    return pearson(len(y), y.sum(), p.sum(), y @ y, p @ p, y @ p)


def row_scores(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """A regression's Pearson's r and Spearman's rho from its rows, in float64 on the host (as scipy computes them):
    float32 moments summed over batches lose digits as the set and the scale of the scores grow."""
    y, p = np.asarray(labels, np.float64), np.asarray(predictions, np.float64)
    y, p = y - y.mean() if len(y) else y, p - p.mean() if len(p) else p  # centred: no cancellation in the moments
    return {"pearson": pearson(len(y), 0.0, 0.0, y @ y, p @ p, y @ p), "spearman": spearman(labels, predictions)}


def ranked_scores(rows: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """`row_scores` over the real rows (weight > 0) of every batch's `RANKED` rows (on the host, once per epoch)."""
    cat = {k: np.concatenate([np.asarray(r[k]).reshape(-1) for r in rows]) for k in ("label", "prediction", "weight")}
    real = cat["weight"] > 0
    return row_scores(cat["label"][real], cat["prediction"][real])


def summarize(sums: Mapping) -> dict[str, float]:
    """Host-side numbers from accumulated sums (one device->host transfer): loss and count, then accuracy, mcc, f1
    (two classes: of class 1) and macro_f1 for a classifier, or mse and pearson for a regression.

    The loss is over finite batches; `nonfinite` (and `first_nonfinite_step`) appear when a batch was not."""
    host = jax.device_get({k: v for k, v in sums.items() if k != RANKED})
    s = {k: float(v) for k, v in host.items() if k != "confusion"}
    n = s["count"]
    faults = {}
    if s.get("nonfinite", 0.0) > 0:
        faults = {"nonfinite": int(s["nonfinite"]), "first_nonfinite_step": int(s["first_nonfinite_step"])}
    loss = s["loss_sum"] / n if n else float("nan")
    if "sum_y" in s:
        scores = {"mse": loss, "pearson": pearson(n, s["sum_y"], s["sum_p"], s["sum_yy"], s["sum_pp"], s["sum_yp"])}
    elif "confusion" in host:
        scores = confusion_scores(host["confusion"])
    else:
        scores = {"accuracy": (s["tp"] + s["tn"]) / n if n else float("nan"),
                  "mcc": matthews(s["tp"], s["fp"], s["tn"], s["fn"]),
                  "f1": f1(s["tp"], s["fp"], s["fn"]),
                  "macro_f1": confusion_scores([[s["tn"], s["fp"]], [s["fn"], s["tp"]]])["macro_f1"]}
    return {"loss": loss, **scores, "count": int(round(n)), **faults}

