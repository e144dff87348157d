"""Command-line entry points of scripts/distill.py, scripts/train_rnn.py and scripts/reproduce_seed.py."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Sequence

from lora_kd_jax import cli
from lora_kd_jax.config import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TINY_HELP = ("offline CPU check of the whole study: random-init 2-layer GPT-2 teachers (64 and 128 wide) in place of "
             "gpt2 and gpt2-medium (model.init=random, nothing downloaded) and a 64/64 student; "
             "runs go to runs/reproduce_tiny unless run.dir=PATH")


@contextlib.contextmanager
def _clean_exit():
    """Expected stops (a signal, a run dir holding another run) end with their message, not a traceback."""
    from lora_kd_jax.loop import TrainingInterrupted
    from lora_kd_jax.rundir import RunDirError

    try:
        yield
    except TrainingInterrupted as e:
        sys.exit(f"interrupted: {e}")
    except RunDirError as e:
        sys.exit(f"run dir error: {e}")


def _report(summary: dict, run_dir: str) -> None:
    print(f"best val accuracy {summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']}, train accuracy "
          f"{summary['train_accuracy_at_best']:.4f}, val MCC {summary['val_mcc_at_best']:.4f}) -> {run_dir}")


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
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    from lora_kd_jax import distill  # imports jax: after the config is known to be valid

    try:
        if args.dry_run:
            run_dir, teacher_cfg = distill.check_teacher(cfg.distill.teacher, cfg)
            print(f"teacher: {run_dir} (LoRA {teacher_cfg.model.name})\n{_student_report(cfg)}")
            return
        with _clean_exit():
            summary = distill.distill_and_evaluate(cfg, resume=args.resume)
    except distill.TeacherError as e:
        sys.exit(f"teacher error: {e}")
    _report(summary, cfg.run.dir)


def main_train_rnn(argv: Sequence[str] | None = None) -> None:
    args = cli.parse(argv, "Train the RNN student from scratch on CoLA (cross-entropy): the distillation baseline",
                     [("--dry-run", "print the student's parameter count and exit"),
                      ("--resume", "continue from the latest checkpoint in run.dir")])
    cfg = cli.load(args)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.dry_run:
        print(_student_report(cfg))
        return
    from lora_kd_jax import distill

    with _clean_exit():
        summary = distill.train_rnn_and_evaluate(cfg, resume=args.resume)
    _report(summary, cfg.run.dir)


def parse_reproduce(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Reproduce the reference table: LoRA gpt2, LoRA gpt2-medium, distillation from each, the RNN "
                    "from scratch; writes results.md and results.png into the study's root (run.dir)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every run, e.g. "
                   "data.dir=../shared/data/cola; run.dir=PATH sets the study's root (default runs/reproduce)")
    p.add_argument("--tiny", action="store_true", help=TINY_HELP)
    p.add_argument("--configs", default=None, help="directory holding the five configs (default: the repo's configs/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main_reproduce(argv: Sequence[str] | None = None) -> None:
    args = parse_reproduce(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    from lora_kd_jax import reproduce

    kwargs = {"configs_dir": args.configs} if args.configs else {}
    try:
        root, _ = reproduce.study_configs(args.overrides, tiny=args.tiny, **kwargs)  # every config checked first
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    with _clean_exit():
        outcomes = reproduce.run_study(args.overrides, tiny=args.tiny, progress=not args.no_progress, **kwargs)
    print(reproduce.results_table(outcomes))
    print(f"-> {root / 'results.md'}, {root / 'results.png'}")
