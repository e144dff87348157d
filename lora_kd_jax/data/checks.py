"""Every bad row of a run's table files, found before any model is built (`checked_labels`).

Why a pass of its own: the encoder stops at the first bad value it meets, after the model was set up; a user with
a broken file wants to know at once how many rows are bad and where, to fix them in one go. So each text and label
cell of every file (train, validation, reported) is read here, when the run's label set is decided: the bad rows
are counted, the first `SHOWN` named with file:line and column, in one DataError.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from lora_kd_jax.core.config import DataConfig
from lora_kd_jax.data import tables
from lora_kd_jax.data.errors import DataError

SHOWN = 5  # bad cells named in the message; the rest are counted


@dataclasses.dataclass(frozen=True)
class Problem:
    """One bad cell: its table, row, column and what is wrong."""

    table: tables.Table
    row: int
    column: str
    what: str

    def __str__(self) -> str:
        return f"{self.table.where(self.row, self.column)}: {self.what}"


def checked_labels(found: Mapping[str, tables.Table], d: DataConfig, num_labels: int = 0) -> tables.LabelSet:
    """The label set of the training file (`found["train"]`), once every row of every file was checked: a missing
    column, or the file-wide label mistakes `tables.infer_labels` names, stop at once; bad cells (an empty text, an
    empty or unknown label, a regression label that is no number) are all counted first."""
    problems = [p for t in found.values() for p in _text_problems(t, d)]
    problems += [p for t in found.values() for p in _blank_labels(t, d)]
    if d.problem == "regression":
        problems += [p for t in found.values() for p in _label_problems(t, d.label, None)]
    train = found["train"]
    usable = _without(train, {p.row for p in problems if p.table is train and p.column == d.label})
    order = [t.path for t in found.values()]
    if len(usable) == 0:
        refuse(problems, order)
    try:
        labels = tables.infer_labels(usable, d.label, d.problem, d.labels, num_labels)
    except DataError:
        refuse(problems, order)  # the bad rows first, when there are any: they may be the cause
        raise
    regression = labels.problem == "regression"  # (data.problem=auto: a column of real numbers)
    problems += [p for t in found.values() for p in _label_problems(t, d.label, None if regression else labels)]
    refuse(problems, order)
    return labels


def refuse(problems: list[Problem], order: list[str]) -> None:
    """One DataError counting the bad rows of `problems` and naming the first `SHOWN` cells (files in `order`,
    rows in file order); nothing when there are none."""
    if not problems:
        return
    unique = {(p.table.path, p.row, p.column, p.what): p for p in problems}  # a file given twice counts once
    problems = sorted(unique.values(), key=lambda p: (order.index(p.table.path), p.row))
    files = list(dict.fromkeys(p.table.path for p in problems))
    rows = len({(p.table.path, p.row) for p in problems})
    named = "; ".join(str(p) for p in problems[:SHOWN])
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    raise DataError(f"{rows} bad row{'s' if rows > 1 else ''} in {', '.join(files)} (checked before any model was "
                    f"built): {named}{more}; fix or remove them")


def _text_problems(table: tables.Table, d: DataConfig) -> list[Problem]:
    out = []
    for column, key in ((d.text, "data.text"), (d.text_pair, "data.text_pair")):
        if column:
            out += [Problem(table, i, column, f"empty text; every row needs non-blank text in {key}")
                    for i, v in enumerate(table.column(column, key)) if tables.blank_text(v)]
    return out


def _blank_labels(table: tables.Table, d: DataConfig) -> list[Problem]:
    return [Problem(table, i, d.label, "empty label; every row needs one")
            for i, v in enumerate(table.column(d.label, "data.label")) if tables.blank_text(v)]


def _label_problems(table: tables.Table, column: str, labels: tables.LabelSet | None) -> list[Problem]:
    """Labels outside `labels` (None: regression labels that are not finite numbers), blank ones excepted."""
    out = []
    for i, v in enumerate(table.column(column, "data.label")):
        if tables.blank_text(v):
            continue
        _, what = tables.label_value(v) if labels is None else tables.label_id(v, labels)
        if what:
            out.append(Problem(table, i, column, what))
    return out


def _without(table: tables.Table, rows: set[int]) -> tables.Table:
    """`table` less `rows`, every kept row still named by its own file line."""
    if not rows:
        return table
    keep = [i for i in range(len(table)) if i not in rows]
    lines = tuple(table.lines[i] if table.lines else table.first_line + i for i in keep)
    return tables.Table(table.path, {c: [v[i] for i in keep] for c, v in table.columns.items()}, table.first_line,
                        lines)
