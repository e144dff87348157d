"""Models: the GPT-2 teacher (base + LoRA + head) and the RNN student."""
