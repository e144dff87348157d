"""The student trainer: knowledge distillation from a LoRA teacher (`distill`), and the same student trained from
scratch on the labels (`train_student`, the baseline; `train_rnn` is its old name). Training loss is the objective; validation loss is cross-entropy
on the gold labels, as for every run of the study.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax.numpy as jnp

from lora_kd_jax import data as data_lib
from lora_kd_jax.core import precision
from lora_kd_jax.training import runtime
from lora_kd_jax.core.config import Config, ConfigError, n_outputs, select_metric
from lora_kd_jax.core.keys import run_keys, seed_list
from lora_kd_jax.distill import transfer as transfer_lib
from lora_kd_jax.distill.embeddings import student_embedding
from lora_kd_jax.distill.losses import teacher_objective
from lora_kd_jax.distill.teacher import (Teacher, in_teacher_vocabulary, restore_teachers,
                                         teacher_logits_for, teacher_runs)
from lora_kd_jax.models.build import title as model_title
from lora_kd_jax.models.students import transformer as transformer_student
from lora_kd_jax.models.students.build import build_student, student_arch
from lora_kd_jax.runs.reader import RunInfo
from lora_kd_jax.runs.seed_dirs import is_seeded
from lora_kd_jax.training import loop
from lora_kd_jax.training import mesh as mesh_lib
from lora_kd_jax.training.loop import Task
from lora_kd_jax.training.optimizer import learning_rate, total_steps
from lora_kd_jax.training.state import TrainSetup, param_report, seed_states
from lora_kd_jax.training.steps import Objective, Seeded, cross_entropy_objective, make_eval_step, make_train_step

log = logging.getLogger(__name__)


def _student_setup(cfg: Config, total_steps: int, embedding: Any = None, teacher_base: Any = None
                   ) -> tuple[Any, TrainSetup, int]:
    """The student and its (seed-stacked, with train.seeds) state from the one state recipe (the learning rate
    schedule spans `total_steps`); `embedding`: the table its 'embed' starts from (student.embeddings=teacher);
    `teacher_base`: the teacher's merged base a transformer student is sliced from."""
    seeds = seed_list(cfg)
    student, _ = build_student(cfg, run_keys(seeds[0]).model, shapes_only=True, embedding=embedding,
                               teacher_base=teacher_base)
    setup = seed_states(student, cfg.train, seeds, stacked=is_seeded(cfg), total_steps=total_steps)
    n = param_report(setup.params, setup.labels).total
    sc = cfg.student
    log.info("student: %s, %s embeddings: %.2fM params (%d), all trainable%s",
             student.describe(), sc.embeddings, n / 1e6, n,
             f"; {len(seeds)} seeds {cfg.train.seeds} in one program" if is_seeded(cfg) else "")
    return student, setup, n


def _task(cfg: Config, splits: dict[str, data_lib.EncodedSplit], *, kind: str, consts: Any, objective: Objective,
          info: dict, title: str, place: mesh_lib.Placement | None = None, consts_axes: Any = None,
          seed_info: dict[int, dict] | None = None, seed_labels: dict | None = None, embedding: Any = None,
          teacher_base: Any = None) -> Task:
    place = place or mesh_lib.run_placement(cfg)
    batches = data_lib.batch_sources(splits, cfg, seed_labels)
    steps = total_steps(cfg.train, batches.n_train_batches)
    student, setup, n = _student_setup(cfg, steps, embedding, teacher_base)
    seeded = Seeded(consts_axes) if is_seeded(cfg) else None
    return Task(
        kind=kind, state=place.state(setup.state), consts={"frozen": {}, **consts},
        train_step=make_train_step(student, setup.tx, objective, seeded, accumulate=cfg.train.accumulate,
                                   lr=learning_rate(cfg.train, steps),
                                   state_sharding=place.state_sharding),
        eval_step=make_eval_step(student, seeded),
        train_batches=batches.train, eval_batches=batches.eval, n_train_batches=batches.n_train_batches,
        epochs=cfg.train.epochs, reported_batches=batches.reported,
        info={"total_params": n, "trainable_params": n, "reduction": 0.0,
              "student_dtype": precision.student_dtype(cfg.student),
              "student_arch": cfg.student.arch, "student_embeddings": cfg.student.embeddings, **info}, title=title,
        put_batch=place.put_seeded_batch if seeded else place.put_batch, put_eval_batch=place.put_batch,
        on_nonfinite=cfg.train.on_nonfinite, seeds=tuple(cfg.train.seeds), seed_info=seed_info or {},
        select=select_metric(cfg), n_outputs=n_outputs(cfg))


def _teacher_info(teacher: Teacher) -> dict:
    return {"teacher": str(teacher.run_dir), "teacher_model": model_title(teacher.config),
            "teacher_total_params": teacher.total_params, "teacher_trainable_params": teacher.trainable_params,
            "teacher_val_accuracy": teacher.val_accuracy,
            "teacher_compute_dtype": precision.compute_dtype(teacher.config.model),
            "teacher_base_dtype": precision.base_dtype(teacher.config.model)}


def build_distill_task(cfg: Config, splits: dict[str, data_lib.EncodedSplit], teacher: Teacher | dict[int, Teacher]
                       ) -> Task:
    """The distillation task; `teacher` is one teacher for every seed, or {seed: teacher} (cached logits stacked
    per seed, so student seed k learns from teacher seed k). With distill.augment or distill.unlabeled the student
    trains on the transfer set (`transfer.build_transfer_set`), its teacher logits kept on disk."""
    d = cfg.distill
    seed_info: dict[int, dict] = {}
    transfer = transfer_lib.build_transfer_set(cfg, splits["train"]) if transfer_lib.wanted(cfg) else None
    cache_dir = transfer_lib.logits_cache_dir(cfg) if transfer else None
    labelling: dict[str, dict] = {}
    if transfer:
        splits = {**splits, "train": transfer.split}
    seed_labels = None
    if isinstance(teacher, dict):
        logits = [teacher_logits_for(teacher[seed], splits["train"], cfg.train.batch_size, cache_dir,
                                     labelling.setdefault(f"seed_{seed}", {})) for seed in cfg.train.seeds]
        if transfer:
            seed_labels = {seed: transfer_lib.teacher_labels(transfer, t) for seed, t in zip(cfg.train.seeds, logits)}
        consts, consts_axes = {"teacher_logits": jnp.stack(logits)}, {"frozen": None, "teacher_logits": 0}
        objective = teacher_objective(d.temperature, d.alpha, loss=d.loss)
        seed_info = {seed: _teacher_info(t) for seed, t in teacher.items()}
        first = teacher[cfg.train.seeds[0]]
        info = {**_teacher_info(first), "teacher": str(first.run_dir.parent), "teacher_per_seed": True}
        del info["teacher_val_accuracy"]  # each seed's own is in its seed dir's summary
        place = first.placement
        consts = place.state(consts)
    else:
        if d.cache_teacher_logits:
            consts = {"teacher_logits": teacher_logits_for(teacher, splits["train"], cfg.train.batch_size, cache_dir,
                                                           labelling.setdefault("teacher", {}))}
            if transfer:
                labels = transfer_lib.teacher_labels(transfer, consts["teacher_logits"])
                splits = {**splits, "train": dataclasses.replace(transfer.split, labels=labels)}
            objective = teacher_objective(d.temperature, d.alpha, loss=d.loss)
        else:
            consts = {"teacher": teacher.params}
            objective = teacher_objective(d.temperature, d.alpha, teacher.model, loss=d.loss)
        consts_axes, info, place = None, _teacher_info(teacher), teacher.placement
        first = teacher
    term = "||teacher - student||^2 (logits)" if d.loss == "mse" else "T^2 KL(teacher||student)"
    info.update({"temperature": d.temperature, "alpha": d.alpha, "train_loss": f"{term} + alpha CE", "val_loss": "CE"})
    if d.loss != "kl":
        info["distill_loss"] = d.loss
    if transfer:
        info["transfer_set"] = {**transfer.report, "teacher_labelling": labelling}
    embedding = teacher_base = None
    if student_arch(cfg).from_teacher_layers:  # its layers, embeddings included, from the one teacher (`distill`)
        if isinstance(teacher, dict):
            raise ConfigError(_one_teacher_message(cfg, sorted({str(t.run_dir) for t in teacher.values()})))
        if not cfg.student.teacher_layers:
            raise ConfigError(f"student.arch={cfg.student.arch}: the config is not resolved against its teacher "
                              "(students.transformer.with_teacher; `distill` does it)")
        teacher_base = teacher.params[teacher.model.family.prefix]
        info["student_teacher_layers"] = list(cfg.student.teacher_layers)
    else:
        embedding = student_embedding(cfg, teacher)
    return _task(cfg, splits, kind="distill", consts=consts, objective=objective, info=info,
                 title=f"Distil{cfg.student.arch.upper()} ({model_title(first.config)} teacher)", place=place, consts_axes=consts_axes,
                 seed_info=seed_info, seed_labels=seed_labels, embedding=embedding, teacher_base=teacher_base)


def _one_teacher_message(cfg: Config, paths: list[str]) -> str:
    return (f"student.arch={cfg.student.arch} with distill.teacher={cfg.distill.teacher}, whose seeds are different "
            f"teachers "
            f"({', '.join(paths)}): the student's layers are sliced from one teacher; name one seed's dir, e.g. "
            f"distill.teacher={paths[0]}")


def transformer_student_config(cfg: Config, infos: dict[int, RunInfo]) -> Config:
    """`cfg` with the transformer student's keys resolved against its one teacher run
    (`students.transformer.with_teacher`); other students: `cfg` unchanged. Reads configs only, no weights."""
    if not student_arch(cfg).from_teacher_layers:
        return cfg
    paths = sorted({str(info.path) for info in infos.values()})
    if len(paths) > 1:
        raise ConfigError(_one_teacher_message(cfg, paths))
    first = next(iter(infos.values()))
    return transformer_student.with_teacher(cfg, first.config, f"distill.teacher={first.path}")


def build_baseline_task(cfg: Config, splits: dict[str, data_lib.EncodedSplit], embedding: Any = None) -> Task:
    """The baseline: the student (any student.arch) on the labels alone; `embedding` as `_student_setup`'s."""
    return _task(cfg, splits, kind="rnn", consts={}, objective=cross_entropy_objective,
                 info={"train_loss": "CE", "val_loss": "CE"}, title=f"{cfg.student.arch.upper()} from scratch",
                 embedding=embedding)


def distill_config(cfg: Config) -> tuple[Config, dict[int, RunInfo]]:
    """(the config a distillation run records, its teacher run per seed): the task's label set, the teacher's model
    section, tokenizer and vocabulary, and a transformer student's layers made explicit. Reads configs only."""
    cfg = data_lib.resolve_task(cfg)
    infos = teacher_runs(cfg)
    cfg = in_teacher_vocabulary(cfg, infos)  # the teacher's tokenizer and vocabulary
    return transformer_student_config(cfg, infos), infos  # student.arch=transformer: its layers and family, explicit


def distill(cfg: Config, *, resume: bool = False, progress: bool = True, profile: int = 0) -> dict:
    """The whole distillation run into cfg.run.dir; the teacher is checked before anything is built or written."""
    runtime.setup(cfg)
    cfg, infos = distill_config(cfg)
    return loop.train_and_evaluate(cfg, lambda splits: build_distill_task(cfg, splits, restore_teachers(infos, cfg)),
                                   resume=resume, progress=progress, profile=profile)


def baseline_config(cfg: Config) -> tuple[Config, dict[int, RunInfo] | None]:
    """(the config a baseline run records, the teacher whose token table it starts from, if any)."""
    cfg = data_lib.resolve_task(cfg)
    if cfg.student.teacher_layers:
        raise ConfigError(f"student.teacher_layers={cfg.student.teacher_layers} with train-student: the baseline starts "
                          "from a random init, there is no teacher to take layers from; drop it (student.layers "
                          "sets its depth)")
    infos = None
    if cfg.student.embeddings == "teacher":  # the teacher is checked here, restored (and the table logged) in the run
        if not cfg.distill.teacher:
            raise ConfigError("student.embeddings=teacher needs distill.teacher=RUN_DIR: the LoRA run whose token "
                              "embeddings (wte) the student starts from")
        infos = teacher_runs(cfg)
        cfg = in_teacher_vocabulary(cfg, infos)
    return cfg, infos


def train_student(cfg: Config, *, resume: bool = False, progress: bool = True, profile: int = 0) -> dict:
    """The student baseline (cross-entropy from scratch) into cfg.run.dir; student.embeddings=teacher reads its
    table from distill.teacher, which is otherwise unused here."""
    runtime.setup(cfg)
    cfg, infos = baseline_config(cfg)

    def build(splits: dict[str, data_lib.EncodedSplit]) -> Task:
        embedding = student_embedding(cfg, restore_teachers(infos, cfg)) if infos else None
        return build_baseline_task(cfg, splits, embedding)

    return loop.train_and_evaluate(cfg, build, resume=resume,
                                   progress=progress, profile=profile)


train_rnn = train_student  # the command's old name (it trains any student.arch)
