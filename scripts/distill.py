#!/usr/bin/env python
"""Distil a LoRA-fine-tuned GPT-2 teacher into the RNN student on CoLA.

usage: scripts/distill.py CONFIG.yaml distill.teacher=RUN_DIR [section.key=value ...] [--dry-run] [--resume]
"""
from lora_kd_jax.commands.cli import main_distill

if __name__ == "__main__":
    main_distill()
