"""Step-time benchmarks of the real training code, one JSON line per result (`lora-kd-jax bench` runs them).

Every bench jits the same functions training uses (`training.steps.make_train_step`, `Classifier.logits`), on
random-init real-size models with the PyTorch peer's batch
(`benchmarks/peer_torch.py`: right-padded, lengths uniform in [5, seq/2 + 8)). Timings are medians over
`steps` runs after warm-up, with the result blocked on, so they measure device work, not dispatch. The epoch bench
reads the packaged CoLA files and tokenizer (`lora_kd_jax.assets`) without the `datasets` package.

With `seeds` (`--seeds 1,2,4,8`) the seeded benches run instead (SEEDED_BENCHES): for each seed count N, the step
a `train.seeds` run of N seeds compiles (one program, the single-seed step under `jax.vmap`, `steps.Seeded`), with
N stacked train states and an [N, B, L] batch; the frozen GPT-2 base is one shared argument. Their records add
`seeds`, `ms_per_seed_step` (ms_per_step / N) and `argument_bytes` (the executable's argument size: what the seed
axis costs in memory, the shared base counted once).

With `family` (`--family bert|roberta|llama|qwen3|modernbert`) the LoRA train step of that family's random-init
classifier is timed instead, at FAMILY_SIZES (`--variants tiny,base`), on the same batch drawn below the family's vocabulary; its records
add `family`, `trainable` and `total` (benchmarks/peer_torch.py --family times the same step through PEFT).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from lora_kd_jax import data as data_lib
from lora_kd_jax.assets import COLA_DIR, TOKENIZER_DIR
from lora_kd_jax.commands.bench_seeded import bench_seeded, seeded_batch  # noqa: F401 (part of bench's API)
from lora_kd_jax.commands.bench_setup import (BENCHES, FAMILY_BENCHES, FAMILY_SIZES, FAMILY_VOCAB,  # noqa: F401
                                              LORA_VARIANTS, MODES, SEEDED_BENCHES, TINY, VARIANTS, BenchArgs,
                                              default_benches, variant_config)
from lora_kd_jax.commands.bench_timing import (bench_step, compile_once, device_name, peer_batch, record, timed,
                                               trim_padding)
from lora_kd_jax.core import precision
from lora_kd_jax.core.config import Config, load_config
from lora_kd_jax.distill.losses import teacher_objective
from lora_kd_jax.models.build import build_classifier
from lora_kd_jax.models.resolve import resolve
from lora_kd_jax.models.students.build import build_student
from lora_kd_jax.models.tokenizers import tokenizer_for
from lora_kd_jax.training import finetune
from lora_kd_jax.training.state import base_bytes, cast_frozen, param_report, stored_frozen, train_state
from lora_kd_jax.training.steps import cross_entropy_objective, make_train_step



def bench_steps(args: BenchArgs, variant: str, mode: str, batch: dict) -> Iterable[dict]:
    """Every per-step bench asked for; GPT-2 is built only for those that run it."""
    cfg = variant_config(variant, mode, *args.student)
    if not {"lora_train_step", "teacher_forward", "distill_step"}.isdisjoint(args.benches):
        yield from bench_teacher(args, variant, mode, batch, cfg)
    if "distill_step_cached" in args.benches:  # what training runs: teacher logits computed once per dataset
        t_logits = jnp.zeros((batch["input_ids"].shape[0], 2), jnp.float32)
        yield from bench_distill(args, variant, mode, batch, cfg, consts={"teacher_logits": t_logits}, teacher=None)


def bench_lora_variants(args: BenchArgs, variant: str, mode: str, batch: dict, rounds: int = 5) -> Iterable[dict]:
    """The LoRA train step of each of `args.lora_variants` beside plain LoRA (standard init), records tagged with
    `lora_variant` and `ratio_vs_lora`. Every step is compiled first, then the variants are timed round-robin,
    `rounds` rounds of steps/rounds steps each, and each reports the median over its rounds' medians, so a change in
    the machine's load falls on every variant alike."""
    names = ["lora", *(n for n in args.lora_variants if n != "lora")]
    runs, flops, compile_s, base_b = {}, {}, {}, {}
    dev_batch = jax.device_put(batch)
    for name in names:
        cfg = variant_config(variant, mode, *LORA_VARIANTS[name])
        model, params = build_classifier(cfg, jax.random.key(0))
        setup = train_state(model, params, 1e-3, jax.random.key(1))
        frozen = {"frozen": stored_frozen(setup.frozen, cfg, model)}  # qlora_*: quantized block kernels
        base_b[name] = base_bytes(frozen["frozen"])["total"]
        step = make_train_step(model, setup.tx, cross_entropy_objective)
        compiled, compile_s[name], flops[name] = compile_once(step, setup.state, frozen, dev_batch)
        holder = {"state": setup.state}

        def run(compiled=compiled, holder=holder, frozen=frozen):
            holder["state"], sums = compiled(holder["state"], frozen, dev_batch)
            return sums["loss_sum"]

        runs[name] = run
    medians: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            medians[name].append(timed(runs[name], max(args.steps // rounds, 1), args.warmup)[1])
    plain = statistics.median(medians["lora"])
    for name in names:
        ms = statistics.median(medians[name])
        yield record(args, "lora_train_step", variant, mode, batch, None, ms, flops[name],
                     compile_s=round(compile_s[name], 2), lora_variant=name, ratio_vs_lora=round(ms / plain, 3),
                     base_bytes=base_b[name],
                     round_ms=[round(m, 3) for m in medians[name]])


def family_config(family: str, variant: str, mode: str, seq: int) -> Config:
    """A random-init `family` classifier of FAMILY_SIZES[variant], LoRA as the peer's PEFT config: rank 4, alpha 4,
    dropout 0.1, PEFT's init and default targets (query/value; q_proj/v_proj), the head trained."""
    n_layer, n_embd, n_head = FAMILY_SIZES[variant]
    dtype = MODES[mode]
    return resolve(load_config(None, [f"model.type={family}", "model.name=custom", "model.init=random",
                              f"model.n_layer={n_layer}", f"model.n_embd={n_embd}", f"model.n_head={n_head}",
                              f"model.vocab_size={FAMILY_VOCAB[family]}", f"model.n_positions={max(512, seq)}",
                              f"model.dtype={dtype}", f"model.base_dtype={dtype}", "lora.init=standard",
                              "lora.dropout=0.1"]))


def bench_family(args: BenchArgs, variant: str, mode: str, batch: dict) -> Iterable[dict]:
    """The LoRA train step of args.family's classifier (`models.build.build_classifier`, the step training jits);
    records add `family` and the parameter counts (PEFT's trainable / total, the peer's fields)."""
    cfg = family_config(args.family, variant, mode, args.seq)
    model, params = build_classifier(cfg, jax.random.key(0))
    setup = train_state(model, params, 1e-3, jax.random.key(1))
    report = param_report(params, setup.labels)
    frozen = cast_frozen(setup.frozen, precision.base_dtype(cfg.model))
    step = make_train_step(model, setup.tx, cross_entropy_objective)
    first, compile_s, ms, flops, _ = bench_step(step, setup.state, {"frozen": frozen}, jax.device_put(batch),
                                                steps=args.steps, warmup=args.warmup,
                                                profile=args.profiling("lora_train_step", args.family, variant, mode))
    yield record(args, "lora_train_step", variant, mode, batch, first, ms, flops, compile_s=round(compile_s, 2),
                 family=args.family, trainable=report.trainable, total=report.total)


def bench_teacher(args: BenchArgs, variant: str, mode: str, batch: dict, cfg: Config) -> Iterable[dict]:
    model, params = build_classifier(cfg, jax.random.key(0))
    setup = train_state(model, params, 1e-3, jax.random.key(1))
    frozen = cast_frozen(setup.frozen, precision.base_dtype(cfg.model))
    dev_batch = jax.device_put(batch)
    plain = dataclasses.replace(model, spec=None)
    merged = model.merged(params)
    prefix = model.family.prefix
    merged = {**merged, prefix: cast_frozen(merged[prefix], precision.base_dtype(cfg.model))}
    if "lora_train_step" in args.benches:
        state = jax.tree.map(jnp.copy, setup.state)  # donated by the step; `params` stays usable
        step = make_train_step(model, setup.tx, cross_entropy_objective)
        first, compile_s, ms, flops, _ = bench_step(step, state, {"frozen": frozen}, dev_batch, steps=args.steps,
                                                    warmup=args.warmup,
                                                    profile=args.profiling("lora_train_step", variant, mode))
        yield record(args, "lora_train_step", variant, mode, batch, first, ms, flops, compile_s=round(compile_s, 2))
    if "teacher_forward" in args.benches or "distill_step" in args.benches:
        fwd = jax.jit(lambda p, ids, mask: plain.logits(p, ids, mask, deterministic=True))
        if "teacher_forward" in args.benches:
            inputs = (merged, dev_batch["input_ids"], dev_batch["attention_mask"])
            compiled, compile_s, flops = compile_once(fwd, *inputs)
            first, ms = timed(lambda: compiled(*inputs), args.steps, args.warmup)
            yield record(args, "teacher_forward", variant, mode, batch, compile_s + first, ms, flops,
                         compile_s=round(compile_s, 2))
        if "distill_step" in args.benches:  # the peer's step: teacher forward inside, student fwd/bwd + Adam
            yield from bench_distill(args, variant, mode, batch, cfg, consts={"teacher": merged}, teacher=plain)


def bench_distill(args: BenchArgs, variant: str, mode: str, batch: dict, cfg: Config, consts: Any,
                  teacher: Any) -> Iterable[dict]:
    """The seed's student (Emb 50257x768, RNN 768, Linear 2; 64 wide for tiny), T=2, Adam, once per
    `args.student_dtypes` (the student's dtype is chosen per backend from these figures: precision.py)."""
    for student_dtype in args.student_dtypes:
        sc = dataclasses.replace(cfg.student, dtype=student_dtype)
        student, params = build_student(sc, jax.random.key(2))
        setup = train_state(student, params, 1e-3, jax.random.key(3))
        step = make_train_step(student, setup.tx, teacher_objective(2.0, 0.0, teacher))
        name = "distill_step" if teacher is not None else "distill_step_cached"
        first, compile_s, ms, flops, _ = bench_step(step, setup.state, {"frozen": setup.frozen, **consts},
                                                    jax.device_put(batch), steps=args.steps, warmup=args.warmup,
                                                    profile=args.profiling(name, variant, mode, student_dtype))
        yield record(args, name, variant, mode, batch, first, ms, flops, compile_s=round(compile_s, 2),
                     student_dtype=precision.student_dtype(sc), student=student.describe())


# ------------------------------------------------------------------------------------------- many seeds at once


# (data.buckets, data.group_window): padded to data.max_length (20) always; length-aware (rows grouped by length
# within windows of 16 batches, each batch cut to the shortest bucket that holds it)
EPOCH_LAYOUTS = (([], 0), ([8, 12, 16], 16))


def bench_epoch(args: BenchArgs, variant: str, mode: str) -> Iterable[dict]:
    """One CoLA training epoch (LoRA), data pipeline included: host batch building vs device step time; once
    padded to data.max_length and once length-aware (EPOCH_LAYOUTS)."""
    if not args.data_dir:
        return
    for buckets, group_window in EPOCH_LAYOUTS:
        yield from _bench_epoch(args, variant, mode, buckets, group_window)


def epoch_splits(cfg: Config) -> dict[str, data_lib.EncodedSplit]:
    """The splits exactly as training reads and encodes them (`data.load_splits`: from local files it needs no
    `datasets` package, which the GPU image lacks). Only training batches are drawn."""
    return data_lib.load_splits(cfg, tokenizer_for(cfg)).encoded


def _bench_epoch(args: BenchArgs, variant: str, mode: str, buckets: list[int], group_window: int
                 ) -> Iterable[dict]:
    cfg = variant_config(variant, mode, f"data.dir={args.data_dir}", f"data.limit={args.limit}",
                         f"data.tokenizer={args.tokenizer or TOKENIZER_DIR}",
                         f"data.buckets={','.join(map(str, buckets))}", f"data.group_window={group_window}",
                         f"train.batch_size={args.batch}", "train.epochs=1", *args.student)
    splits = epoch_splits(cfg)
    task = finetune.build_task(cfg, splits)

    def one_epoch(epoch: int) -> tuple[float, float]:
        """(wall time of the epoch, time spent building and placing batches on the host)."""
        host = 0.0
        t0 = time.perf_counter()
        batches = iter(task.train_batches(epoch, 0))
        sums = None
        while True:
            th = time.perf_counter()
            b = next(batches, None)
            if b is None:
                break
            b = task.put_batch(b)
            host += time.perf_counter() - th
            task.state, sums = task.train_step(task.state, task.consts, b)
        jax.block_until_ready(sums)
        return time.perf_counter() - t0, host

    first_total, _ = one_epoch(0)
    totals, hosts = [], []
    for e in range(1, 4):
        total, host = one_epoch(e)
        totals.append(total)
        hosts.append(host)
    total, host = statistics.median(totals), statistics.median(hosts)
    n = len(splits["train"])
    yield {"bench": "epoch", "impl": "jax", "variant": variant, "mode": mode, "batch": args.batch,
           "seq": cfg.data.max_length, "buckets": buckets, "group_window": group_window, "examples": n,
           "steps": task.n_train_batches,
           "ms_per_step": round(1e3 * total / task.n_train_batches, 3), "seq_per_s": round(n / total, 1),
           "epoch_s": round(total, 4), "input_pipeline_s": round(host, 4),
           "input_pipeline_share": round(host / total, 4), "first_step_s": round(first_total, 2),
           "device": device_name(), "jax": jax.__version__,
           "compilation_cache": bool(jax.config.jax_compilation_cache_dir)}


def run(args: BenchArgs) -> list[dict]:
    results = []

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        results.append(rec)

    for variant in args.variants:
        full = peer_batch(args.batch, args.seq, **({"vocab": FAMILY_VOCAB[args.family]} if args.family else {}))
        batch = trim_padding(full) if args.trim else full
        for mode in args.modes:
            if args.family:  # that family's LoRA step instead of the study's benches
                for rec in bench_family(args, variant, mode, batch):
                    emit(rec)
                continue
            if args.seeds:  # the seeded benches instead of the single-seed ones
                for rec in bench_seeded(args, variant, mode):
                    emit(rec)
                continue
            if args.lora_variants:  # the LoRA variants' train steps instead
                for rec in bench_lora_variants(args, variant, mode, batch):
                    emit(rec)
                continue
            for rec in bench_steps(args, variant, mode, batch):
                emit(rec)
            if "epoch" in args.benches:
                for rec in bench_epoch(args, variant, mode):
                    emit(rec)
    return results


def default_paths() -> tuple[str, str]:
    """(CoLA dir, tokenizer dir) the CLI defaults to: the copies the package ships (lora_kd_jax.assets)."""
    return str(COLA_DIR), str(TOKENIZER_DIR)
