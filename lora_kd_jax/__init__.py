"""lora_kd_jax: LoRA fine-tuning and distillation in pure JAX."""
