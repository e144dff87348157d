"""The one base class of mistakes a user can cause and fix (config, data, weights, run dirs, checkpoints).

Every command prints such an error as one line and exits non-zero (cli.py); anything else is a bug and keeps its
traceback. Each module's own error class derives from `UserError` so callers can catch either.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user gave or pointed at is wrong; the message names it and says what would be right."""

    label = "error"  # the word the command line prints before the message
