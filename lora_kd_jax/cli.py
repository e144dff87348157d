"""Command-line entry points: parse `CONFIG.yaml key=value ... [--flags]`, call the library, exit cleanly."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from lora_kd_jax.config import ConfigError, load_config


def parse(argv: Sequence[str] | None, description: str, flags: Sequence[tuple[str, str]] = ()) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("config", help="YAML config file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-4")
    for flag, help_ in flags:
        p.add_argument(flag, action="store_true", help=help_)
    return p.parse_args(argv)


def load(args: argparse.Namespace):
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def main_train_lora(argv: Sequence[str] | None = None) -> None:
    args = parse(argv, "LoRA fine-tuning of GPT-2 on CoLA",
                 [("--dry-run", "build shapes only, print the parameter report and exit"),
                  ("--resume", "continue from the latest checkpoint in run.dir")])
    cfg = load(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lora_kd_jax import train  # imports jax: after the config is known to be valid

    if args.dry_run:
        print(train.dry_run(cfg))
        return
    from lora_kd_jax.loop import TrainingInterrupted

    try:
        summary = train.train_and_evaluate(cfg, resume=args.resume)
    except TrainingInterrupted as e:
        sys.exit(f"interrupted: {e}")
    print(f"best val accuracy {summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']}, train accuracy "
          f"{summary['train_accuracy_at_best']:.4f}, val MCC {summary['val_mcc_at_best']:.4f}) -> {cfg.run.dir}")
