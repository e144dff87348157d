"""CoLA's files: the strict TSV reader, finding the split files of a dir, the hub copy, and `data.limit`.

Bad input is never skipped silently: it raises `DataError` naming the file and line, and what is legitimately
dropped (blank lines, rows beyond `limit`) is counted and logged.

No `datasets` round trip: the rows `read_cola_rows` parses are carried as plain columns
(`{"sentence": list[str], "label": int32 array}` per split, see `load_columns`) straight to the tokenizer, instead
of being wrapped into a `datasets.Dataset` only to be pulled back out column by column. Training from files thus
never imports `datasets` (about a second of start-up on a 2-core CPU, and an Arrow copy of every row). `datasets`
stays where it does a real job: `data.dir=hub` downloads through `datasets.load_dataset`, and `load_cola` hands
callers who want to look at the data (tests, reproduce's majority share) the type the hub copy comes in, with its
label names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_kd_jax.assets import COLA_DIR
from lora_kd_jax.core.errors import first_line
from lora_kd_jax.data.errors import DataError, listing

if TYPE_CHECKING:  # heavy import stays lazy so `import lora_kd_jax.data` is cheap
    import datasets

logger = logging.getLogger(__name__)

N_FIELDS = 4  # source, label, annotation, sentence
RAW_LAYOUT = ("in_domain_train.tsv", "in_domain_dev.tsv")
OUT_OF_DOMAIN_FILE = "out_of_domain_dev.tsv"
GLUE_LAYOUT = ("train.tsv", "dev.tsv")
HUB = "hub"  # data.dir value that loads the hub's GLUE CoLA instead of files
HUB_DATASET = ("nyu-mll/glue", "cola")
LABEL_NAMES = ("unacceptable", "acceptable")  # same ClassLabel names as the hub copy
_BOM = b"\xef\xbb\xbf"

Columns = dict[str, Sequence[Any]]  # one split: {"sentence": list[str], "label": int32 array [N]}, in source order


# --------------------------------------------------------------------------------------------- reading


def read_cola_tsv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Strict reader for a raw CoLA / GLUE-CoLA TSV: returns (sentences, labels int32) (`read_cola_rows` for the
    source codes as well).

    Format: 4 tab-separated fields per line, no header: source, label (0/1), annotation (may be empty),
    sentence. CoLA is not CSV-quoted, so quotes stay verbatim in the sentence. Accepted deviations: CRLF
    line endings, a UTF-8 BOM at the start, no trailing newline, and blank lines (skipped, counted, logged;
    a line holding a tab is never blank, it is a malformed row). Everything else raises DataError naming
    the file and the 1-based line. Bytes are decoded per line so a bad byte reports where it is.
    """
    rows = read_cola_rows(path)
    return rows.sentences, rows.labels


@dataclasses.dataclass(frozen=True, eq=False)
class ColaRows:
    """The rows of one CoLA TSV file, in file order."""

    sources: list[str]  # first column: the code of the publication a sentence came from (e.g. 'gj04')
    sentences: list[str]
    labels: np.ndarray  # int32 [N], 1 = acceptable
    lines: list[int]  # the 1-based line of each row in its file

    def __len__(self) -> int:
        return len(self.sentences)


def read_cola_rows(path: str | os.PathLike) -> ColaRows:
    """`read_cola_tsv` with each row's source code and line number (same checks, same rows)."""
    name = os.fspath(path)
    try:
        raw = Path(name).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: file not found (expected a CoLA TSV file at this path)") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read file: {e.strerror or e}") from None

    lines = raw.split(b"\n") if raw else []
    if raw.endswith(b"\n"):
        lines.pop()  # the final newline terminates the last line; it does not start an empty one

    sources: list[str] = []
    sentences: list[str] = []
    labels: list[int] = []
    line_numbers: list[int] = []
    n_blank = 0
    file_offset = 0
    for lineno, line in enumerate(lines, start=1):
        line_start = file_offset
        file_offset += len(line) + 1
        if lineno == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
            line_start += len(_BOM)
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = line[e.start:e.end]
            raise DataError(
                f"{name}:{lineno}: invalid UTF-8 byte(s) {bad!r} at byte {e.start} of the line "
                f"(file offset {line_start + e.start}): {e.reason}; the file must be UTF-8"
            ) from None
        if "\t" not in text and not text.strip():
            n_blank += 1
            continue
        fields = text.split("\t")
        if len(fields) < N_FIELDS:
            raise DataError(
                f"{name}:{lineno}: missing column: found {len(fields)} tab-separated field(s), expected "
                f"{N_FIELDS} (source, label, annotation, sentence)"
            )
        if len(fields) > N_FIELDS:
            raise DataError(
                f"{name}:{lineno}: extra column: found {len(fields)} tab-separated fields, expected "
                f"{N_FIELDS} (source, label, annotation, sentence); a tab inside the sentence is not allowed"
            )
        source, label, _annotation, sentence = fields
        if label not in ("0", "1"):
            raise DataError(f"{name}:{lineno}: invalid label {label!r}: expected 0 or 1")
        if "\x00" in text:
            raise DataError(f"{name}:{lineno}: NUL byte at character {text.index(chr(0))} of the line; CoLA text never "
                            "holds one (is this a binary file?)")
        if not sentence.strip():
            raise DataError(
                f"{name}:{lineno}: empty sentence (4th field is {sentence!r}); expected non-blank text"
            )
        sources.append(source)
        sentences.append(sentence)
        labels.append(int(label))
        line_numbers.append(lineno)

    if n_blank:
        logger.warning("%s: skipped %d blank line(s)", name, n_blank)
    if not sentences:
        what = "file is empty" if not raw else f"only {n_blank} blank line(s)"
        raise DataError(f"{name}: no data rows ({what}); expected at least one CoLA row")
    return ColaRows(sources, sentences, np.asarray(labels, dtype=np.int32), line_numbers)


@dataclasses.dataclass(frozen=True)
class ColaFiles:
    """Where each split of a local CoLA dir lives; `out_of_domain` is None when the dir has no such file."""

    train: Path
    validation: Path
    out_of_domain: Path | None
    layout: str  # raw | glue


def find_cola_files(data_dir: str | os.PathLike) -> ColaFiles:
    """The split files of a local CoLA dir: the raw release layout (preferred) or the GLUE layout.

    Raw: in_domain_train.tsv, in_domain_dev.tsv (validation: the reference study's 527 rows) and, when present,
    out_of_domain_dev.tsv. GLUE: train.tsv and dev.tsv (GLUE's dev is both dev files together, 1,043 rows).
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(
            f"{data_dir}: not a directory; expected a CoLA dir holding {' + '.join(RAW_LAYOUT)} (raw layout) "
            f"or {' + '.join(GLUE_LAYOUT)} (GLUE layout); data.dir='' reads the packaged CoLA, "
            f"data.dir={HUB} the hub's GLUE copy"
        )
    for layout, names in (("raw", RAW_LAYOUT), ("glue", GLUE_LAYOUT)):
        train, dev = (d / f for f in names)
        if train.is_file() and dev.is_file():
            ood = d / OUT_OF_DOMAIN_FILE
            return ColaFiles(train, dev, ood if layout == "raw" and ood.is_file() else None, layout)
    raise DataError(
        f"{data_dir}: no CoLA files found: looked for {' + '.join(RAW_LAYOUT)} (raw layout) and "
        f"{' + '.join(GLUE_LAYOUT)} (GLUE layout); the dir holds {listing(d)}"
    )


# --------------------------------------------------------------------------------------------- loading


def describe_source(data_dir: str) -> str:
    """What `data.dir` means, in words for logs and metrics.json."""
    if data_dir == "":
        return f"packaged CoLA v1.1 ({COLA_DIR})"
    if data_dir == HUB:
        return f"hub {HUB_DATASET[0]} (config {HUB_DATASET[1]})"
    return str(data_dir)


def load_columns(data_dir: str) -> dict[str, Columns]:
    """Every split `data.dir` holds, as columns 'sentence' and 'label' (int32): 'train', 'validation' and, where the
    source has it, 'out_of_domain'.

    data_dir '' -> the CoLA files this package ships (train = in_domain_train, 8,551 rows; validation =
    in_domain_dev, 527 rows, the set of the reference results; out_of_domain = out_of_domain_dev, 516 rows).
    'hub' -> datasets.load_dataset('nyu-mll/glue', 'cola'), whose validation is both dev files (1,043 rows).
    Else a local dir in raw or GLUE layout (find_cola_files), parsed strictly by read_cola_rows.
    """
    if data_dir == HUB:
        out = _load_hub()
    else:
        files = find_cola_files(COLA_DIR if data_dir == "" else data_dir)
        out = {}
        for split, path in (("train", files.train), ("validation", files.validation),
                            ("out_of_domain", files.out_of_domain)):
            if path is None:
                logger.info("%s: no %s, so no out-of-domain evaluation", data_dir, OUT_OF_DOMAIN_FILE)
                continue
            rows = read_cola_rows(path)
            out[split] = {"sentence": rows.sentences, "label": rows.labels}
    logger.info("loaded CoLA from %s: %s", describe_source(data_dir),
                ", ".join(f"{s} {n_rows(c)} rows" for s, c in out.items()))
    return out


def _load_hub() -> dict[str, Columns]:
    import datasets

    try:
        full = datasets.load_dataset(*HUB_DATASET)
    except Exception as e:  # no network, hub down, unknown name: datasets raises many types
        raise DataError(
            f"data.dir={HUB}: could not load {HUB_DATASET[0]} (config {HUB_DATASET[1]}) from the Hugging Face hub "
            f"({type(e).__name__}: {first_line(e)}); without network leave data.dir empty for the packaged "
            "CoLA, or point it at a local CoLA dir"
        ) from None
    return {s: {"sentence": list(full[s]["sentence"]), "label": np.asarray(list(full[s]["label"]), dtype=np.int32)}
            for s in ("train", "validation")}


def n_rows(columns: Columns) -> int:
    """Rows in one split of `load_columns` (`len` of the dict would count its columns)."""
    return len(columns["label"])


def limit_rows(splits: dict[str, Columns], limit: int) -> dict[str, Columns]:
    """The first `limit` rows of each split of `load_columns` (0 keeps all); every cut is logged with the count
    before it."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise DataError(f"limit={limit!r}: expected an int >= 0 (0 keeps every row)")
    if not limit:
        return splits
    out = dict(splits)
    for split, columns in splits.items():
        n = n_rows(columns)
        if n > limit:
            out[split] = {name: column[:limit] for name, column in columns.items()}
            logger.info("data.limit=%d: kept the first %d of %d %s rows", limit, limit, n, split)
    return out


def load_cola(data_dir: str, limit: int = 0) -> datasets.DatasetDict:
    """`load_columns` cut to `limit` (see limit_rows) as a `datasets.DatasetDict` (columns 'sentence', 'label' with
    the hub's ClassLabel names), for looking at the data; training reads the columns (`load_splits`)."""
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABEL_NAMES))}
    )
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"sentence": list(c["sentence"]), "label": np.asarray(c["label"]).tolist()},
                                          features=features)
        for split, c in limit_rows(load_columns(data_dir), limit).items()})
