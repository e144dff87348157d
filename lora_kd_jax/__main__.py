"""`python -m lora_kd_jax COMMAND ...`: the same as the `lora-kd-jax` console command."""
from lora_kd_jax.commands.cli import main

main()
