"""A run's data in one call: its config -> the CoLA splits, cut to `data.limit` and encoded (`load_splits`).

Why apart from cola.py and encoding.py: this is the only place that needs both a config and the tokenizer, and the
record of what a run trained on (`Splits.report()`, written to the log and metrics.json) is made here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_kd_jax.core.config import Config
from lora_kd_jax.data.cola import describe_source, limit_rows, load_columns, n_rows
from lora_kd_jax.data.encoding import EncodedSplit, encode_splits, load_tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """A run's encoded splits and where they came from (recorded in the log and metrics.json)."""

    encoded: dict[str, EncodedSplit]
    source: str
    rows: dict[str, int]  # rows per split in the source, before data.limit

    def report(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows,
                "rows_used": {s: len(e) for s, e in self.encoded.items()},
                "truncated": {s: e.n_truncated for s, e in self.encoded.items()}}


def load_splits(cfg: Config) -> Splits:
    """The CoLA splits a run's config asks for, read, cut to data.limit and encoded with its tokenizer."""
    full = load_columns(cfg.data.dir)
    rows = {s: n_rows(c) for s, c in full.items()}
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    encoded = encode_splits(limit_rows(full, cfg.data.limit), tokenizer, cfg.data.max_length)
    return Splits(encoded, describe_source(cfg.data.dir), rows)
