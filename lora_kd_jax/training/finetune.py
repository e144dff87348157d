"""LoRA fine-tuning of a family's classifier: its task for the epoch loop, and `train_lora(cfg)`."""
from __future__ import annotations

import dataclasses
import logging

import jax

from lora_kd_jax import data as data_lib
from lora_kd_jax.core import precision
from lora_kd_jax.training import runtime
from lora_kd_jax.core.config import Config, n_outputs, select_metric
from lora_kd_jax.core.keys import classifier_base_key, run_keys, seed_list
from lora_kd_jax.models import build as build_lib
from lora_kd_jax.models.resolve import resolve
from lora_kd_jax.runs.seed_dirs import is_seeded
from lora_kd_jax.training import loop
from lora_kd_jax.training import mesh as mesh_lib
from lora_kd_jax.training.loop import Task
from lora_kd_jax.training.optimizer import learning_rate, total_steps
from lora_kd_jax.training.state import (ParamReport, base_bytes, describe_bytes, param_report, partition, seed_states,
                                        stored_frozen)
from lora_kd_jax.training.steps import Seeded, cross_entropy_objective, make_eval_step, make_train_step

log = logging.getLogger(__name__)


def dry_run(cfg: Config) -> ParamReport:
    """Parameter report from shapes alone: no weights are loaded or allocated."""
    cfg = resolve(cfg)
    model, shapes = build_lib.build_classifier(cfg, run_keys(seed_list(cfg)[0]).model, shapes_only=True)
    return param_report(shapes, model.param_labels(shapes))


def dry_run_plan(cfg: Config) -> str:
    """--dry-run's printout (`build.plan`), from shapes alone: the adapted modules and the parameter counts."""
    cfg = resolve(cfg)
    model, shapes = build_lib.build_classifier(cfg, run_keys(seed_list(cfg)[0]).model, shapes_only=True)
    labels = model.param_labels(shapes)
    frozen = jax.eval_shape(lambda f: stored_frozen(f, cfg, model), partition(shapes, labels)[1])
    return build_lib.plan(model, shapes, param_report(shapes, labels)) + "\n" + describe_bytes(frozen, cfg)


def build_task(cfg: Config, splits: dict[str, data_lib.EncodedSplit]) -> Task:
    """Model, optimizer, state and batch sources for a LoRA run. With train.seeds the state stacks one trainable
    state per seed (its own adapters, head and dropout key) over one frozen base."""
    place = mesh_lib.run_placement(cfg)
    seeds = seed_list(cfg)
    seeded = Seeded(consts_axes=None) if is_seeded(cfg) else None
    model, _ = build_lib.build_classifier(cfg, run_keys(seeds[0]).model, base_key=classifier_base_key(cfg),
                                         sharding_for=place.leaf)
    batches = data_lib.batch_sources(splits, cfg)
    steps = total_steps(cfg.train, batches.n_train_batches)
    setup = seed_states(model, cfg.train, seeds, stacked=seeded is not None, total_steps=steps)
    report = param_report(setup.params, setup.labels)
    model = dataclasses.replace(model, base=None)  # the jitted steps keep `model`: not the fp32 base beside `frozen`
    compute, base = precision.compute_dtype(cfg.model), precision.base_dtype(cfg.model)
    frozen = place.frozen(stored_frozen(setup.frozen, cfg, model))
    log.info("%s computes in %s, frozen base stored in %s (model.dtype=%s, model.base_dtype=%s, backend %s)%s",
             build_lib.title(cfg), compute, base, cfg.model.dtype, cfg.model.base_dtype, jax.default_backend(),
             f"; {len(seeds)} seeds {seeds} in one program, one shared base" if seeded else "")
    log.info("%s", describe_bytes(frozen, cfg))
    return Task(
        kind="lora", state=place.state(setup.state), consts={"frozen": frozen},
        train_step=make_train_step(model, setup.tx, cross_entropy_objective, seeded, accumulate=cfg.train.accumulate,
                                   lr=learning_rate(cfg.train, steps),
                                   state_sharding=place.state_sharding),
        eval_step=make_eval_step(model, seeded),
        train_batches=batches.train, eval_batches=batches.eval, n_train_batches=batches.n_train_batches,
        epochs=cfg.train.epochs, reported_batches=batches.reported,
        info={"total_params": report.total, "trainable_params": report.trainable, "reduction": report.reduction,
              "compute_dtype": compute, "base_dtype": base, "quantize": cfg.lora.quantize,
              "base_bytes": base_bytes(frozen)["total"]},
        title=f"LoRA {build_lib.title(cfg)}", put_batch=place.put_seeded_batch if seeded else place.put_batch,
        put_eval_batch=place.put_batch, on_nonfinite=cfg.train.on_nonfinite,
        seeds=tuple(cfg.train.seeds), select=select_metric(cfg), n_outputs=n_outputs(cfg))


def lora_config(cfg: Config) -> Config:
    """The config a LoRA run records: the architecture its checkpoint or named size decides, the label set of its
    training file (the head's size). Reads configs only."""
    return data_lib.resolve_task(resolve(cfg))


def train_lora(cfg: Config, *, resume: bool = False, progress: bool = True, profile: int = 0) -> dict:
    """The whole LoRA run into cfg.run.dir; returns the summary written to metrics.json."""
    runtime.setup(cfg)
    cfg = lora_config(cfg)
    log.info("%s", dry_run(cfg))  # shapes only: a bad model size or LoRA target fails here, before any data or compute
    return loop.train_and_evaluate(cfg, lambda splits: build_task(cfg, splits), resume=resume, progress=progress,
                                   profile=profile)
