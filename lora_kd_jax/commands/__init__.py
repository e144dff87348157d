"""What users call: the `lora-kd-jax` command line, evaluate/predict, the study's `reproduce`, the bench."""
