"""Command-line entry points: parse `CONFIG.yaml key=value ... [--flags]`, call the library, exit cleanly.

`clean_exit` is the one place that turns a user's mistake (any `UserError`: config, data, weights, run dir,
checkpoint) into one line and a non-zero status; other exceptions are bugs and keep their traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator, Sequence

from lora_kd_jax.config import load_config
from lora_kd_jax.errors import UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def clean_exit() -> Iterator[None]:
    """A `UserError` ends the command with `label: message` on stderr and exit status 1, no traceback."""
    try:
        yield
    except UserError as e:
        sys.exit(f"{e.label}: {e}")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def parse(argv: Sequence[str] | None, description: str, flags: Sequence[tuple[str, str]] = ()) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("config", help="YAML config file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    for flag, help_ in flags:
        p.add_argument(flag, action="store_true", help=help_)
    return p.parse_args(argv)


def load(args: argparse.Namespace):
    with clean_exit():
        return load_config(args.config, args.overrides)


def report(summary: dict, run_dir: str) -> None:
    line = (f"best val accuracy {summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']}, train accuracy "
            f"{summary['train_accuracy_at_best']:.4f}, val MCC {summary['val_mcc_at_best']:.4f}")
    if "out_of_domain_accuracy_at_best" in summary:
        line += (f"; out-of-domain accuracy {summary['out_of_domain_accuracy_at_best']:.4f}, MCC "
                 f"{summary['out_of_domain_mcc_at_best']:.4f}")
    print(f"{line}) -> {run_dir}")


def main_train_lora(argv: Sequence[str] | None = None) -> None:
    args = parse(argv, "LoRA fine-tuning of GPT-2 on CoLA",
                 [("--dry-run", "build shapes only, print the parameter report and exit"),
                  ("--resume", "continue from the latest checkpoint in run.dir")])
    cfg = load(args)
    setup_logging()
    from lora_kd_jax import train  # imports jax: after the config is known to be valid

    with clean_exit():
        if args.dry_run:
            print(train.dry_run(cfg))
            return
        summary = train.train_and_evaluate(cfg, resume=args.resume)
    report(summary, cfg.run.dir)


def main_bench(argv: Sequence[str] | None = None) -> None:
    from lora_kd_jax import bench, precision

    data_dir, tokenizer = bench.default_paths()
    p = argparse.ArgumentParser(description="Step-time benchmarks (JSON lines on stdout, appended to --out)")
    p.add_argument("--variants", default="gpt2,gpt2-medium", help="comma list of gpt2, gpt2-medium, tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--modes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--benches", default=None, help="comma list of " + ", ".join(bench.BENCHES) + " (default: all; "
                   "on a CPU the gpt2-size epoch bench, ~1,000 steps, only when named)")
    p.add_argument("--student-dtypes", default="auto", help="comma list of auto, float32, bfloat16: the distillation "
                   "benches run the student once in each (auto = this backend's choice, precision.py)")
    p.add_argument("--steps", type=int, default=30, help="timed steps after warm-up (median reported)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (e.g. 989 for H100 bf16)")
    p.add_argument("--no-trim", action="store_true", help="keep all-padding columns (no length-aware trimming)")
    p.add_argument("--data-dir", default=data_dir, help="CoLA dir (raw layout) for the epoch bench (default: the "
                   "packaged copy; '' skips the bench)")
    p.add_argument("--tokenizer", default=tokenizer, help="GPT-2 tokenizer dir or hub name (default: the packaged one)")
    p.add_argument("--limit", type=int, default=0, help="epoch bench: first N training sentences (0 = all 8,551)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    a.benches = a.benches or ",".join(bench.default_benches(split(a.variants)))
    for flag, values, known in (("--benches", a.benches, bench.BENCHES), ("--modes", a.modes, bench.MODES),
                                ("--variants", a.variants, bench.VARIANTS),
                                ("--student-dtypes", a.student_dtypes, ("auto", *precision.DTYPES))):
        for name in split(values):
            if name not in known:
                sys.exit(f"{flag}: unknown value '{name}'; choose from {', '.join(known)}")
    if a.steps < 1 or a.limit < 0 or not split(a.student_dtypes):
        sys.exit(f"--steps {a.steps}, --limit {a.limit}, --student-dtypes '{a.student_dtypes}': expected --steps >= 1, "
                 "--limit >= 0 and at least one student dtype")
    if a.steps < 20:
        print("note: --steps below 20 gives a noisy median", file=sys.stderr)
    bench.run(bench.BenchArgs(variants=split(a.variants), modes=split(a.modes), benches=split(a.benches),
                              batch=a.batch, seq=a.seq, steps=a.steps, peak_tflops=a.peak_tflops,
                              trim=not a.no_trim, data_dir=a.data_dir, tokenizer=a.tokenizer, out=a.out,
                              limit=a.limit,
                              student_dtypes=split(a.student_dtypes)))
