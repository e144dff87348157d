"""`DataError` and the helper that words its messages.

Why a module of its own: the CoLA reader, the tokenizer loader and the batch builder all raise `DataError`, and
the first two name what a dir holds or what a library said in the same way; keeping them here lets each of those
modules depend on this one instead of on each other.
"""

from __future__ import annotations

from pathlib import Path

from lora_kd_jax.core.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data or data location; message starts with 'path:line: ' where a line applies."""
    label = "data error"


def listing(d: Path, limit: int = 20) -> str:
    """Short, sorted listing of a dir's entries for error messages."""
    names = sorted(p.name for p in d.iterdir())
    if not names:
        return "nothing"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
