"""Knowledge distillation into the RNN student, and the same student trained from scratch (the baseline).

The teacher is a finished LoRA run (read through `runs.open_run`), merged into plain GPT-2 weights and run in eval
mode. The student minimises T²·KL(softmax(t/T) ‖ softmax(s/T)) (batch mean) + alpha·CE(s, labels); alpha=0 is the
original's `kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T*T`. The README explains the default
T=2. The teacher is frozen and deterministic, so by default its logits for the training split are computed once and
gathered per batch on device (`distill.cache_teacher_logits`). Training loss is the objective; validation loss is
cross-entropy on the gold labels, as for every run of the study.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_kd_jax import data as data_lib
from lora_kd_jax.training import mesh as mesh_lib
from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.training import loop
from lora_kd_jax.training import precision
from lora_kd_jax.runs import rundir
from lora_kd_jax.core import runtime
from lora_kd_jax.runs import reader as runs
from lora_kd_jax.training import steps
from lora_kd_jax.training import seeds as seeds_lib
from lora_kd_jax.core.config import Config
from lora_kd_jax.core.keys import run_keys
from lora_kd_jax.training.loop import Task
from lora_kd_jax.models.classifier import GPT2Classifier
from lora_kd_jax.models.student import RNNStudent, build_student, count_params
from lora_kd_jax.training.steps import TrainState, init_state
from lora_kd_jax.training.trainable import adam

log = logging.getLogger(__name__)

Params = dict[str, Any]
Batch = dict[str, jax.Array]
Objective = Callable[[jax.Array, Any, Batch], tuple[jax.Array, jax.Array]]


# ------------------------------------------------------------------------------------------------ losses


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


def distill_objective(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                      weights: jax.Array, temperature: float, alpha: float) -> tuple[jax.Array, jax.Array]:
    """(mean, sum) of kd_loss + alpha · cross-entropy on the hard labels (alpha=0: the original, KL only)."""
    mean, total = kd_loss(student_logits, teacher_logits, temperature, weights)
    if alpha:
        ce_mean, ce_total = metrics_lib.cross_entropy(student_logits, labels, weights)
        mean, total = mean + alpha * ce_mean, total + alpha * ce_total
    return mean, total


# ------------------------------------------------------------------------------------------------ steps


def make_train_step(student: RNNStudent, tx: optax.GradientTransformation, objective: Objective,
                    seeded: steps.Seeded | None = None) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
    """One jitted step: student forward, objective(student_logits, consts, batch), Adam update, metric sums.

    As the LoRA step: a non-finite loss leaves parameters and optimizer state unchanged and is reported in the sums
    (the loop then stops or skips, per train.on_nonfinite)."""

    def loss_fn(params: Params, consts: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        logits = student.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        mean, total = objective(logits, consts, batch)
        return mean, metrics_lib.batch_sums(logits, batch["labels"], batch["weights"], total)

    return steps.make_guarded_step(loss_fn, tx, seeded)


def make_eval_step(student: RNNStudent, seeded: steps.Seeded | None = None
                   ) -> Callable[[TrainState, Any, Batch], dict]:
    """Cross-entropy against the gold labels + confusion counts; consts (teacher data) are not used."""
    return steps.make_eval_step(
        lambda params, consts, batch: student.apply({"params": params}, batch["input_ids"], batch["attention_mask"]),
        seeded)


def cross_entropy_objective(logits: jax.Array, consts: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    return metrics_lib.cross_entropy(logits, batch["labels"], batch["weights"])


def distillation_objective(temperature: float, alpha: float, teacher: GPT2Classifier | None = None) -> Objective:
    """The KD objective reading teacher logits from consts: the cached array {'teacher_logits': [N, 2]} gathered
    by batch['index'] (teacher=None), or a teacher forward pass on {'teacher': merged params}."""

    def objective(logits: jax.Array, consts: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        if teacher is None:
            t = consts["teacher_logits"][batch["index"]]
        else:
            t = teacher.logits(consts["teacher"], batch["input_ids"], batch["attention_mask"], deterministic=True)
        return distill_objective(logits, jax.lax.stop_gradient(t), batch["labels"], batch["weights"],
                                 temperature, alpha)

    return objective


# ----------------------------------------------------------------------------------------------- teacher


@dataclasses.dataclass
class Teacher:
    """A restored, merged, frozen LoRA teacher."""

    model: GPT2Classifier  # no LoRA spec: params are merged plain weights
    params: Params  # {'gpt2': merged base, 'head': ...}, placed like a frozen base
    config: Config  # the teacher run's own config
    run_dir: Path
    total_params: int
    trainable_params: int
    best_epoch: int
    val_accuracy: float
    placement: mesh_lib.Placement

    def __post_init__(self):
        self._forward = jax.jit(lambda p, ids, mask: self.model.logits(p, ids, mask, deterministic=True),
                                out_shardings=mesh_lib.replicated(self.placement.mesh))

    def logits(self, input_ids: Any, attention_mask: Any) -> jax.Array:
        """Eval-mode logits [B, 2] (replicated, so every process can read them)."""
        return self._forward(self.params, input_ids, attention_mask)


def check_teacher(path: str, cfg: Config) -> runs.RunInfo:
    """Cheap checks before any data is read or weights are built: `path` holds a LoRA run with a best checkpoint
    whose vocabulary matches the student's. An unfinished teacher is used, with a warning naming its epochs."""
    if not path:
        raise runs.RunError("distill.teacher is empty: pass distill.teacher=PATH, the run dir of a finished LoRA run "
                            "(lora-kd-jax train-lora) or its checkpoints/ dir")
    try:
        info = runs.inspect_run(path, kind="lora", which="best")
    except runs.RunError as e:
        raise runs.RunError(f"distill.teacher: {e}") from None
    if info.kind is None:
        raise runs.RunError(f"distill.teacher: {info.path} has no {rundir.METRICS_FILE}: that run never finished an "
                            "epoch, so it has no best checkpoint to distil from")
    t_vocab, s_vocab = info.config.model.vocab_size, cfg.student.vocab_size
    if t_vocab != s_vocab:
        raise runs.RunError(f"distill.teacher: vocabulary size differs: the teacher in {info.path} has "
                            f"model.vocab_size={t_vocab}, the student has student.vocab_size={s_vocab}; they must "
                            "read the same token ids")
    if info.epochs_done < info.config.train.epochs:
        log.warning("distill.teacher: %s finished %d of its %d epochs; distilling from its best epoch so far",
                    info.path, info.epochs_done, info.config.train.epochs)
    return info


def teacher_dirs(cfg: Config) -> dict[int, str]:
    """Which teacher run teaches each student seed, checked before anything is built: a single-seed teacher teaches
    every seed; a seeded teacher (train.seeds) gives student seed k its own seed k, and must have the student's
    seed list. Every teacher dir passes `check_teacher`."""
    path = cfg.distill.teacher
    student_seeds = seeds_lib.seed_list(cfg)
    try:
        teacher_seeds = runs.run_seeds(path) if path else []
    except runs.RunError as e:
        raise runs.RunError(f"distill.teacher: {e}") from None
    if not teacher_seeds:
        check_teacher(path, cfg)
        return {seed: path for seed in student_seeds}
    if teacher_seeds != list(cfg.train.seeds):
        mine = f"train.seeds={cfg.train.seeds}" if cfg.train.seeds else f"one seed (train.seed={cfg.train.seed})"
        raise runs.RunError(f"distill.teacher={path} trained seeds {teacher_seeds}, this student trains {mine}: a "
                            f"seeded teacher teaches the same seed list (train.seeds={teacher_seeds}); to let one "
                            f"teacher seed teach every student seed, name its dir, e.g. "
                            f"distill.teacher={seeds_lib.seed_dir(path, teacher_seeds[0])}")
    if not cfg.distill.cache_teacher_logits:
        raise runs.RunError(f"distill.teacher={path} is seeded and distill.cache_teacher_logits=false: running "
                            f"{len(teacher_seeds)} GPT-2 teachers in every step would hold each of them in memory; "
                            "use the cached teacher logits (distill.cache_teacher_logits=true, the default)")
    out = {seed: str(seeds_lib.seed_dir(path, seed)) for seed in student_seeds}
    for teacher in out.values():
        check_teacher(teacher, cfg)
    return out


def restore_teacher(path: str, cfg: Config) -> Teacher:
    """The teacher as its run left it (`runs.open_run`: the same model and frozen base, the trained parameters from
    checkpoints/best), LoRA merged into the kernels, placed on this run's mesh (Orbax restores onto any mesh)."""
    from lora_kd_jax.training.trainable import cast_frozen, param_report

    info = check_teacher(path, cfg)
    try:
        run = runs.open_run(info.path, kind="lora", which="best")
    except runs.RunError as e:
        raise runs.RunError(f"distill.teacher: {e}") from None
    teacher_cfg = run.config
    report = param_report(run.params)
    merged = run.model.merged(run.params)
    merged["gpt2"] = cast_frozen(merged["gpt2"], precision.base_dtype(teacher_cfg.model))
    place = mesh_lib.run_placement(cfg)
    params = place.frozen(merged)
    teacher = Teacher(model=GPT2Classifier(run.model.module, None), params=params, config=teacher_cfg,
                      run_dir=run.path, total_params=report.total, trainable_params=report.trainable,
                      best_epoch=int(run.summary.get("best_epoch", 0)),
                      val_accuracy=float(run.summary.get("best_val_accuracy", math.nan)), placement=place)
    log.info("teacher %s (%s): best checkpoint, epoch %d, val accuracy %.4f; computes in %s, base stored in %s",
             run.path, teacher_cfg.model.name, teacher.best_epoch, teacher.val_accuracy,
             precision.compute_dtype(teacher_cfg.model), precision.base_dtype(teacher_cfg.model))
    return teacher


def teacher_logits_for(teacher: Teacher, split: data_lib.EncodedSplit, batch_size: int) -> jax.Array:
    """The teacher's logits for every row of `split`, float32 [N, 2], replicated on the mesh (row i = example i).

    Computed with the same fixed-shape batches the training uses (file order), so each row sees the same program."""
    out = np.zeros((len(split), 2), np.float32)
    for batch in data_lib.batch_iterator(split, batch_size, shuffle=False):
        on_device = teacher.placement.put_batch(batch)
        logits = np.asarray(jax.device_get(teacher.logits(on_device["input_ids"], on_device["attention_mask"])))
        real = batch["weights"] > 0
        out[batch["index"][real]] = logits[real]
    return teacher.placement.state(jnp.asarray(out))


# ------------------------------------------------------------------------------------------------- tasks


def _student_state(cfg: Config, place: mesh_lib.Placement
                   ) -> tuple[RNNStudent, TrainState, optax.GradientTransformation, int]:
    """The student, its (seed-stacked, with train.seeds) train state, optimizer and parameter count."""
    tx = adam(cfg.train.lr)
    states = []
    for seed in seeds_lib.seed_list(cfg):
        keys = run_keys(seed)
        student, params = build_student(cfg.student, keys.model)
        states.append(init_state(params, tx, keys.dropout))
    n = count_params(states[0].trainable)
    sc = cfg.student
    log.info("student: %s%s, embed %d, hidden %d, pooling %s, computing in %s: %.2fM params (%d), all trainable%s",
             sc.cell, " bidirectional" if sc.bidirectional else "", sc.embed_dim, sc.hidden_dim, sc.pooling,
             precision.student_dtype(sc), n / 1e6, n,
             f"; {len(states)} seeds {cfg.train.seeds} in one program" if seeds_lib.is_seeded(cfg) else "")
    state = seeds_lib.stack(states) if seeds_lib.is_seeded(cfg) else states[0]
    return student, place.state(state), tx, n


def _task(cfg: Config, splits: dict[str, data_lib.EncodedSplit], *, kind: str, consts: Any, objective: Objective,
          info: dict, title: str, place: mesh_lib.Placement | None = None, consts_axes: Any = None,
          seed_info: dict[int, dict] | None = None) -> Task:
    place = place or mesh_lib.run_placement(cfg)
    student, state, tx, n = _student_state(cfg, place)
    batches = data_lib.batch_sources(splits, cfg)
    seeded = steps.Seeded(consts_axes) if seeds_lib.is_seeded(cfg) else None
    return Task(
        kind=kind, state=state, consts=consts,
        train_step=make_train_step(student, tx, objective, seeded), eval_step=make_eval_step(student, seeded),
        train_batches=batches.train, eval_batches=batches.eval, n_train_batches=batches.n_train_batches,
        epochs=cfg.train.epochs, reported_batches=batches.reported,
        info={"total_params": n, "trainable_params": n, "reduction": 0.0,
              "student_dtype": precision.student_dtype(cfg.student), **info}, title=title,
        put_batch=place.put_seeded_batch if seeded else place.put_batch, put_eval_batch=place.put_batch,
        on_nonfinite=cfg.train.on_nonfinite, seeds=tuple(cfg.train.seeds), seed_info=seed_info or {})


def _teacher_info(teacher: Teacher) -> dict:
    return {"teacher": str(teacher.run_dir), "teacher_model": teacher.config.model.name,
            "teacher_total_params": teacher.total_params, "teacher_trainable_params": teacher.trainable_params,
            "teacher_val_accuracy": teacher.val_accuracy,
            "teacher_compute_dtype": precision.compute_dtype(teacher.config.model),
            "teacher_base_dtype": precision.base_dtype(teacher.config.model)}


def build_distill_task(cfg: Config, splits: dict[str, data_lib.EncodedSplit], teacher: Teacher | dict[int, Teacher]
                       ) -> Task:
    """The distillation task; `teacher` is one teacher for every seed, or {seed: teacher} (cached logits stacked
    per seed, so student seed k learns from teacher seed k)."""
    d = cfg.distill
    seed_info: dict[int, dict] = {}
    if isinstance(teacher, dict):
        logits = [teacher_logits_for(teacher[seed], splits["train"], cfg.train.batch_size)
                  for seed in cfg.train.seeds]
        consts, consts_axes = {"teacher_logits": jnp.stack(logits)}, {"teacher_logits": 0}
        objective = distillation_objective(d.temperature, d.alpha)
        seed_info = {seed: _teacher_info(t) for seed, t in teacher.items()}
        first = teacher[cfg.train.seeds[0]]
        info = {**_teacher_info(first), "teacher": str(first.run_dir.parent), "teacher_per_seed": True}
        del info["teacher_val_accuracy"]  # each seed's own is in its seed dir's summary
        place = first.placement
        consts = place.state(consts)
    else:
        if d.cache_teacher_logits:
            consts = {"teacher_logits": teacher_logits_for(teacher, splits["train"], cfg.train.batch_size)}
            objective = distillation_objective(d.temperature, d.alpha)
        else:
            consts = {"teacher": teacher.params}
            objective = distillation_objective(d.temperature, d.alpha, teacher.model)
        consts_axes, info, place = None, _teacher_info(teacher), teacher.placement
        first = teacher
    info.update({"temperature": d.temperature, "alpha": d.alpha,
                 "train_loss": "T^2 KL(teacher||student) + alpha CE", "val_loss": "CE"})
    return _task(cfg, splits, kind="distill", consts=consts, objective=objective, info=info,
                 title=f"DistilRNN ({first.config.model.name} teacher)", place=place, consts_axes=consts_axes,
                 seed_info=seed_info)


def build_rnn_task(cfg: Config, splits: dict[str, data_lib.EncodedSplit]) -> Task:
    return _task(cfg, splits, kind="rnn", consts={}, objective=cross_entropy_objective,
                 info={"train_loss": "CE", "val_loss": "CE"}, title="RNN from scratch")


def restore_teachers(dirs: dict[int, str], cfg: Config) -> Teacher | dict[int, Teacher]:
    """One Teacher when every seed has the same teacher dir, else {seed: Teacher}."""
    if len(set(dirs.values())) == 1:
        return restore_teacher(next(iter(dirs.values())), cfg)
    return {seed: restore_teacher(path, cfg) for seed, path in dirs.items()}


def distill_and_evaluate(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict:
    """The whole distillation run into cfg.run.dir; the teacher is checked before anything is built or written."""
    runtime.setup(cfg)
    dirs = teacher_dirs(cfg)
    return loop.train_and_evaluate(cfg, lambda splits: build_distill_task(cfg, splits, restore_teachers(dirs, cfg)),
                                   resume=resume, progress=progress)


def train_rnn_and_evaluate(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict:
    """The RNN baseline (cross-entropy from scratch) into cfg.run.dir."""
    runtime.setup(cfg)
    return loop.train_and_evaluate(cfg, lambda splits: build_rnn_task(cfg, splits), resume=resume,
                                   progress=progress)
