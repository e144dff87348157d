"""Distillation: the teacher restored from its run, the losses, and the student trainer (and its baseline)."""
