"""LoRA fine-tuning of a GPT-2 classifier: its loss, its task for the epoch loop, and `train_and_evaluate(cfg)`."""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import optax

from lora_kd_jax import data as data_lib
from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.training import mesh as mesh_lib
from lora_kd_jax.training import loop
from lora_kd_jax.training import precision
from lora_kd_jax.core import runtime
from lora_kd_jax.training import steps
from lora_kd_jax.training import seeds as seeds_lib
from lora_kd_jax.core.config import Config
from lora_kd_jax.core.keys import classifier_base_key, run_keys
from lora_kd_jax.training.loop import Task
from lora_kd_jax.models import gpt2
from lora_kd_jax.models.classifier import GPT2Classifier, build_classifier, init_adapters
from lora_kd_jax.training.steps import TrainState, init_state
from lora_kd_jax.training.trainable import ParamReport, cast_frozen, combine, make_optimizer, param_report, partition

log = logging.getLogger(__name__)

Params = dict[str, Any]
Batch = dict[str, jax.Array]


def loss_and_sums(model: GPT2Classifier, params: Params, batch: Batch, *, deterministic: bool,
                  rng: jax.Array | None) -> tuple[jax.Array, dict]:
    logits = model.logits(params, batch["input_ids"], batch["attention_mask"], deterministic=deterministic, rng=rng)
    mean, total = metrics_lib.cross_entropy(logits, batch["labels"], batch["weights"])
    return mean, metrics_lib.batch_sums(logits, batch["labels"], batch["weights"], total)


def make_train_step(model: GPT2Classifier, tx: optax.GradientTransformation, seeded: steps.Seeded | None = None
                    ) -> Callable[[TrainState, Params, Batch], tuple[TrainState, dict]]:
    """LoRA step: consts is the frozen tree (an argument, never a compiled-in constant, never donated; with
    `seeded`, one copy shared by every seed)."""

    def loss_fn(trainable: Params, frozen: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        return loss_and_sums(model, combine(trainable, frozen), batch, deterministic=False, rng=rng)

    return steps.make_guarded_step(loss_fn, tx, seeded)


def make_eval_step(model: GPT2Classifier, seeded: steps.Seeded | None = None
                   ) -> Callable[[TrainState, Params, Batch], dict]:
    return steps.make_eval_step(lambda trainable, frozen, batch: model.logits(
        combine(trainable, frozen), batch["input_ids"], batch["attention_mask"], deterministic=True), seeded)


def dry_run(cfg: Config) -> ParamReport:
    """Parameter report from shapes alone: no weights are loaded or allocated."""
    cfg = gpt2.with_checkpoint_size(cfg)
    _, shapes = build_classifier(cfg, run_keys(seeds_lib.seed_list(cfg)[0]).model, shapes_only=True)
    return param_report(shapes)


def build_task(cfg: Config, splits: dict[str, data_lib.EncodedSplit]) -> tuple[Task, GPT2Classifier, Params]:
    """Model, optimizer, state and batch sources for a LoRA run; also returns the frozen tree. With train.seeds the
    state stacks one trainable state per seed (its own adapters, head and dropout key) over one frozen base."""
    place = mesh_lib.run_placement(cfg)
    seed_list = seeds_lib.seed_list(cfg)
    model, params = build_classifier(cfg, run_keys(seed_list[0]).model, base_key=classifier_base_key(cfg))
    report = param_report(params)
    _, frozen = partition(params)
    tx = make_optimizer(cfg.train.lr)
    states = []
    for seed in seed_list:
        keys = run_keys(seed)
        trainable, _ = partition(init_adapters(model, params["gpt2"], keys.model))
        states.append(init_state(trainable, tx, keys.dropout))
    seeded = steps.Seeded(consts_axes=None) if seeds_lib.is_seeded(cfg) else None
    state = place.state(seeds_lib.stack(states) if seeded else states[0])
    compute, base = precision.compute_dtype(cfg.model), precision.base_dtype(cfg.model)
    frozen = place.frozen(cast_frozen(frozen, base))
    log.info("%s computes in %s, frozen base stored in %s (model.dtype=%s, model.base_dtype=%s, backend %s)%s",
             cfg.model.name, compute, base, cfg.model.dtype, cfg.model.base_dtype, jax.default_backend(),
             f"; {len(seed_list)} seeds {seed_list} in one program, one shared base" if seeded else "")
    batches = data_lib.batch_sources(splits, cfg)
    task = Task(
        kind="lora", state=state, consts=frozen,
        train_step=make_train_step(model, tx, seeded), eval_step=make_eval_step(model, seeded),
        train_batches=batches.train, eval_batches=batches.eval, n_train_batches=batches.n_train_batches,
        epochs=cfg.train.epochs, reported_batches=batches.reported,
        info={"total_params": report.total, "trainable_params": report.trainable, "reduction": report.reduction,
              "compute_dtype": compute, "base_dtype": base},
        title=f"LoRA {cfg.model.name}", put_batch=place.put_seeded_batch if seeded else place.put_batch,
        put_eval_batch=place.put_batch, on_nonfinite=cfg.train.on_nonfinite,
        seeds=tuple(cfg.train.seeds))
    return task, model, frozen


def train_and_evaluate(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict:
    """The whole LoRA run into cfg.run.dir; returns the summary written to metrics.json."""
    runtime.setup(cfg)
    cfg = gpt2.with_checkpoint_size(cfg)  # model.path decides the architecture, and config.yaml records it
    log.info("%s", dry_run(cfg))  # shapes only: a bad model size or LoRA target fails here, before any data or compute
    return loop.train_and_evaluate(cfg, lambda splits: build_task(cfg, splits)[0], resume=resume, progress=progress)
