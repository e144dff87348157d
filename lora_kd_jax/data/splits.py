"""A run's data in one call: its config -> the CoLA splits or its table files, cut to `data.limit` and encoded
(`load_splits`).

Why apart from cola.py and encoding.py: this is the only place that needs both a config and the tokenizer, and the
record of what a run trained on (`Splits.report()`, written to the log and metrics.json) is made here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from lora_kd_jax.core.config import Config
from lora_kd_jax.data import tables
from lora_kd_jax.data.cola import HUB, describe_source, limit_rows, load_columns, n_rows
from lora_kd_jax.data.encoding import EncodedSplit, encode, encode_pairs, encode_splits
from lora_kd_jax.data.errors import DataError
from lora_kd_jax.data.tasks import HUB_GLUE, GLUE, is_table_run, label_names, table_files

logger = logging.getLogger(__name__)


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


def load_splits(cfg: Config, tokenizer: Any) -> Splits:
    """The splits a run's config asks for (CoLA, or its table files: `load_table_splits`), read, cut to data.limit
    and encoded with `tokenizer` (the run's: `models.tokenizers.tokenizer_for`)."""
    if is_table_run(cfg):
        return load_table_splits(cfg, tokenizer)
    full = load_columns(cfg.data.dir)
    rows = {s: n_rows(c) for s, c in full.items()}
    encoded = encode_splits(limit_rows(full, cfg.data.limit), tokenizer, cfg.data.max_length)
    return Splits(encoded, describe_source(cfg.data.dir), rows)


def encode_table(table: tables.Table, cfg: Config, tokenizer, limit: int = 0) -> EncodedSplit:
    """One table's rows encoded as the run encodes them: its text (and pair) columns, its labels as ids (checked
    against the run's label set) or regression targets; `limit` > 0 keeps the first rows."""
    d = cfg.data
    keep = slice(None, limit or None)
    labels = tables.label_column(table, d.label, tables.LabelSet(d.problem, label_names(cfg)))[keep]
    first = tables.texts(table, d.text, "data.text")[keep]
    if not d.text_pair:
        return encode(first, labels, tokenizer, d.max_length)
    return encode_pairs(first, tables.texts(table, d.text_pair, "data.text_pair")[keep], labels, tokenizer,
                        d.max_length)


def load_table_splits(cfg: Config, tokenizer: Any) -> Splits:
    """A run's table files (or a GLUE task's hub copy), checked and encoded; each cut is counted in the log."""
    found = hub_tables(cfg) if cfg.data.dir == HUB and not cfg.data.train else {
        name: tables.read_table(path) for name, path in table_files(cfg).items()}
    encoded = {name: encode_table(t, cfg, tokenizer, cfg.data.limit) for name, t in found.items()}
    for name, split in encoded.items():
        logger.info("encoded %s (%s): %d of %d rows, max_length %d, %d truncated", name, found[name].path,
                    len(split), len(found[name]), cfg.data.max_length, split.n_truncated)
    source = ", ".join(f"{name} {t.path}" for name, t in found.items())
    return Splits(encoded, source, {name: len(t) for name, t in found.items()})


def hub_tables(cfg: Config) -> dict[str, tables.Table]:
    """The hub copy of a GLUE task (`nyu-mll/glue`), as tables: train, validation (MNLI: matched) and MNLI's
    mismatched validation, reported. Needs network; not run by the tests (they are offline)."""
    import datasets

    preset = GLUE[cfg.data.task]
    try:
        full = datasets.load_dataset(HUB_GLUE, cfg.data.task)
    except Exception as e:  # no network, hub down: datasets raises many types
        raise DataError(f"data.dir={HUB} data.task={cfg.data.task}: could not load {HUB_GLUE} ({type(e).__name__}: "
                        f"{e}); without network point data.dir at the task's files in GLUE's layout") from None
    splits = {"train": "train", "validation": preset.hub_dev[0], **{s: s for s in preset.hub_dev[1:]}}
    return {name: tables.Table(f"{HUB_GLUE}/{cfg.data.task}:{split}",
                               {c: list(full[split][c]) for c in full[split].column_names}, 0)
            for name, split in splits.items()}
