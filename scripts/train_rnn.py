#!/usr/bin/env python
"""Train the RNN student from scratch on CoLA (cross-entropy): the distillation baseline.

usage: scripts/train_rnn.py CONFIG.yaml [section.key=value ...] [--dry-run] [--resume]
"""
from lora_kd_jax.commands.cli import main_train_rnn

if __name__ == "__main__":
    main_train_rnn()
