"""Your own data: a table file (TSV, CSV, JSONL, Parquet) -> the columns a run trains on, its labels checked.

Why `datasets`: `load_dataset("csv" | "json" | "parquet", data_files=...)` is the field's reader for these formats
(quoting, encodings, JSON lines, Arrow types); it is imported here only, when a run names a table file, so training
from the packaged CoLA still never imports it. TSV is read as CSV with a tab delimiter and no quoting (GLUE's TSV
files hold bare quotes), and no value is turned into a missing one ("NA", "null" stay text).

Labels (`LabelSet`): integers are ids; strings are mapped to ids in sorted order of the training file's set (the
names are recorded in config.yaml as data.labels); real numbers make a regression run. Bad input stops with one
line naming the file, the row's line and the column: a missing column (with the columns found), an empty text, a
label outside the training label set, a non-numeric regression label, a column mixing numbers and strings.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lora_kd_jax.core.errors import first_line
from lora_kd_jax.data.errors import DataError

logger = logging.getLogger(__name__)

# file suffix -> (datasets builder, its options)
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3, "keep_default_na": False, "skip_blank_lines": False}),
    ".csv": ("csv", {"keep_default_na": False, "skip_blank_lines": False}),  # quoting 3 = csv.QUOTE_NONE
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


@dataclasses.dataclass(frozen=True)
class Table:
    """One table file's columns, in file order; `first_line` is the file line of row 0 (2 under a CSV/TSV header)."""

    path: str
    columns: dict[str, list]
    first_line: int
    lines: tuple[int, ...] = ()  # the file line of each row, when blank lines were skipped

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def where(self, row: int, column: str) -> str:
        """'file:line (column C)' of a row, for error messages."""
        line = self.lines[row] if self.lines else self.first_line + row
        return f"{self.path}:{line} (column {column!r})"

    def column(self, name: str, key: str) -> list:
        if name not in self.columns:
            raise DataError(f"{self.path}: no column {name!r} ({key}); the file has columns "
                            f"{', '.join(repr(c) for c in self.columns)}")
        return self.columns[name]


def read_table(path: str | os.PathLike) -> Table:
    """A table file as columns (`FORMATS` by its suffix). Read once per file and change (cached)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{path}: {'is a directory' if p.is_dir() else 'file not found'}; expected a table file "
                        f"({', '.join(FORMATS)})")
    stat = p.stat()
    return _read_table(str(p), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_table(path: str, _size: int, _mtime: int) -> Table:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown table format {suffix or '(no suffix)'!r}; expected one of "
                        f"{', '.join(FORMATS)}")
    builder, options = FORMATS[suffix]
    import datasets

    quiet = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train", **options)
    except Exception as e:  # pandas / Arrow parse errors come in many types
        raise DataError(f"{path}: not a readable {suffix[1:]} file ({type(e).__name__}: {first_line(e)})") from None
    finally:
        datasets.utils.logging.set_verbosity(quiet)
        datasets.enable_progress_bars()
    columns = {c: list(ds[c]) for c in ds.column_names}
    first = 2 if builder == "csv" else 1
    blank = [i for i, row in enumerate(zip(*columns.values())) if all(v is None or v == "" for v in row)]
    lines: tuple[int, ...] = ()
    if blank:  # skipped, counted and logged, as the CoLA reader does
        keep = sorted(set(range(len(ds))) - set(blank))
        columns = {c: [v[i] for i in keep] for c, v in columns.items()}
        lines = tuple(first + i for i in keep)
        logger.warning("%s: skipped %d blank line(s)", path, len(blank))
    if not columns or not next(iter(columns.values())):
        raise DataError(f"{path}: no data rows; expected a header line and at least one row")
    return Table(path, columns, first, lines)


def blank_text(v: Any) -> bool:
    """A text cell with nothing to read: missing, NaN or only spaces."""
    return v is None or (isinstance(v, float) and math.isnan(v)) or not str(v).strip()


def texts(table: Table, column: str, key: str) -> list[str]:
    """The text column `column` (config key `key`): every value non-blank text."""
    values = table.column(column, key)
    for i, v in enumerate(values):
        if blank_text(v):
            raise DataError(f"{table.where(i, column)}: empty text; every row needs non-blank text in {key}")
    return [str(v) for v in values]


# ------------------------------------------------------------------------------------------------ labels


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """What a run's labels are: `names` by id (classification) or none (regression, one real-valued output)."""

    problem: str  # classification | regression
    names: tuple[str, ...] = ()

    @property
    def n_outputs(self) -> int:
        return 1 if self.problem == "regression" else len(self.names)


def _kind(v: Any) -> str:
    """int | real | text | blank for one label value (strings holding a number count as that number)."""
    if v is None or isinstance(v, bool):
        return "blank" if v is None else "text"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "blank" if math.isnan(v) else ("int" if float(v).is_integer() else "real")
    text = str(v).strip()
    if not text:
        return "blank"
    try:
        number = float(text)
    except ValueError:
        return "text"
    return "int" if number.is_integer() and "." not in text and "e" not in text.lower() else "real"


def infer_labels(table: Table, column: str, problem: str = "auto", names: Sequence[str] = (),
                 num_labels: int = 0) -> LabelSet:
    """The label set of a training file: regression when `problem` says so (or, for auto, when any label is a
    non-integer number); else `names` when given, the sorted string labels, or '0'..'N-1' for integer ids
    (N = the largest id + 1, or `num_labels`)."""
    values = table.column(column, "data.label")
    kinds = [_kind(v) for v in values]
    for i, k in enumerate(kinds):
        if k == "blank":
            raise DataError(f"{table.where(i, column)}: empty label; every row needs one")
    found = set(kinds)
    if problem == "regression" or (problem == "auto" and "real" in found and "text" not in found):
        to_floats(table, column)  # a non-numeric value fails here, naming its row
        return LabelSet("regression")
    _check_mixed(table, column, kinds)
    if names:
        out = LabelSet("classification", tuple(names))
    elif "text" in found:
        out = LabelSet("classification", tuple(sorted({str(v).strip() for v in values})))
    else:
        ids = [int(float(v)) for v in values]
        n = max(max(ids) + 1, num_labels)
        out = LabelSet("classification", tuple(str(i) for i in range(n)))
    to_ids(table, column, out)  # an id beyond num_labels or a name beyond data.labels fails here
    if len(out.names) < 2:
        raise DataError(f"{table.path}: column {column!r} holds a single label {out.names}; a classifier needs at "
                        "least two (set data.labels or model.num_labels for a label absent from this file)")
    return out


def _check_mixed(table: Table, column: str, kinds: list[str]) -> None:
    numbers = [i for i, k in enumerate(kinds) if k in ("int", "real")]
    strings = [i for i, k in enumerate(kinds) if k == "text"]
    if numbers and strings:
        few, many = (numbers, "strings") if len(numbers) < len(strings) else (strings, "numbers")
        raise DataError(f"{table.where(few[0], column)}: label {table.columns[column][few[0]]!r} mixes label types: "
                        f"this column holds {many} elsewhere ({len(few)} row(s) differ); use one type")


def label_id(v: Any, labels: LabelSet) -> tuple[int, str]:
    """(the id of one classification label, "") or (-1, what is wrong with it): integers are ids, strings name
    one of `labels`."""
    kind = _kind(v)
    if kind == "blank":
        return -1, "empty label; every row needs one"
    if kind == "int":
        k = int(float(v))
        if 0 <= k < len(labels.names):
            return k, ""
        return -1, (f"label {k} is outside the training label set (ids 0..{len(labels.names) - 1}: "
                    f"{', '.join(labels.names)})")
    if kind == "text" and str(v).strip() in labels.names:
        return labels.names.index(str(v).strip()), ""
    return -1, f"label {v!r} is not in the training label set ({', '.join(labels.names)})"


def label_value(v: Any) -> tuple[float, str]:
    """(one regression label as a number, "") or (nan, what is wrong with it)."""
    if _kind(v) == "blank":
        return math.nan, "empty label; every row needs one"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan, f"regression label {v!r} is not a number"
    return (x, "") if math.isfinite(x) else (math.nan, f"regression label {v!r} is not a finite number")


def to_ids(table: Table, column: str, labels: LabelSet) -> np.ndarray:
    """int32 ids of a classification label column: integers as they are, strings by their index in `labels`."""
    out = np.zeros(len(table), np.int32)
    for i, v in enumerate(table.column(column, "data.label")):
        out[i], problem = label_id(v, labels)
        if problem:
            raise DataError(f"{table.where(i, column)}: {problem}")
    return out


def to_floats(table: Table, column: str) -> np.ndarray:
    """float32 values of a regression label column; a non-numeric value is an error naming its row."""
    out = np.zeros(len(table), np.float32)
    for i, v in enumerate(table.column(column, "data.label")):
        out[i], problem = label_value(v)
        if problem:
            raise DataError(f"{table.where(i, column)}: {problem}")
    return out


def label_column(table: Table, column: str, labels: LabelSet) -> np.ndarray:
    """The label column as a run trains on it: float32 values (regression) or int32 ids."""
    return to_floats(table, column) if labels.problem == "regression" else to_ids(table, column, labels)
