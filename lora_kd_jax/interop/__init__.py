"""Interop with PyTorch: PEFT adapters out and in, merged checkpoints, the files transformers reads."""
