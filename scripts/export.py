#!/usr/bin/env python
"""PEFT adapters out and in, merged checkpoints: export-peft RUN OUT | import-peft PEFT CONFIG.yaml --out RUN | merge RUN OUT."""
from lora_kd_jax.commands.cli import main

if __name__ == "__main__":
    main()
