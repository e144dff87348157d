"""Knowledge distillation into the RNN student, and the same student trained from scratch (the baseline).

Distillation: the teacher is a finished LoRA run, restored from its best Orbax checkpoint, merged into plain GPT-2
weights and run in eval mode (deterministic, no gradient). The student (train mode) minimises

    T² · KL(softmax(t/T) ‖ softmax(s/T))  (batch mean)  +  alpha · CE(s, labels)

which for alpha=0 is the original's `F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T*T`.

Why T=2 by default: a LoRA-fine-tuned teacher is confident on most CoLA training sentences (it reaches ~98% train
accuracy), so at T=1 its two-class targets are nearly one-hot and KL carries little beyond the hard label. Dividing
the logits by 2 keeps the ranking but exposes how sure the teacher is (a 0.98/0.02 split becomes about 0.88/0.12),
which is the "dark knowledge" distillation transfers; much larger T flattens every target towards 0.5/0.5. The T²
factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015), so the learning rate need
not change with T. 2 is also the common default in the distillation literature.

Teacher logits: the teacher is frozen and deterministic, so by default (`distill.cache_teacher_logits`) its logits
for the whole training split are computed once, kept on device as an [N, 2] array passed to every step, and
gathered per batch with the batch's row indices. The test suite checks that this gives the same training run as
calling the teacher inside every step (`cache_teacher_logits=false`, which keeps the teacher's weights on device
and costs a teacher forward pass per step).

Metrics: the training loss is the objective above (what the student minimises); the validation loss is
cross-entropy on the gold labels, the same quantity for every run of the study. Accuracy and MCC are against
the gold labels throughout.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_kd_jax import data as data_lib
from lora_kd_jax import mesh as mesh_lib
from lora_kd_jax import metrics as metrics_lib
from lora_kd_jax import precision, rundir, runtime
from lora_kd_jax.config import Config, ConfigError, from_dict
from lora_kd_jax.errors import UserError
from lora_kd_jax.loop import Task, run_epochs
from lora_kd_jax.models.classifier import GPT2Classifier
from lora_kd_jax.models.student import RNNStudent, build_student, count_params
from lora_kd_jax.train import TrainState, init_state, make_guarded_step

log = logging.getLogger(__name__)

Params = dict[str, Any]
Batch = dict[str, jax.Array]
Objective = Callable[[jax.Array, Any, Batch], tuple[jax.Array, jax.Array]]


class TeacherError(UserError, ValueError):
    """distill.teacher does not point at a usable LoRA run; the message says what is wrong."""
    label = "teacher error"


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


def make_optimizer(lr: float) -> optax.GradientTransformation:
    """Adam with torch.optim.Adam's defaults; every student parameter trains (no frozen partition)."""
    return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def make_train_step(student: RNNStudent, tx: optax.GradientTransformation, objective: Objective
                    ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
    """One jitted step: student forward, objective(student_logits, consts, batch), Adam update, metric sums.

    As the LoRA step: a non-finite loss leaves parameters and optimizer state unchanged and is reported in the sums
    (the loop then stops or skips, per train.on_nonfinite)."""

    def loss_fn(params: Params, consts: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
        logits = student.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        mean, total = objective(logits, consts, batch)
        return mean, metrics_lib.batch_sums(logits, batch["labels"], batch["weights"], total)

    return make_guarded_step(loss_fn, tx)


def make_eval_step(student: RNNStudent) -> Callable[[TrainState, Any, Batch], dict]:
    """Cross-entropy against the gold labels + confusion counts; consts (teacher data) are not used."""

    def eval_step(state: TrainState, consts: Any, batch: Batch) -> dict:
        logits = student.apply({"params": state.trainable}, batch["input_ids"], batch["attention_mask"])
        _, total = metrics_lib.cross_entropy(logits, batch["labels"], batch["weights"])
        return metrics_lib.batch_sums(logits, batch["labels"], batch["weights"], total)

    return jax.jit(eval_step)


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


def placement(cfg: Config) -> mesh_lib.Placement:
    bs, ebs = cfg.train.batch_size, cfg.train.eval_batch_size or cfg.train.batch_size
    return mesh_lib.placement_for(cfg.mesh, cfg.distributed, {"train.batch_size": bs, "train.eval_batch_size": ebs})


def resolve_teacher_dir(path: str) -> Path:
    """The LoRA run dir that `path` names: the run dir itself, its checkpoints/ dir, or checkpoints/best|latest."""
    if not path:
        raise TeacherError("distill.teacher is empty: pass distill.teacher=PATH, the run dir of a finished LoRA "
                           "run (scripts/train_lora.py) or its checkpoints/ dir")
    p = Path(path).expanduser()
    if not p.exists():
        raise TeacherError(f"distill.teacher: {p} does not exist (expected a LoRA run dir or its checkpoints/ dir)")
    candidates = [p]
    if p.name == "checkpoints":
        candidates.append(p.parent)
    if p.parent.name == "checkpoints" and p.name in ("best", "latest"):
        candidates.append(p.parent.parent)
    for c in candidates:
        if (c / rundir.CONFIG_FILE).is_file():
            return c
    raise TeacherError(f"distill.teacher: {p} is not a LoRA run: no {rundir.CONFIG_FILE} there (expected the run "
                       "dir written by scripts/train_lora.py, or its checkpoints/ dir)")


def check_teacher(path: str, cfg: Config) -> tuple[Path, Config]:
    """Cheap checks that fail before any data is read or any weights are built: the path exists, holds a LoRA run
    (config.yaml, metrics.json with kind 'lora', a best checkpoint) whose vocabulary matches the student's."""
    run_dir = resolve_teacher_dir(path)
    try:
        teacher_cfg = from_dict(rundir.read_config(run_dir), str(run_dir / rundir.CONFIG_FILE))
    except ConfigError as e:
        raise TeacherError(f"distill.teacher: {run_dir}/{rundir.CONFIG_FILE} is not a valid run config: {e}") from None
    metrics_path = run_dir / rundir.METRICS_FILE
    if not metrics_path.is_file():
        raise TeacherError(f"distill.teacher: {run_dir} has no {rundir.METRICS_FILE}: that run never finished an "
                           "epoch, so it has no best checkpoint to distil from")
    try:
        kind = json.loads(metrics_path.read_text()).get("kind")
    except (json.JSONDecodeError, AttributeError) as e:
        raise TeacherError(f"distill.teacher: {metrics_path} is not valid JSON: {e}") from None
    if kind != "lora":
        raise TeacherError(f"distill.teacher: {run_dir} is not a LoRA run: its {rundir.METRICS_FILE} says kind "
                           f"'{kind}'; the teacher must be a run of scripts/train_lora.py")
    best = run_dir / "checkpoints" / "best"
    if not best.is_dir() or not any(c.name.isdigit() for c in best.iterdir()):
        raise TeacherError(f"distill.teacher: {run_dir} has no best checkpoint ({best} holds no step)")
    t_vocab, s_vocab = teacher_cfg.model.vocab_size, cfg.student.vocab_size
    if t_vocab != s_vocab:
        raise TeacherError(f"distill.teacher: vocabulary size differs: the teacher in {run_dir} has "
                           f"model.vocab_size={t_vocab}, the student has student.vocab_size={s_vocab}; they must "
                           "read the same token ids")
    return run_dir, teacher_cfg


def restore_teacher(path: str, cfg: Config) -> Teacher:
    """The teacher as its run left it: `train.restore_lora_run` rebuilds the model and frozen base exactly (same
    seed, same key split) and restores the trainable parameters from checkpoints/best; LoRA is merged into the
    kernels and the result is placed on this run's mesh (what a teacher computes depends on its weights only, and
    Orbax restores onto any mesh)."""
    from lora_kd_jax import train
    from lora_kd_jax.trainable import cast_frozen, param_report

    run_dir, teacher_cfg = check_teacher(path, cfg)
    try:
        _, model, params = train.restore_lora_run(run_dir, "best")
    except train.RunRestoreError as e:
        raise TeacherError(f"distill.teacher: {e}") from None
    report = param_report(params)
    merged = model.merged(params)
    merged["gpt2"] = cast_frozen(merged["gpt2"], precision.base_dtype(teacher_cfg.model))
    place = placement(cfg)
    params = place.frozen(merged)
    vocab = params["gpt2"]["wte"]["embedding"].shape[0]
    if vocab != cfg.student.vocab_size:
        raise TeacherError(f"distill.teacher: vocabulary size differs: the teacher's embedding has {vocab} rows, "
                           f"the student has student.vocab_size={cfg.student.vocab_size}")
    summary = json.loads((run_dir / rundir.METRICS_FILE).read_text()).get("summary", {})
    teacher = Teacher(model=GPT2Classifier(model.module, None), params=params, config=teacher_cfg, run_dir=run_dir,
                      total_params=report.total, trainable_params=report.trainable,
                      best_epoch=int(summary.get("best_epoch", 0)),
                      val_accuracy=float(summary.get("best_val_accuracy", math.nan)), placement=place)
    log.info("teacher %s (%s): best checkpoint, epoch %d, val accuracy %.4f; computes in %s, base stored in %s",
             run_dir, teacher_cfg.model.name, teacher.best_epoch, teacher.val_accuracy,
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
    k_model, k_dropout = jax.random.split(jax.random.key(cfg.train.seed))  # the same split as train.build_task
    student, params = build_student(cfg.student, k_model)
    tx = make_optimizer(cfg.train.lr)
    n = count_params(params)
    sc = cfg.student
    log.info("student: %s%s, embed %d, hidden %d, pooling %s, computing in %s: %.2fM params (%d), all trainable",
             sc.cell, " bidirectional" if sc.bidirectional else "", sc.embed_dim, sc.hidden_dim, sc.pooling,
             precision.student_dtype(sc), n / 1e6, n)
    return student, place.state(init_state(params, tx, k_dropout)), tx, n


def _task(cfg: Config, splits: dict[str, data_lib.EncodedSplit], *, kind: str, consts: Any, objective: Objective,
          info: dict, title: str, place: mesh_lib.Placement | None = None) -> Task:
    place = place or placement(cfg)
    student, state, tx, n = _student_state(cfg, place)
    batches = data_lib.batch_sources(splits, cfg)
    return Task(
        kind=kind, state=state, consts=consts,
        train_step=make_train_step(student, tx, objective), eval_step=make_eval_step(student),
        train_batches=batches.train, eval_batches=batches.eval, n_train_batches=batches.n_train_batches,
        epochs=cfg.train.epochs, reported_batches=batches.reported,
        info={"total_params": n, "trainable_params": n, "reduction": 0.0,
              "student_dtype": precision.student_dtype(cfg.student), **info}, title=title,
        put_batch=place.put_batch, on_nonfinite=cfg.train.on_nonfinite)


def build_distill_task(cfg: Config, splits: dict[str, data_lib.EncodedSplit], teacher: Teacher) -> Task:
    d = cfg.distill
    if d.cache_teacher_logits:
        consts = {"teacher_logits": teacher_logits_for(teacher, splits["train"], cfg.train.batch_size)}
        objective = distillation_objective(d.temperature, d.alpha)
    else:
        consts = {"teacher": teacher.params}
        objective = distillation_objective(d.temperature, d.alpha, teacher.model)
    info = {"teacher": str(teacher.run_dir), "teacher_model": teacher.config.model.name,
            "teacher_total_params": teacher.total_params, "teacher_trainable_params": teacher.trainable_params,
            "teacher_val_accuracy": teacher.val_accuracy,
            "teacher_compute_dtype": precision.compute_dtype(teacher.config.model),
            "teacher_base_dtype": precision.base_dtype(teacher.config.model),
            "temperature": d.temperature, "alpha": d.alpha,
            "train_loss": "T^2 KL(teacher||student) + alpha CE", "val_loss": "CE"}
    return _task(cfg, splits, kind="distill", consts=consts, objective=objective, info=info,
                 title=f"DistilRNN ({teacher.config.model.name} teacher)", place=teacher.placement)


def build_rnn_task(cfg: Config, splits: dict[str, data_lib.EncodedSplit]) -> Task:
    return _task(cfg, splits, kind="rnn", consts={}, objective=cross_entropy_objective,
                 info={"train_loss": "CE", "val_loss": "CE"}, title="RNN from scratch")


def distill_and_evaluate(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict:
    """The whole distillation run into cfg.run.dir; the teacher is checked before anything is built or written."""
    runtime.setup(cfg)
    check_teacher(cfg.distill.teacher, cfg)
    with rundir.claim(cfg, resume=resume) as run_dir:
        splits = data_lib.load_splits(cfg)
        teacher = restore_teacher(cfg.distill.teacher, cfg)
        task = build_distill_task(cfg, splits.encoded, teacher)
        task.info["data"] = splits.report()
        summary = run_epochs(task, run_dir, resume=resume, progress=progress)
    _log_summary(summary)
    return summary


def train_rnn_and_evaluate(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict:
    """The RNN baseline (cross-entropy from scratch) into cfg.run.dir."""
    runtime.setup(cfg)
    with rundir.claim(cfg, resume=resume) as run_dir:
        splits = data_lib.load_splits(cfg)
        task = build_rnn_task(cfg, splits.encoded)
        task.info["data"] = splits.report()
        summary = run_epochs(task, run_dir, resume=resume, progress=progress)
    _log_summary(summary)
    return summary


def _log_summary(summary: dict) -> None:
    log.info("best val accuracy %.4f at epoch %d (train accuracy %.4f, val MCC %.4f)", summary["best_val_accuracy"],
             summary["best_epoch"], summary["train_accuracy_at_best"], summary["val_mcc_at_best"])
