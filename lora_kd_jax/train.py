"""LoRA fine-tuning of a GPT-2 classifier: its loss, its task for the epoch loop, and `train_and_evaluate(cfg)`."""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import optax

from lora_kd_jax import data as data_lib
from lora_kd_jax import metrics as metrics_lib
from lora_kd_jax import mesh as mesh_lib
from lora_kd_jax import loop, precision, runtime, steps
from lora_kd_jax.config import Config
from lora_kd_jax.keys import run_keys
from lora_kd_jax.loop import Task
from lora_kd_jax.models import gpt2
from lora_kd_jax.models.classifier import GPT2Classifier, build_classifier
from lora_kd_jax.steps import TrainState, init_state
from lora_kd_jax.trainable import ParamReport, cast_frozen, combine, make_optimizer, param_report, partition

log = logging.getLogger(__name__)

Params = dict[str, Any]
Batch = dict[str, jax.Array]


def loss_and_sums(model: GPT2Classifier, params: Params, batch: Batch, *, deterministic: bool,
                  rng: jax.Array | None) -> tuple[jax.Array, dict]:
    logits = model.logits(params, batch["input_ids"], batch["attention_mask"], deterministic=deterministic, rng=rng)
    mean, total = metrics_lib.cross_entropy(logits, batch["labels"], batch["weights"])
    return mean, metrics_lib.batch_sums(logits, batch["labels"], batch["weights"], total)


def make_train_step(model: GPT2Classifier, tx: optax.GradientTransformation,
                    ) -> Callable[[TrainState, Params, Batch], tuple[TrainState, dict]]:
    """LoRA step: consts is the frozen tree (an argument, never a compiled-in constant, never donated)."""

    def loss_fn(trainable: Params, frozen: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        return loss_and_sums(model, combine(trainable, frozen), batch, deterministic=False, rng=rng)

    return steps.make_guarded_step(loss_fn, tx)


def make_eval_step(model: GPT2Classifier) -> Callable[[TrainState, Params, Batch], dict]:
    return steps.make_eval_step(lambda trainable, frozen, batch: model.logits(
        combine(trainable, frozen), batch["input_ids"], batch["attention_mask"], deterministic=True))


def dry_run(cfg: Config) -> ParamReport:
    """Parameter report from shapes alone: no weights are loaded or allocated."""
    cfg = gpt2.with_checkpoint_size(cfg)
    _, shapes = build_classifier(cfg, run_keys(cfg.train.seed).model, shapes_only=True)
    return param_report(shapes)


def build_task(cfg: Config, splits: dict[str, data_lib.EncodedSplit]) -> tuple[Task, GPT2Classifier, Params]:
    """Model, optimizer, state and batch sources for a LoRA run; also returns the frozen tree."""
    place = mesh_lib.run_placement(cfg)
    keys = run_keys(cfg.train.seed)
    model, params = build_classifier(cfg, keys.model)
    report = param_report(params)
    trainable, frozen = partition(params)
    tx = make_optimizer(cfg.train.lr)
    state = place.state(init_state(trainable, tx, keys.dropout))
    compute, base = precision.compute_dtype(cfg.model), precision.base_dtype(cfg.model)
    frozen = place.frozen(cast_frozen(frozen, base))
    log.info("%s computes in %s, frozen base stored in %s (model.dtype=%s, model.base_dtype=%s, backend %s)",
             cfg.model.name, compute, base, cfg.model.dtype, cfg.model.base_dtype, jax.default_backend())
    batches = data_lib.batch_sources(splits, cfg)
    task = Task(
        kind="lora", state=state, consts=frozen,
        train_step=make_train_step(model, tx), eval_step=make_eval_step(model),
        train_batches=batches.train, eval_batches=batches.eval, n_train_batches=batches.n_train_batches,
        epochs=cfg.train.epochs, reported_batches=batches.reported,
        info={"total_params": report.total, "trainable_params": report.trainable, "reduction": report.reduction,
              "compute_dtype": compute, "base_dtype": base},
        title=f"LoRA {cfg.model.name}", put_batch=place.put_batch, on_nonfinite=cfg.train.on_nonfinite)
    return task, model, frozen


def train_and_evaluate(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict:
    """The whole LoRA run into cfg.run.dir; returns the summary written to metrics.json."""
    runtime.setup(cfg)
    cfg = gpt2.with_checkpoint_size(cfg)  # model.path decides the architecture, and config.yaml records it
    log.info("%s", dry_run(cfg))  # shapes only: a bad model size or LoRA target fails here, before any data or compute
    return loop.train_and_evaluate(cfg, lambda splits: build_task(cfg, splits)[0], resume=resume, progress=progress)
