"""Step-time benchmarks of the real training code, one JSON line per result (`lora-kd-jax bench` runs them).

Every bench jits the same functions training uses (`training.steps.make_train_step`, `GPT2Classifier.logits`), on
random-init real-size models with the PyTorch peer's batch
(`benchmarks/peer_torch.py`: right-padded, lengths uniform in [5, seq/2 + 8)). Timings are medians over
`steps` runs after warm-up, with the result blocked on, so they measure device work, not dispatch. The epoch bench
reads the packaged CoLA files and tokenizer (`lora_kd_jax.assets`) without the `datasets` package.

With `seeds` (`--seeds 1,2,4,8`) the seeded benches run instead (SEEDED_BENCHES): for each seed count N, the step
a `train.seeds` run of N seeds compiles (one program, the single-seed step under `jax.vmap`, `steps.Seeded`), with
N stacked train states and an [N, B, L] batch; the frozen GPT-2 base is one shared argument. Their records add
`seeds`, `ms_per_seed_step` (ms_per_step / N) and `argument_bytes` (the executable's argument size: what the seed
axis costs in memory, the shared base counted once).

With `family` (`--family bert|roberta|llama`) the LoRA train step of that family's random-init classifier is timed
instead, at FAMILY_SIZES (`--variants tiny,base`), on the same batch drawn below the family's vocabulary; its records
add `family`, `trainable` and `total` (benchmarks/peer_torch.py --family times the same step through PEFT).
"""
from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lora_kd_jax import data as data_lib
from lora_kd_jax.core import precision
from lora_kd_jax.training import finetune
from lora_kd_jax.assets import COLA_DIR, TOKENIZER_DIR
from lora_kd_jax.core.config import Config, load_config
from lora_kd_jax.core.keys import run_keys
from lora_kd_jax.distill.losses import teacher_objective
from lora_kd_jax.models.classifier import build_classifier
from lora_kd_jax.models.interface import ClassifierModel
from lora_kd_jax.models.student import build_student
from lora_kd_jax.training.state import TrainSetup, cast_frozen, seed_states, train_state
from lora_kd_jax.training.steps import Seeded, cross_entropy_objective, make_train_step

# tiny: a CPU smoke size for teacher and student alike (both keep the real 50,257-token vocabulary)
TINY = ["model.name=custom", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "student.embed_dim=64",
        "student.hidden_dim=64"]
VARIANTS = {"gpt2": ["model.name=gpt2"], "gpt2-medium": ["model.name=gpt2-medium"], "tiny": TINY}
BENCHES = ("lora_train_step", "teacher_forward", "distill_step", "distill_step_cached", "epoch")
# with seeds: the LoRA step, the cached-logits distillation step and the RNN baseline step, N seeds in one program
SEEDED_BENCHES = ("lora_train_step", "distill_step_cached", "student_step")
MODES = {"fp32": "float32", "bf16": "bfloat16"}  # the teacher's compute and frozen-base dtype
# --lora-variants: the LoRA train step of each, beside plain LoRA (standard init, same rank, dropout, batch)
LORA_VARIANTS = {
    "lora": ["lora.init=standard"],
    "rslora": ["lora.init=standard", "lora.scaling=rslora"],
    "dora": ["lora.init=standard", "lora.variant=dora"],
    "lora_plus": ["lora.init=standard", "lora.plus_ratio=16"],
    "pissa": ["lora.init=pissa"],
    "olora": ["lora.init=olora"],
    "dora_rslora_plus": ["lora.init=standard", "lora.variant=dora", "lora.scaling=rslora", "lora.plus_ratio=16"],
}


# --family: the LoRA train step of a random-init BERT / RoBERTa / Llama sequence classifier instead of GPT-2's
# (benchmarks/peer_torch.py --family times the same through PEFT). Sizes: (n_layer, n_embd, n_head), the feed-forward
# 4 x n_embd wide; "base" is bert-base's and roberta-base's shape (for Llama the same shape, no released size).
FAMILY_SIZES = {"tiny": (2, 64, 4), "base": (12, 768, 12)}
FAMILY_VOCAB = {"bert": 30522, "roberta": 50265, "llama": 32000}  # bert-base-uncased's, roberta-base's, Llama 2's
FAMILY_BENCHES = ("lora_train_step",)


def default_benches(variants: list[str]) -> list[str]:
    """Everything, except a full CoLA epoch of a real-size model on a CPU (minutes per epoch there)."""
    if jax.default_backend() == "cpu" and any(v != "tiny" for v in variants):
        return [b for b in BENCHES if b != "epoch"]
    return list(BENCHES)


@dataclasses.dataclass
class BenchArgs:
    variants: list[str]
    modes: list[str]
    benches: list[str]
    batch: int = 128
    seq: int = 64
    steps: int = 30
    warmup: int = 3
    peak_tflops: float = 0.0
    student_dtypes: list[str] = dataclasses.field(default_factory=lambda: ["auto"])  # measured side by side
    trim: bool = True  # length-aware: drop all-padding columns (exact for right padding + causal attention)
    data_dir: str = ""  # epoch bench: a CoLA dir in raw layout ('' skips the bench; the CLI passes the packaged one)
    limit: int = 0  # epoch bench: first N CoLA training sentences (data.limit); 0 = the full 8,551
    tokenizer: str = ""  # '' = the packaged GPT-2 tokenizer
    seeds: list[int] = dataclasses.field(default_factory=list)  # seed counts N: the seeded benches instead; [] = none
    lora_variants: list[str] = dataclasses.field(default_factory=list)  # LORA_VARIANTS to time instead; [] = none
    out: str | None = None
    profile: int = 0  # a jax.profiler trace of this many more steps of each step bench, after its timed steps
    profile_dir: str = "bench_profile"  # where: one subdir per bench, variant, mode (and seed count / dtype)
    student: list[str] = dataclasses.field(default_factory=list)  # student.* overrides, e.g. student.arch=cnn
    family: str = "gpt2"  # bert | roberta | llama: that family's LoRA step (FAMILY_SIZES variants) instead of GPT-2's

    def profiling(self, *name: Any) -> tuple[int, str]:
        """(steps, directory) of this bench's trace; (0, '') when --profile is off."""
        if not self.profile:
            return 0, ""
        return self.profile, str(Path(self.profile_dir) / "_".join(map(str, name)))


def device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform) if d.platform != "cpu" else f"cpu ({platform.processor() or 'x86'})"


def peer_batch(batch: int, seq: int, vocab: int = 50257, seed: int = 0) -> dict[str, np.ndarray]:
    """The peer's batch: torch's own generator when torch is installed (identical ids), else numpy's. `seed` 0 is
    the batch the peer times; the seeded benches draw seed i's batch with `seed=i`."""
    try:
        import torch

        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab - 1, (batch, seq), generator=g)
        lens = torch.randint(5, seq // 2 + 8, (batch,), generator=g).clamp(max=seq)
        labels = torch.randint(0, 2, (batch,), generator=g)
        ids, lens, labels = ids.numpy(), lens.numpy(), labels.numpy()
    except ImportError:
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, vocab - 1, (batch, seq))
        lens = np.minimum(rng.integers(5, seq // 2 + 8, batch), seq)
        labels = rng.integers(0, 2, batch)
    mask = (np.arange(seq)[None] < lens[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, data_lib.PAD_ID).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int32),
            "weights": np.ones(batch, np.float32), "index": np.arange(batch, dtype=np.int32)}


def trim_padding(batch: dict[str, np.ndarray], multiple: int = 8) -> dict[str, np.ndarray]:
    """Drop trailing all-padding columns (rounded up to `multiple`): exact for right-padded causal models, and for
    the encoders, whose attention masks padding out (and RoBERTa's positions count only real tokens)."""
    longest = int(batch["attention_mask"].sum(axis=1).max())
    keep = min(batch["input_ids"].shape[1], -(-longest // multiple) * multiple)
    return {k: (v[:, :keep] if v.ndim == 2 else v) for k, v in batch.items()}


def timed(step: Callable[[], Any], steps: int, warmup: int) -> tuple[float, float]:
    """(first call in s, which includes compiling if `step` is a jit not yet compiled; median ms of `steps` calls
    after warm-up)."""
    t0 = time.perf_counter()
    jax.block_until_ready(step())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(step())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t)
    return first, 1e3 * statistics.median(times)


def compile_once(jitted: Any, *example: Any) -> tuple[Any, float, float]:
    """Ahead of time: (executable, seconds to lower and compile, XLA's FLOP count of that executable).

    The timed loop calls this very executable, so the count describes the program timed and nothing compiles twice
    (a second compile would also hit the persistent cache and hide the real cost of the first step)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*example).compile()
    seconds = time.perf_counter() - t0
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is best-effort on some backends
        flops = 0.0
    return compiled, seconds, flops


def argument_bytes(compiled: Any) -> int | None:
    """The bytes of an executable's arguments (XLA's memory analysis), None where the backend does not say."""
    try:
        stats = compiled.memory_analysis()
        return None if stats is None else int(stats.argument_size_in_bytes)
    except Exception:  # memory analysis is best-effort on some backends
        return None


def bench_step(jitted: Any, state: Any, *rest: Any, steps: int, warmup: int, profile: tuple[int, str] = (0, "")
               ) -> tuple[float, float, float, float, int | None]:
    """A step `jitted(state, *rest) -> (state, sums)` that donates its state: (first step s incl. compile,
    compile s, median ms, FLOPs, argument bytes). The state is threaded through, never reused after donation.
    `profile` = (n, dir): then n more steps, after the timed ones, traced by jax.profiler into dir."""
    compiled, compile_s, flops = compile_once(jitted, state, *rest)
    arg_bytes = argument_bytes(compiled)
    holder = {"state": state}

    def run():
        holder["state"], sums = compiled(holder["state"], *rest)
        return sums["loss_sum"]

    first, ms = timed(run, steps, warmup)
    if profile[0]:
        with jax.profiler.trace(profile[1]):
            jax.block_until_ready([run() for _ in range(profile[0])])
    return compile_s + first, compile_s, ms, flops, arg_bytes


def variant_config(variant: str, mode: str, *overrides: str) -> Config:
    dtype = MODES[mode]
    return load_config(None, [*VARIANTS[variant], "model.init=random", f"model.dtype={dtype}",
                              f"model.base_dtype={dtype}", "lora.dropout=0.1", *overrides])


def record(args: BenchArgs, bench: str, variant: str, mode: str, batch: dict, first: float | None, ms: float,
           flops: float = 0.0, **extra: Any) -> dict:
    """One result. A seeded batch [N, B, L] reports batch B (per seed); real_tokens and seq_per_s count all N seeds
    (the work of one step)."""
    *seed_axis, b, s = batch["input_ids"].shape
    n = seed_axis[0] if seed_axis else 1
    rec = {"bench": bench, "impl": "jax", "variant": variant, "mode": mode, "batch": b, "seq": args.seq,
           "seq_run": s, "real_tokens": int(batch["attention_mask"].sum()), "ms_per_step": round(ms, 3),
           "seq_per_s": round(n * b / (ms / 1e3), 1), "first_step_s": None if first is None else round(first, 2),
           "gflop_per_step": round(flops / 1e9, 2) if flops else None, "device": device_name(),
           "jax": jax.__version__, "compilation_cache": bool(jax.config.jax_compilation_cache_dir), **extra}
    if flops and args.peak_tflops:
        rec["mfu"] = round(flops / (ms / 1e3) / (args.peak_tflops * 1e12), 4)
    return rec


def bench_steps(args: BenchArgs, variant: str, mode: str, batch: dict) -> Iterable[dict]:
    """Every per-step bench asked for; GPT-2 is built only for those that run it."""
    cfg = variant_config(variant, mode, *args.student)
    if not {"lora_train_step", "teacher_forward", "distill_step"}.isdisjoint(args.benches):
        yield from bench_gpt2(args, variant, mode, batch, cfg)
    if "distill_step_cached" in args.benches:  # what training runs: teacher logits computed once per dataset
        t_logits = jnp.zeros((batch["input_ids"].shape[0], 2), jnp.float32)
        yield from bench_distill(args, variant, mode, batch, cfg, consts={"teacher_logits": t_logits}, teacher=None)


def bench_lora_variants(args: BenchArgs, variant: str, mode: str, batch: dict, rounds: int = 5) -> Iterable[dict]:
    """The LoRA train step of each of `args.lora_variants` beside plain LoRA (standard init), records tagged with
    `lora_variant` and `ratio_vs_lora`. Every step is compiled first, then the variants are timed round-robin,
    `rounds` rounds of steps/rounds steps each, and each reports the median over its rounds' medians, so a change in
    the machine's load falls on every variant alike."""
    names = ["lora", *(n for n in args.lora_variants if n != "lora")]
    runs, flops, compile_s = {}, {}, {}
    dev_batch = jax.device_put(batch)
    for name in names:
        cfg = variant_config(variant, mode, *LORA_VARIANTS[name])
        model, params = build_classifier(cfg, jax.random.key(0))
        setup = train_state(model, params, 1e-3, jax.random.key(1))
        frozen = {"frozen": cast_frozen(setup.frozen, precision.base_dtype(cfg.model))}
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
                     round_ms=[round(m, 3) for m in medians[name]])


def family_config(family: str, variant: str, mode: str, seq: int) -> Config:
    """A random-init `family` classifier of FAMILY_SIZES[variant], LoRA as the peer's PEFT config: rank 4, alpha 4,
    dropout 0.1, PEFT's init and default targets (query/value; q_proj/v_proj), the head trained."""
    n_layer, n_embd, n_head = FAMILY_SIZES[variant]
    dtype = MODES[mode]
    return load_config(None, [f"model.type={family}", "model.name=custom", "model.init=random",
                              f"model.n_layer={n_layer}", f"model.n_embd={n_embd}", f"model.n_head={n_head}",
                              f"model.vocab_size={FAMILY_VOCAB[family]}", f"model.n_positions={max(512, seq)}",
                              f"model.dtype={dtype}", f"model.base_dtype={dtype}", "lora.init=standard",
                              "lora.dropout=0.1"])


def bench_family(args: BenchArgs, variant: str, mode: str, batch: dict) -> Iterable[dict]:
    """The LoRA train step of args.family's classifier (`models.families.build`, the step training jits); records
    add `family` and the parameter counts (PEFT's trainable / total, the peer's fields)."""
    from lora_kd_jax.models import families
    from lora_kd_jax.training.state import param_report

    cfg = family_config(args.family, variant, mode, args.seq)
    model, params = families.build(cfg, jax.random.key(0))
    setup = train_state(model, params, 1e-3, jax.random.key(1))
    report = param_report(params, setup.labels)
    frozen = cast_frozen(setup.frozen, precision.base_dtype(cfg.model))
    step = make_train_step(model, setup.tx, cross_entropy_objective)
    first, compile_s, ms, flops, _ = bench_step(step, setup.state, {"frozen": frozen}, jax.device_put(batch),
                                                steps=args.steps, warmup=args.warmup,
                                                profile=args.profiling("lora_train_step", args.family, variant, mode))
    yield record(args, "lora_train_step", variant, mode, batch, first, ms, flops, compile_s=round(compile_s, 2),
                 family=args.family, trainable=report.trainable, total=report.total)


def bench_gpt2(args: BenchArgs, variant: str, mode: str, batch: dict, cfg: Config) -> Iterable[dict]:
    model, params = build_classifier(cfg, jax.random.key(0))
    setup = train_state(model, params, 1e-3, jax.random.key(1))
    frozen = cast_frozen(setup.frozen, precision.base_dtype(cfg.model))
    dev_batch = jax.device_put(batch)
    plain = dataclasses.replace(model, spec=None)
    merged = model.merged(params)
    merged = {**merged, "gpt2": cast_frozen(merged["gpt2"], precision.base_dtype(cfg.model))}
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
    return data_lib.load_splits(cfg).encoded


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
        full = peer_batch(args.batch, args.seq, **({"vocab": FAMILY_VOCAB[args.family]} if args.family != "gpt2"
                                                   else {}))
        batch = trim_padding(full) if args.trim else full
        for mode in args.modes:
            if args.family != "gpt2":  # that family's LoRA step instead of GPT-2's benches
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
