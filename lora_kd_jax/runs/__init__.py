"""Run directories: their files, the Orbax checkpoints (the only Orbax user), seed dirs, logs and plots."""
