"""The one base class of mistakes a user can cause and fix (config, data, weights, run dirs, checkpoints).

Every command prints such an error as one line and exits non-zero (cli.py); anything else is a bug and keeps its
traceback. Each module's own error class derives from `UserError` so callers can catch either.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Something the user gave or pointed at is wrong; the message names it and says what would be right."""

    label = "error"  # the word the command line prints before the message


def read_json_object(path: Path, error: type[UserError]) -> dict[str, Any]:
    """A JSON file the user pointed at, which must hold an object; anything else raises `error` naming the file."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries such as `datasets` and transformers raise long,
    multi-line ones), or its type's name when it has none."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
