"""Data: reading datasets, tokenizing, and the one batch builder."""
