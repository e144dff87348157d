"""The seeded benches (`bench --seeds 1,2,4,8`): the step a `train.seeds` run of N seeds compiles (one program, the
single-seed step under `jax.vmap`, `steps.Seeded`), with N stacked train states and an [N, B, L] batch; the frozen
GPT-2 base is one shared argument."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lora_kd_jax import data as data_lib
from lora_kd_jax.commands.bench_setup import BenchArgs, variant_config
from lora_kd_jax.commands.bench_timing import bench_step, peer_batch, record, trim_padding
from lora_kd_jax.core import precision
from lora_kd_jax.core.config import Config
from lora_kd_jax.core.keys import run_keys
from lora_kd_jax.distill.losses import teacher_objective
from lora_kd_jax.models.build import build_classifier
from lora_kd_jax.models.interface import ClassifierModel
from lora_kd_jax.models.students.build import build_student
from lora_kd_jax.training.state import TrainSetup, cast_frozen, seed_states
from lora_kd_jax.training.steps import Seeded, cross_entropy_objective, make_train_step


def seeded_batch(args: BenchArgs, n: int) -> dict[str, np.ndarray]:
    """The train batch of n seeds, [n, B, L]: seed i's own peer batch (`peer_batch(seed=i)`, different ids, lengths
    and labels per seed, as each seed of a run draws its own data order; seed 0's is the single-seed benches'
    batch), each trimmed as those are, then stacked by `data.stack_batches` (right-padded to the longest)."""
    batches = [peer_batch(args.batch, args.seq, seed=i) for i in range(n)]
    return data_lib.stack_batches([trim_padding(b) if args.trim else b for b in batches])


def first_seeds(setup: TrainSetup, n: int) -> Any:
    """Seeds 0..n-1 of a stacked state (a copy: the step donates it)."""
    return jax.tree.map(lambda x: jnp.copy(x[:n]), setup.state)


def bench_seeded(args: BenchArgs, variant: str, mode: str) -> Iterable[dict]:
    """The SEEDED_BENCHES asked for, each once per seed count in `args.seeds` (and per student dtype for the
    student's two); GPT-2 is built only for the LoRA step."""
    cfg = variant_config(variant, mode, *args.student)
    batches = {n: seeded_batch(args, n) for n in args.seeds}
    if "lora_train_step" in args.benches:
        yield from bench_lora_seeded(args, variant, mode, cfg, batches)
    names = [name for name in ("distill_step_cached", "student_step") if name in args.benches]
    for student_dtype in args.student_dtypes if names else []:
        sc = dataclasses.replace(cfg.student, dtype=student_dtype)
        student, _ = build_student(sc, run_keys(0).model, shapes_only=True)
        # seeds 0..max-1 as a seeded run builds them (the one state recipe); the first N serve every N
        setup = seed_states(student, 1e-3, range(max(args.seeds)), stacked=True)
        for name in names:
            yield from bench_student_seeded(args, variant, mode, batches, name, student, setup,
                                            precision.student_dtype(sc))


def seeded_record(args: BenchArgs, bench: str, variant: str, mode: str, batch: dict, timing: tuple,
                  **extra: Any) -> dict:
    first, compile_s, ms, flops, arg_bytes = timing
    n = batch["input_ids"].shape[0]
    return record(args, bench, variant, mode, batch, first, ms, flops, seeds=n, ms_per_seed_step=round(ms / n, 3),
                  argument_bytes=arg_bytes, compile_s=round(compile_s, 2), **extra)


def bench_lora_seeded(args: BenchArgs, variant: str, mode: str, cfg: Config, batches: dict[int, dict]
                      ) -> Iterable[dict]:
    """`make_train_step(model, tx, objective, Seeded(None))`: N LoRA states, one frozen base (in_axes None); the
    states are seeds 0..N-1 as a seeded run builds them (the one state recipe)."""
    model, _ = build_classifier(cfg, jax.random.key(0))
    setup = seed_states(model, 1e-3, range(max(batches)), stacked=True)
    frozen = cast_frozen(setup.frozen, precision.base_dtype(cfg.model))
    step = make_train_step(model, setup.tx, cross_entropy_objective, Seeded(None))
    for n, batch in batches.items():
        timing = bench_step(step, first_seeds(setup, n), {"frozen": frozen}, jax.device_put(batch),
                            steps=args.steps, warmup=args.warmup,
                            profile=args.profiling("lora_train_step", variant, mode, f"{n}seeds"))
        yield seeded_record(args, "lora_train_step", variant, mode, batch, timing)


def bench_student_seeded(args: BenchArgs, variant: str, mode: str, batches: dict[int, dict], name: str,
                         student: ClassifierModel, setup: TrainSetup, student_dtype: str) -> Iterable[dict]:
    """The student's step with N seeds (the first N of `states`): distill_step_cached reads each seed's own cached
    teacher logits ({'teacher_logits': [N, B, 2]}, consts_axes {'frozen': None, 'teacher_logits': 0}: a seeded teacher teaching its
    own seed), student_step is the RNN baseline (cross-entropy on the labels, no constants)."""
    if name == "distill_step_cached":
        objective, seeded = teacher_objective(2.0, 0.0), Seeded({"frozen": None, "teacher_logits": 0})
    else:
        objective, seeded = cross_entropy_objective, Seeded(None)
    step = make_train_step(student, setup.tx, objective, seeded)
    for n, batch in batches.items():
        consts: Any = {"frozen": {}}
        if name == "distill_step_cached":
            rows = batch["input_ids"].shape[1]
            consts["teacher_logits"] = jax.random.normal(jax.random.key(4), (n, rows, 2), jnp.float32)
        timing = bench_step(step, first_seeds(setup, n), consts, jax.device_put(batch), steps=args.steps,
                            warmup=args.warmup,
                            profile=args.profiling(name, variant, mode, student_dtype, f"{n}seeds"))
        yield seeded_record(args, name, variant, mode, batch, timing, student_dtype=student_dtype,
                            student=student.describe())
