"""The teacher of a distillation: a finished LoRA run (read through `training.restore.open_run`) of any family (GPT-2,
BERT, RoBERTa, Llama: the student then reads that teacher's tokenizer and vocabulary), merged into plain base
weights, frozen and run in eval mode; which teacher teaches which student seed; its logits for a whole split.

The teacher is frozen and deterministic, so by default its logits for the training split are computed once and
gathered per batch on device (`distill.cache_teacher_logits`). A transfer set (distill.augment, distill.unlabeled)
is many times the training set: its logits are also kept on disk (`teacher_logits_for(cache_dir=...)`), so a resume
or another student reads them back instead of running the teacher again.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lora_kd_jax import data as data_lib
from lora_kd_jax.core import precision
from lora_kd_jax.core.config import Config, ConfigError, StudentConfig, n_outputs
from lora_kd_jax.data.tasks import label_names
from lora_kd_jax.core.keys import seed_list
from lora_kd_jax.models.build import title as model_title
from lora_kd_jax.models.classifier import Classifier
from lora_kd_jax.models.interface import token_inputs
from lora_kd_jax.runs import reader as runs
from lora_kd_jax.runs import rundir
from lora_kd_jax.training import mesh as mesh_lib
from lora_kd_jax.runs.seed_dirs import seed_dir
from lora_kd_jax.training.restore import open_run
from lora_kd_jax.training.scoring import score_rows
from lora_kd_jax.training.state import cast_frozen, param_report
from lora_kd_jax.training.steps import for_steps

log = logging.getLogger(__name__)

Params = dict[str, Any]


@functools.lru_cache(maxsize=8)
def _forward(model: Classifier, out_sharding: Any) -> Callable[..., jax.Array]:
    """A teacher's jitted eval-mode forward, one per model and mesh: equal teachers in a process compile it once."""
    return jax.jit(lambda p, ids, mask, types: model.logits(p, ids, mask, deterministic=True, **token_inputs(types)),
                   out_shardings=out_sharding)


@dataclasses.dataclass
class Teacher:
    """A restored, merged, frozen LoRA teacher."""

    model: Classifier  # no LoRA spec: params are merged plain weights
    params: Params  # {the family's prefix: merged base, 'head': ...}, placed like a frozen base
    config: Config  # the teacher run's own config
    run_dir: Path
    total_params: int
    trainable_params: int
    best_epoch: int
    val_accuracy: float
    placement: mesh_lib.Placement

    def __post_init__(self):
        self._forward = _forward(for_steps(self.model), mesh_lib.replicated(self.placement.mesh))

    def logits(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> jax.Array:
        """Eval-mode logits [B, 2] (replicated, so every process can read them); `token_type_ids`: a BERT
        teacher's segment ids of sentence pairs (the batch's, `models.interface.token_inputs`), else None."""
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self._forward(self.params, input_ids, attention_mask, types)


def check_teacher(path: str, cfg: Config) -> runs.RunInfo:
    """Cheap checks before any data is read or weights are built: `path` holds a LoRA run with a best checkpoint
    whose vocabulary and label set match the student's. An unfinished teacher is used, with a warning naming its
    epochs."""
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
    if t_vocab != s_vocab and s_vocab != StudentConfig().vocab_size:  # left at its default, it takes the teacher's
        raise runs.RunError(f"distill.teacher: vocabulary size differs: the teacher in {info.path} has "
                            f"model.vocab_size={t_vocab}, the student has student.vocab_size={s_vocab}; they must "
                            "read the same token ids (leave student.vocab_size at its default to take the teacher's)")
    theirs, ours = (label_names(c) or ("regression",) for c in (info.config, cfg))
    if (n_outputs(info.config), theirs) != (n_outputs(cfg), ours):
        raise runs.RunError(f"distill.teacher: the teacher in {info.path} learned the labels {', '.join(theirs)} "
                            f"({n_outputs(info.config)} outputs), this student's data has {', '.join(ours)} "
                            f"({n_outputs(cfg)} outputs); distil on the teacher's task (its data.* settings)")
    if info.epochs_done < info.config.train.epochs:
        log.warning("distill.teacher: %s finished %d of its %d epochs; distilling from its best epoch so far",
                    info.path, info.epochs_done, info.config.train.epochs)
    return info


def in_teacher_vocabulary(cfg: Config, infos: dict[int, runs.RunInfo]) -> Config:
    """`cfg` reading its data as its teacher does, whatever the family: the teacher run's model section (so
    `tokenizer_for` gives its tokenizer, and the student's config.yaml names it for `evaluate`), its tokenizer as
    data.tokenizer, and student.vocab_size = the teacher's model.vocab_size (the default is replaced, with a note;
    another value was refused by `check_teacher`)."""
    seen = {(i.config.model.type, i.config.model.path, i.config.data.tokenizer, i.config.model.vocab_size)
            for i in infos.values()}
    first = next(iter(infos.values()))
    t = first.config
    if len(seen) > 1:
        raise ConfigError(f"distill.teacher={cfg.distill.teacher}: its seeds read different checkpoints or "
                          f"tokenizers ({sorted(map(str, seen))}); a student reads one vocabulary")
    if cfg.data.max_length > t.model.n_positions:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the {t.model.n_positions} positions of the "
                          f"{t.model.type} teacher in {first.path}; set data.max_length <= {t.model.n_positions}")
    vocab = t.model.vocab_size
    if cfg.student.vocab_size != vocab:
        log.warning("student.vocab_size=%d replaced by the %s teacher's vocabulary: %d (the student reads the "
                    "teacher's token ids)", cfg.student.vocab_size, t.model.type, vocab)
    return dataclasses.replace(cfg, model=t.model,
                               data=dataclasses.replace(cfg.data, tokenizer=t.data.tokenizer or t.model.path),
                               student=dataclasses.replace(cfg.student, vocab_size=vocab))


def teacher_runs(cfg: Config) -> dict[int, runs.RunInfo]:
    """Which teacher run teaches each student seed, checked (once: `check_teacher`) before anything is built: a
    single-seed teacher teaches every seed; a seeded teacher (train.seeds) gives student seed k its own seed k, and
    must have the student's seed list."""
    path = cfg.distill.teacher
    student_seeds = seed_list(cfg)
    try:
        teacher_seeds = runs.run_seeds(path) if path else []
    except runs.RunError as e:
        raise runs.RunError(f"distill.teacher: {e}") from None
    if not teacher_seeds:
        info = check_teacher(path, cfg)
        return {seed: info for seed in student_seeds}
    if teacher_seeds != list(cfg.train.seeds):
        mine = f"train.seeds={cfg.train.seeds}" if cfg.train.seeds else f"one seed (train.seed={cfg.train.seed})"
        raise runs.RunError(f"distill.teacher={path} trained seeds {teacher_seeds}, this student trains {mine}: a "
                            f"seeded teacher teaches the same seed list (train.seeds={teacher_seeds}); to let one "
                            f"teacher seed teach every student seed, name its dir, e.g. "
                            f"distill.teacher={seed_dir(path, teacher_seeds[0])}")
    if not cfg.distill.cache_teacher_logits:
        raise runs.RunError(f"distill.teacher={path} is seeded and distill.cache_teacher_logits=false: running "
                            f"{len(teacher_seeds)} teachers in every step would hold each of them in memory; "
                            "use the cached teacher logits (distill.cache_teacher_logits=true, the default)")
    return {seed: check_teacher(str(seed_dir(path, seed)), cfg) for seed in student_seeds}


def restore_teacher(path: str | runs.RunInfo, cfg: Config) -> Teacher:
    """The teacher as its run left it (`open_run`: the same model and frozen base, the trained parameters from
    checkpoints/best), LoRA merged into the kernels, placed on this run's mesh (Orbax restores onto any mesh).
    `path` may be the `RunInfo` that `check_teacher` returned."""
    info = path if isinstance(path, runs.RunInfo) else check_teacher(path, cfg)
    try:
        run = open_run(info, kind="lora", which="best")
    except runs.RunError as e:
        raise runs.RunError(f"distill.teacher: {e}") from None
    teacher_cfg = run.config
    report = param_report(run.params, run.model.param_labels(run.params))
    merged = run.model.merged(run.params)
    base = run.model.family.prefix
    merged[base] = cast_frozen(merged[base], precision.base_dtype(teacher_cfg.model))
    place = mesh_lib.run_placement(cfg)
    params = place.frozen(merged)
    teacher = Teacher(model=dataclasses.replace(run.model, spec=None, base=None), params=params, config=teacher_cfg,
                      run_dir=run.path, total_params=report.total, trainable_params=report.trainable,
                      best_epoch=int(run.summary.get("best_epoch", 0)),
                      val_accuracy=float(run.summary.get("best_val_accuracy", math.nan)), placement=place)
    log.info("teacher %s (%s): best checkpoint, epoch %d, val accuracy %.4f; computes in %s, base stored in %s",
             run.path, model_title(teacher_cfg), teacher.best_epoch, teacher.val_accuracy,
             precision.compute_dtype(teacher_cfg.model), precision.base_dtype(teacher_cfg.model))
    return teacher


def teacher_logits_for(teacher: Teacher, split: data_lib.EncodedSplit, batch_size: int,
                       cache_dir: str | os.PathLike | None = None, report: dict | None = None) -> jax.Array:
    """The teacher's logits for every row of `split`, float32 [N, 2], replicated on the mesh (row i = example i).

    Computed with the same fixed-shape batches the training uses (file order), so each row sees the same program.
    With `cache_dir`, they are kept there as `<fingerprint>.npy` (`logits_fingerprint`: the rows, the batch size and
    the teacher) and read back when that file exists; `report` receives the file, whether it was reused, and the
    seconds spent."""
    t0 = time.perf_counter()
    path = Path(cache_dir) / f"{logits_fingerprint(teacher, split, batch_size)}.npy" if cache_dir is not None else None
    reused = path is not None and path.is_file()
    if reused:
        out = np.load(path)
        log.info("teacher logits for %d rows read from %s", len(split), path)
    else:
        out, _ = score_rows(split, batch_size, lambda b: (teacher.logits(b["input_ids"], b["attention_mask"],
                                                                         b.get("token_type_ids")), None),
                            teacher.placement.put_batch)
        if path is not None and mesh_lib.is_main_process():
            _save_npy(path, out)
            log.info("teacher logits for %d rows computed in %.1f s, kept in %s", len(split),
                     time.perf_counter() - t0, path)
    if report is not None:
        report.update({"file": str(path) if path else None, "reused": reused,
                       "seconds": round(time.perf_counter() - t0, 3)})
    return teacher.placement.state(jnp.asarray(out))


def logits_fingerprint(teacher: Teacher, split: data_lib.EncodedSplit, batch_size: int) -> str:
    """What the cached logits depend on, hashed: the rows' ids and mask (and token types, when a BERT pair split
    has them), the batch size (the batch's program), the teacher's run dir, its metrics.json (rewritten by every
    epoch it trains, so a retrained teacher is new) and its compute dtype."""
    h = hashlib.sha256()
    types = () if split.token_type_ids is None else (split.token_type_ids,)
    for arr in (split.input_ids, split.attention_mask, *types):
        h.update(np.ascontiguousarray(arr).tobytes())
        h.update(str(arr.shape).encode())
    h.update(f"{batch_size}|{teacher.run_dir.resolve()}|{precision.compute_dtype(teacher.config.model)}".encode())
    metrics = teacher.run_dir / rundir.METRICS_FILE
    h.update(metrics.read_bytes() if metrics.is_file() else b"")
    return h.hexdigest()[:24]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write whole or not at all (a temporary renamed over `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def restore_teachers(infos: dict[int, runs.RunInfo], cfg: Config) -> Teacher | dict[int, Teacher]:
    """One Teacher when every seed has the same teacher run, else {seed: Teacher}."""
    if len({info.path for info in infos.values()}) == 1:
        return restore_teacher(next(iter(infos.values())), cfg)
    return {seed: restore_teacher(info, cfg) for seed, info in infos.items()}
