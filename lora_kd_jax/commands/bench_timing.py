"""Timing what the benches run, the same way for every bench: the peer's batch, an executable compiled once ahead of
time (its FLOP count and argument bytes from XLA), the first call and the median of the steps after warm-up (the
result blocked on), a jax.profiler trace of more steps after the timed ones, and the JSON record of a result."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from lora_kd_jax.data import PAD_ID


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
    ids = np.where(mask == 1, ids, PAD_ID).astype(np.int32)
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


def record(args: Any, bench: str, variant: str, mode: str, batch: dict, first: float | None, ms: float,
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
