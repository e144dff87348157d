#!/usr/bin/env python
"""Reproduce the reference table (five runs) and write results.md + results.png.

usage: scripts/reproduce_seed.py [section.key=value ...] [--tiny] [--configs DIR] [--no-progress]
"""
from lora_kd_jax.commands.cli import main_reproduce

if __name__ == "__main__":
    main_reproduce()
