"""LoRA as a transformation of a parameter tree and an apply function; the PEFT format; export, import, merge."""
