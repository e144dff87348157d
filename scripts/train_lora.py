#!/usr/bin/env python
"""LoRA fine-tuning of GPT-2 on CoLA.

usage: scripts/train_lora.py CONFIG.yaml [section.key=value ...] [--dry-run] [--resume]
"""
from lora_kd_jax.commands.cli import main_train_lora

if __name__ == "__main__":
    main_train_lora()
