"""Command-line entry points of scripts/distill.py, scripts/train_rnn.py and scripts/reproduce_seed.py."""
from __future__ import annotations

import argparse
from typing import Sequence

from lora_kd_jax import cli

TINY_HELP = ("offline CPU check of the whole study: random-init 2-layer GPT-2 teachers (64 and 128 wide) in place of "
             "gpt2 and gpt2-medium (model.init=random, nothing downloaded) and a 64/64 student; "
             "runs go to runs/reproduce_tiny unless run.dir=PATH")


def _student_report(cfg) -> str:
    import jax

    from lora_kd_jax.models.student import build_student, count_params

    _, shapes = build_student(cfg.student, jax.random.key(0), shapes_only=True)
    n = count_params(shapes)
    return f"student params: {n / 1e6:.2f}M ({n:,}), all trainable"


def main_distill(argv: Sequence[str] | None = None) -> None:
    args = cli.parse(argv, "Distil a LoRA-fine-tuned GPT-2 teacher (distill.teacher=RUN_DIR) into the RNN student",
                     [("--dry-run", "check the teacher, print the student's parameter count and exit"),
                      ("--resume", "continue from the latest checkpoint in run.dir")])
    cfg = cli.load(args)
    cli.setup_logging()
    from lora_kd_jax import distill  # imports jax: after the config is known to be valid

    with cli.clean_exit():
        if args.dry_run:
            run_dir, teacher_cfg = distill.check_teacher(cfg.distill.teacher, cfg)
            print(f"teacher: {run_dir} (LoRA {teacher_cfg.model.name})\n{_student_report(cfg)}")
            return
        summary = distill.distill_and_evaluate(cfg, resume=args.resume)
    cli.report(summary, cfg.run.dir)


def main_train_rnn(argv: Sequence[str] | None = None) -> None:
    args = cli.parse(argv, "Train the RNN student from scratch on CoLA (cross-entropy): the distillation baseline",
                     [("--dry-run", "print the student's parameter count and exit"),
                      ("--resume", "continue from the latest checkpoint in run.dir")])
    cfg = cli.load(args)
    cli.setup_logging()
    if args.dry_run:
        print(_student_report(cfg))
        return
    from lora_kd_jax import distill

    with cli.clean_exit():
        summary = distill.train_rnn_and_evaluate(cfg, resume=args.resume)
    cli.report(summary, cfg.run.dir)


def parse_reproduce(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Reproduce the reference table: LoRA gpt2, LoRA gpt2-medium, distillation from each, the RNN "
                    "from scratch; writes results.md and results.png into the study's root (run.dir)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every run, e.g. "
                   "data.limit=2000; run.dir=PATH sets the study's root (default runs/reproduce)")
    p.add_argument("--tiny", action="store_true", help=TINY_HELP)
    p.add_argument("--configs", default=None, help="directory holding the five configs (default: the repo's configs/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main_reproduce(argv: Sequence[str] | None = None) -> None:
    args = parse_reproduce(argv)
    cli.setup_logging()
    from lora_kd_jax import reproduce

    kwargs = {"configs_dir": args.configs} if args.configs else {}
    with cli.clean_exit():
        root, _ = reproduce.study_configs(args.overrides, tiny=args.tiny, **kwargs)  # every config checked first
        outcomes = reproduce.run_study(args.overrides, tiny=args.tiny, progress=not args.no_progress, **kwargs)
    print(reproduce.results_table(outcomes))
    print(f"-> {root / 'results.md'}, {root / 'results.png'}")
