"""What `evaluate` and `predict` read: the named CoLA dev sets, CoLA TSV files, a table run's sets and files,
sentence files and sentence pairs, each checked (`InputError` / `DataError` naming the file and line).

Why apart from evaluation.py: reading and checking inputs is one job, scoring them another; every name here is
also importable from `lora_kd_jax.commands.evaluation`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lora_kd_jax import data as data_lib
from lora_kd_jax.models.tokenizers import tokenizer_for
from lora_kd_jax.assets import COLA_DIR
from lora_kd_jax.core.errors import UserError

SETS: dict[str, tuple[str, ...]] = {
    "in_domain": ("in_domain_dev.tsv",),
    "out_of_domain": ("out_of_domain_dev.tsv",),
    "glue": ("in_domain_dev.tsv", "out_of_domain_dev.tsv"),
}
DEFAULT_SETS = ("in_domain", "out_of_domain")
LABELS = data_lib.LABEL_NAMES  # index = label id: 0 unacceptable, 1 acceptable
EVALUATION_FILE = "evaluation.json"


class InputError(UserError, ValueError):
    """A sentence, sentence file or evaluation set that cannot be classified; the message says which and why."""
    label = "input error"


# --------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSet:
    """Labelled sentences to score: a named CoLA dev set or a TSV file, in file order."""

    name: str
    files: tuple[str, ...]
    sources: list[str]
    sentences: list[str]
    labels: np.ndarray  # int32 [N] (float32 for a regression run's table)
    limit: int = 0  # > 0: only the first `limit` rows of each file
    encoded: data_lib.EncodedSplit | None = None  # a table run's rows, encoded as the run encodes them

    def __len__(self) -> int:
        return len(self.sentences)


def load_eval_set(name_or_path: str | os.PathLike, limit: int = 0, cfg: Any = None) -> EvalSet:
    """A named set (in_domain, out_of_domain, glue) or a CoLA TSV file; `limit` > 0 keeps the first `limit` rows of
    each file, as `data.limit` cuts a run's validation set. For a run on table files (`cfg`, its config): the names
    train, validation and its reported sets, or any table file with the run's columns (`load_table_set`)."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise InputError(f"limit={limit!r}: expected an int >= 0 (0 keeps every row)")
    name = os.fspath(name_or_path)
    if cfg is not None and data_lib.is_table_run(cfg):
        return load_table_set(name, cfg, limit)
    if name in SETS:
        paths = [COLA_DIR / f for f in SETS[name]]
    elif _looks_like_file(name):
        paths = [Path(name).expanduser()]
    else:
        raise InputError(f"unknown evaluation set '{name}': expected one of {', '.join(SETS)} or the path of a CoLA "
                         "TSV file (source, label, annotation, sentence)")
    sources: list[str] = []
    sentences: list[str] = []
    labels: list[np.ndarray] = []
    for path in paths:
        rows = data_lib.read_cola_rows(path)  # DataError naming path:line for a row that does not parse
        keep = slice(None, limit or None)
        sources += rows.sources[keep]
        sentences += rows.sentences[keep]
        labels.append(rows.labels[keep])
    return EvalSet(name, tuple(str(p) for p in paths), sources, sentences, np.concatenate(labels), limit)


def load_table_set(name: str, cfg: Any, limit: int = 0) -> EvalSet:
    """A table run's named set or a table file, read with the run's columns and label set (a label the run never
    saw is an error naming its row), encoded as the run encodes its rows."""
    files = data_lib.table_files(cfg)
    if name not in files and not _looks_like_file(name):
        raise InputError(f"unknown evaluation set '{name}': expected one of {', '.join(files)} (this run's sets) or "
                         "the path of a table file with the run's columns")
    table = data_lib.read_table(files.get(name, name))
    split = data_lib.encode_table(table, cfg, tokenizer_for(cfg), limit)
    texts = table.columns[cfg.data.text][:len(split)]
    return EvalSet(name, (table.path,), [], [str(t) for t in texts], split.labels, limit, split)


def _looks_like_file(text: str) -> bool:
    return Path(text).expanduser().exists() or os.sep in text or "/" in text or text.endswith((".tsv", ".txt"))


def read_sentence_file(path: str | os.PathLike) -> list[str]:
    """One sentence per line (UTF-8; CRLF and a BOM accepted). A blank line is an error naming path:line, as is a
    file with no sentences: each line's answer is printed in file order, so no line is skipped."""
    name = os.fspath(path)
    try:
        raw = Path(name).expanduser().read_bytes()
    except FileNotFoundError:
        raise InputError(f"{name}: file not found (expected a text file with one sentence per line)") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory (expected a text file with one sentence per line)") from None
    except OSError as e:
        raise InputError(f"{name}: cannot read file: {e.strerror or e}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line
    out = []
    for lineno, line in enumerate(lines, start=1):
        try:
            text = line.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{name}:{lineno}: invalid UTF-8 byte(s) {line[e.start:e.end]!r}; the file must be "
                             "UTF-8") from None
        if not text.strip():
            raise InputError(f"{name}:{lineno}: empty line (expected one sentence per line, no blank lines)")
        out.append(text)
    if not out:
        raise InputError(f"{name}: no sentences (the file is empty; expected one sentence per line)")
    return out


def split_pairs(lines: Sequence[str], path: str) -> list[str]:
    """The second texts of a file of tab-separated sentence pairs (`read_sentence_file`'s lines); a line without
    exactly one tab is an error naming path:line."""
    out = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if len(fields) != 2 or not all(f.strip() for f in fields):
            raise InputError(f"{path}:{lineno}: expected two non-blank texts separated by one tab (a sentence pair), "
                             f"found {len(fields)} field(s)")
        out.append(fields[1])
    return out


def check_sentences(sentences: str | Sequence[str]) -> list[str]:
    """The sentences as a list (a single string is one sentence); none may be empty or blank."""
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences:
        raise InputError("no sentences given (expected at least one)")
    for i, s in enumerate(sentences, start=1):
        if not isinstance(s, str):
            raise InputError(f"sentence {i} is a {type(s).__name__}, not a string")
        if not s.strip():
            raise InputError(f"sentence {i} is empty ({s!r}); expected non-blank text")
    return sentences
