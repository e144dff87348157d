"""LoRA fine-tuning of a GPT-2 classifier: jitted train/eval steps and `train_and_evaluate(cfg)`."""
from __future__ import annotations

import logging
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lora_kd_jax import data as data_lib
from lora_kd_jax import metrics as metrics_lib
from lora_kd_jax import mesh as mesh_lib
from lora_kd_jax import precision, rundir, runtime
from lora_kd_jax.config import Config
from lora_kd_jax.errors import UserError
from lora_kd_jax.loop import Task, run_epochs
from lora_kd_jax.models.classifier import GPT2Classifier, build_classifier
from lora_kd_jax.trainable import (ParamReport, apply_if_finite, cast_frozen, combine, make_optimizer, param_report,
                                   partition)

log = logging.getLogger(__name__)

Params = dict[str, Any]
Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    trainable: Params
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data of the dropout key (checkpointable)


def init_state(trainable: Params, tx: optax.GradientTransformation, dropout_key: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                      rng=jax.random.key_data(dropout_key))


def step_key(state: TrainState) -> jax.Array:
    """A fresh dropout key per step, independent of how the run was split into sessions."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def loss_and_sums(model: GPT2Classifier, params: Params, batch: Batch, *, deterministic: bool,
                  rng: jax.Array | None) -> tuple[jax.Array, dict]:
    logits = model.logits(params, batch["input_ids"], batch["attention_mask"], deterministic=deterministic, rng=rng)
    mean, total = metrics_lib.cross_entropy(logits, batch["labels"], batch["weights"])
    return mean, metrics_lib.batch_sums(logits, batch["labels"], batch["weights"], total)


def make_guarded_step(loss_fn: Callable[[Params, Any, Batch, jax.Array], tuple[jax.Array, dict]],
                      tx: optax.GradientTransformation) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
    """The one jitted train step every trainer uses: `loss_fn(trainable, consts, batch, rng) -> (mean loss, sums)`
    is differentiated w.r.t. the trainable tree only; the update is skipped on a NaN/Inf loss (and reported in the
    sums); the state is donated, so parameters and optimizer state are updated in place."""

    def train_step(state: TrainState, consts: Any, batch: Batch) -> tuple[TrainState, dict]:
        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, consts, batch,
                                                                         step_key(state))
        trainable, opt_state = apply_if_finite(tx, loss, grads, state.opt_state, state.trainable)
        return (state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state),
                metrics_lib.guarded_step_sums(loss, state.step, sums))

    return jax.jit(train_step, donate_argnums=(0,))


def make_train_step(model: GPT2Classifier, tx: optax.GradientTransformation,
                    ) -> Callable[[TrainState, Params, Batch], tuple[TrainState, dict]]:
    """LoRA step: consts is the frozen tree (an argument, never a compiled-in constant, never donated)."""

    def loss_fn(trainable: Params, frozen: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        return loss_and_sums(model, combine(trainable, frozen), batch, deterministic=False, rng=rng)

    return make_guarded_step(loss_fn, tx)


def make_eval_step(model: GPT2Classifier) -> Callable[[TrainState, Params, Batch], dict]:
    def eval_step(state: TrainState, frozen: Params, batch: Batch) -> dict:
        return loss_and_sums(model, combine(state.trainable, frozen), batch, deterministic=True, rng=None)[1]

    return jax.jit(eval_step)


def dry_run(cfg: Config) -> ParamReport:
    """Parameter report from shapes alone: no weights are loaded or allocated."""
    _, shapes = build_classifier(cfg, jax.random.key(cfg.train.seed), shapes_only=True)
    return param_report(shapes)


def build_task(cfg: Config, splits: dict[str, data_lib.EncodedSplit]) -> tuple[Task, GPT2Classifier, Params]:
    """Model, optimizer, state and batch sources for a LoRA run; also returns the frozen tree."""
    bs, ebs = cfg.train.batch_size, cfg.train.eval_batch_size or cfg.train.batch_size
    place = mesh_lib.placement_for(cfg.mesh, cfg.distributed, {"train.batch_size": bs, "train.eval_batch_size": ebs})
    k_model, k_dropout = jax.random.split(jax.random.key(cfg.train.seed))
    model, params = build_classifier(cfg, k_model)
    report = param_report(params)
    trainable, frozen = partition(params)
    tx = make_optimizer(cfg.train.lr)
    state = place.state(init_state(trainable, tx, k_dropout))
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
    log.info("%s", dry_run(cfg))  # shapes only: a bad model size or LoRA target fails here, before any data or compute
    with rundir.claim(cfg, resume=resume) as run_dir:
        splits = data_lib.load_splits(cfg)
        task, _, _ = build_task(cfg, splits.encoded)
        task.info["data"] = splits.report()
        summary = run_epochs(task, run_dir, resume=resume, progress=progress)
    log.info("best val accuracy %.4f at epoch %d (train accuracy %.4f, val MCC %.4f)",
             summary["best_val_accuracy"], summary["best_epoch"], summary["train_accuracy_at_best"],
             summary["val_mcc_at_best"])
    return summary


class RunRestoreError(UserError, ValueError):
    """A directory is not a LoRA run whose checkpoint restores; the message says what is wrong."""
    label = "run error"


def restore_lora_run(run_dir: Any, which: str = "best") -> tuple[Config, GPT2Classifier, Params]:
    """(config, model, full params {'gpt2', 'lora', 'head'}) of a LoRA run dir, without any data.

    Rebuilds model and parameters exactly as `build_task` does (same seed, same key split, so the same frozen base),
    then restores the trainable partition (LoRA factors, LayerNorms, head) from `checkpoints/<which>` (best |
    latest). The frozen base is returned in float32, as loaded (model.base_dtype is a storage choice of training).
    """
    import json
    from pathlib import Path

    from lora_kd_jax.checkpoint import CheckpointError, CheckpointStore
    from lora_kd_jax.config import ConfigError, from_dict

    if which not in ("best", "latest"):
        raise ValueError(f"which: {which!r} is not one of best, latest")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunRestoreError(f"{run_dir}: no such directory (expected a LoRA run dir written by "
                              "scripts/train_lora.py)")
    try:
        cfg = from_dict(rundir.read_config(run_dir), str(run_dir / rundir.CONFIG_FILE))
    except FileNotFoundError:
        raise RunRestoreError(f"{run_dir} is not a run directory: no {rundir.CONFIG_FILE} (expected a LoRA run dir "
                              "written by scripts/train_lora.py)") from None
    except ConfigError as e:
        raise RunRestoreError(f"{run_dir}/{rundir.CONFIG_FILE} is not a valid run config: {e}") from None
    metrics_path = run_dir / rundir.METRICS_FILE
    if metrics_path.is_file():
        try:
            kind = json.loads(metrics_path.read_text()).get("kind")
        except (json.JSONDecodeError, AttributeError) as e:
            raise RunRestoreError(f"{metrics_path} is not valid JSON: {e}") from None
        if kind != "lora":
            raise RunRestoreError(f"{run_dir} is not a LoRA run: its {rundir.METRICS_FILE} says kind '{kind}'")
    ckpt = run_dir / "checkpoints" / which
    if not ckpt.is_dir() or not any(c.name.isdigit() for c in ckpt.iterdir()):
        raise RunRestoreError(f"{run_dir} has no {which} checkpoint ({ckpt} holds no step)")
    k_model, k_dropout = jax.random.split(jax.random.key(cfg.train.seed))  # the same split as build_task
    model, params = build_classifier(cfg, k_model)
    trainable, frozen = partition(params)
    state = init_state(trainable, make_optimizer(cfg.train.lr), k_dropout)
    store = CheckpointStore(run_dir / "checkpoints", read_only=True)
    try:
        target = {"state": state, "train_sums": metrics_lib.zeros()}
        tree, record, _ = store.restore_best(target) if which == "best" else store.restore_latest(target)
    except CheckpointError as e:
        raise RunRestoreError(f"{run_dir}: the {which} checkpoint does not restore into the model its "
                              f"{rundir.CONFIG_FILE} describes: {e}") from None
    finally:
        store.close()
    if record.get("kind") != "lora":
        raise RunRestoreError(f"{run_dir}: the {which} checkpoint is a '{record.get('kind')}' run, not a LoRA run")
    return cfg, model, combine(tree["state"].trainable, frozen)
