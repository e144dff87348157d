#!/usr/bin/env python
"""Benchmark the LoRA train step, teacher forward, distillation step and a CoLA epoch; JSON lines out.

usage: scripts/bench.py [--variants gpt2,gpt2-medium] [--batch 128] [--seq 64] [--modes fp32,bf16]
                        [--benches lora_train_step,teacher_forward,distill_step,distill_step_cached,epoch]
                        [--steps 30] [--peak-tflops 989] [--out results.jsonl]
Compare with benchmarks/peer_torch.py (the PyTorch + PEFT peer) in the same run on the same machine. The epoch bench
reads the CoLA files and tokenizer the package ships (--data-dir / --tokenizer to use others).
"""
from lora_kd_jax.commands.cli import main_bench

if __name__ == "__main__":
    main_bench()
