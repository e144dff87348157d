"""CoLA data: strict TSV reading, GPT-2 tokenization, and fixed-shape batches.

Why one module: every other part of the toolkit (teacher fine-tuning, distillation, evaluation) must see
exactly the same examples in exactly the same order, so reading, encoding and batching live here and nowhere
else. Bad input is never skipped silently: it raises `DataError` naming the file and line, and anything
that is legitimately dropped or cut (blank lines, rows beyond `limit`, tokens beyond `max_length`) is
counted and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_kd_jax.assets import COLA_DIR, TOKENIZER_DIR
from lora_kd_jax.core.config import Config
from lora_kd_jax.core.errors import UserError
from lora_kd_jax.models.gpt2_layout import PAD_ID  # GPT-2 eos, used as pad (`data.PAD_ID` stays importable)

if TYPE_CHECKING:  # heavy imports stay lazy so `import lora_kd_jax.data` is cheap
    import datasets
    import transformers

logger = logging.getLogger(__name__)

N_FIELDS = 4  # source, label, annotation, sentence
RAW_LAYOUT = ("in_domain_train.tsv", "in_domain_dev.tsv")
OUT_OF_DOMAIN_FILE = "out_of_domain_dev.tsv"
GLUE_LAYOUT = ("train.tsv", "dev.tsv")
HUB_DATASET = ("nyu-mll/glue", "cola")
LABEL_NAMES = ("unacceptable", "acceptable")  # same ClassLabel names as the hub copy
_BOM = b"\xef\xbb\xbf"


class DataError(UserError, ValueError):
    """Bad input data or data location; message starts with 'path:line: ' where a line applies."""
    label = "data error"


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


HUB = "hub"  # data.dir value that loads the hub's GLUE CoLA instead of files


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
        f"{' + '.join(GLUE_LAYOUT)} (GLUE layout); the dir holds {_listing(d)}"
    )


def _listing(d: Path, limit: int = 20) -> str:
    """Short, sorted listing of a dir's entries for error messages."""
    names = sorted(p.name for p in d.iterdir())
    if not names:
        return "nothing"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _looks_like_path(text: str) -> bool:
    """A value meant as a local path (a hub id is 'name' or 'owner/name', never starting with . / or ~)."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1


def describe_source(data_dir: str) -> str:
    """What `data.dir` means, in words for logs and metrics.json."""
    if data_dir == "":
        return f"packaged CoLA v1.1 ({COLA_DIR})"
    if data_dir == HUB:
        return f"hub {HUB_DATASET[0]} (config {HUB_DATASET[1]})"
    return str(data_dir)


def load_cola(data_dir: str, limit: int = 0) -> datasets.DatasetDict:
    """Splits 'train', 'validation' and, where the source has it, 'out_of_domain'; columns 'sentence', 'label'.

    data_dir '' -> the CoLA files this package ships (train = in_domain_train, 8,551 rows; validation =
    in_domain_dev, 527 rows, the set of the reference results; out_of_domain = out_of_domain_dev, 516 rows).
    'hub' -> datasets.load_dataset('nyu-mll/glue', 'cola'), whose validation is both dev files (1,043 rows).
    Else a local dir in raw or GLUE layout (find_cola_files), parsed strictly by read_cola_tsv and wrapped as
    `datasets` objects so callers see one type either way. limit>0 keeps the first `limit` rows of each split
    (for smoke runs; see limit_rows).
    """
    return limit_rows(_load_all(data_dir), limit)


def _load_all(data_dir: str) -> datasets.DatasetDict:
    import datasets

    if data_dir == HUB:
        try:
            full = datasets.load_dataset(*HUB_DATASET)
        except Exception as e:  # no network, hub down, unknown name: datasets raises many types
            raise DataError(
                f"data.dir={HUB}: could not load {HUB_DATASET[0]} (config {HUB_DATASET[1]}) from the Hugging Face hub "
                f"({type(e).__name__}: {_first_line(e)}); without network leave data.dir empty for the packaged "
                "CoLA, or point it at a local CoLA dir"
            ) from None
        out = datasets.DatasetDict(
            {s: full[s].select_columns(["sentence", "label"]) for s in ("train", "validation")}
        )
        logger.info("loaded CoLA from %s: %s", describe_source(data_dir), _counts(out))
        return out
    files = find_cola_files(COLA_DIR if data_dir == "" else data_dir)
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABEL_NAMES))}
    )
    out = datasets.DatasetDict()
    for split, path in (("train", files.train), ("validation", files.validation),
                        ("out_of_domain", files.out_of_domain)):
        if path is None:
            logger.info("%s: no %s, so no out-of-domain evaluation", data_dir, OUT_OF_DOMAIN_FILE)
            continue
        sentences, labels = read_cola_tsv(path)
        out[split] = datasets.Dataset.from_dict({"sentence": sentences, "label": labels.tolist()}, features=features)
    logger.info("loaded CoLA from %s: %s", describe_source(data_dir), _counts(out))
    return out


def limit_rows(ds: datasets.DatasetDict, limit: int) -> datasets.DatasetDict:
    """The first `limit` rows of each split (0 keeps all); every cut is logged with the count before it."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise DataError(f"limit={limit!r}: expected an int >= 0 (0 keeps every row)")
    if not limit:
        return ds
    out = type(ds)(ds)
    for split in list(out):
        n = len(out[split])
        if n > limit:
            out[split] = out[split].select(range(limit))
            logger.info("data.limit=%d: kept the first %d of %d %s rows", limit, limit, n, split)
    return out


def _counts(ds: Any) -> str:
    return ", ".join(f"{s} {len(ds[s])} rows" for s in ds)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "no message"


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
    full = _load_all(cfg.data.dir)
    rows = {s: len(full[s]) for s in full}
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    encoded = encode_splits(limit_rows(full, cfg.data.limit), tokenizer, cfg.data.max_length)
    return Splits(encoded, describe_source(cfg.data.dir), rows)


# ------------------------------------------------------------------------------------------ tokenizing


def load_tokenizer(name_or_dir: str) -> transformers.PreTrainedTokenizerFast:
    """GPT-2 BPE tokenizer: '' = the packaged GPT-2 files, else a dir or a hub name; pad token = eos (id 50256).

    A dir holding only vocab.json + merges.txt works offline (GPT-2's released encoder files need no
    tokenizer_config.json). Pad = eos because GPT-2 has no pad token; the attention mask keeps it inert.
    """
    import transformers

    p = TOKENIZER_DIR if name_or_dir == "" else Path(name_or_dir).expanduser()
    shown = f"packaged GPT-2 tokenizer ({p})" if name_or_dir == "" else name_or_dir
    if p.is_dir():
        vocab, merges = p / "vocab.json", p / "merges.txt"
        if vocab.is_file() and merges.is_file():
            try:
                tok = transformers.GPT2TokenizerFast(vocab_file=str(vocab), merges_file=str(merges))
            except Exception as e:  # a cut-off vocab.json or a merges.txt of another format
                raise DataError(f"{vocab} / {merges}: not a readable GPT-2 vocabulary and merges file "
                                f"({type(e).__name__}: {_first_line(e)})") from None
        elif (p / "tokenizer.json").is_file():
            try:
                tok = transformers.AutoTokenizer.from_pretrained(str(p), use_fast=True)
            except Exception as e:
                raise DataError(f"{p / 'tokenizer.json'}: not a readable tokenizer "
                                f"({type(e).__name__}: {_first_line(e)})") from None
        else:
            raise DataError(
                f"{shown}: no tokenizer files: expected vocab.json + merges.txt or tokenizer.json; "
                f"the dir holds {_listing(p)}"
            )
    elif p.exists():
        raise DataError(f"{shown}: is a file; expected a tokenizer dir, a hub name such as 'gpt2', or '' for the "
                        "packaged GPT-2 tokenizer")
    elif _looks_like_path(name_or_dir):
        raise DataError(f"data.tokenizer={name_or_dir}: no such directory (expected a dir with vocab.json + "
                        "merges.txt, a hub name such as 'gpt2', or '' for the packaged GPT-2 tokenizer)")
    else:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(name_or_dir, use_fast=True)
        except Exception as e:  # no network, unknown repo: transformers raises OSError, ValueError, ...
            raise DataError(
                f"data.tokenizer={name_or_dir}: could not load it from the Hugging Face hub "
                f"({type(e).__name__}: {_first_line(e)}); without network leave data.tokenizer empty for the "
                "packaged GPT-2 tokenizer (the same files as the hub's gpt2), or give a local dir"
            ) from None

    if not isinstance(tok, transformers.PreTrainedTokenizerFast):
        raise DataError(f"{name_or_dir}: got {type(tok).__name__}; expected a fast (Rust) tokenizer")
    if tok.eos_token_id != PAD_ID:
        raise DataError(
            f"{name_or_dir}: eos token {tok.eos_token!r} has id {tok.eos_token_id}; expected {PAD_ID} "
            "(GPT-2's <|endoftext|>) — is this a GPT-2 tokenizer?"
        )
    tok.pad_token = tok.eos_token
    return tok


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedSplit:
    """One tokenized split as fixed-width int32 arrays (eq=False: arrays have no single truth value)."""

    input_ids: np.ndarray  # int32 [N, max_length], right padded with PAD_ID
    attention_mask: np.ndarray  # int32 [N, max_length], 1 on real tokens
    labels: np.ndarray  # int32 [N]
    n_truncated: int  # sentences longer than max_length that were cut
    truncated_rows: np.ndarray | None = None  # bool [N]: which rows were cut (set by `encode`)

    def __post_init__(self) -> None:
        ids, mask, labels = self.input_ids, self.attention_mask, self.labels
        if ids.ndim != 2 or mask.shape != ids.shape or labels.shape != (ids.shape[0],):
            raise DataError(
                f"EncodedSplit: inconsistent shapes input_ids {ids.shape}, attention_mask {mask.shape}, "
                f"labels {labels.shape}; expected [N, L], [N, L], [N]"
            )
        for field, arr in (("input_ids", ids), ("attention_mask", mask), ("labels", labels)):
            if arr.dtype != np.int32:
                raise DataError(f"EncodedSplit: {field} has dtype {arr.dtype}; expected int32")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode(sentences: Sequence[str], labels: np.ndarray, tokenizer, max_length: int) -> EncodedSplit:
    """Truncate + right-pad to max_length; logs how many were truncated.

    The sentences are tokenized once without truncation to learn true lengths (so truncation is counted,
    not guessed), then once by the fast batch call with truncation and max_length padding. The result is
    checked against those lengths, so a tokenizer set to pad or truncate on the left cannot slip through.
    """
    sentences = list(sentences)
    labels = np.asarray(labels)
    if not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length={max_length!r}: expected an int >= 1")
    if labels.ndim != 1 or len(labels) != len(sentences):
        raise DataError(
            f"encode: {len(sentences)} sentences but labels of shape {labels.shape}; expected shape "
            f"({len(sentences)},)"
        )
    if tokenizer.pad_token_id != PAD_ID:
        raise DataError(
            f"encode: tokenizer pad id is {tokenizer.pad_token_id}; expected {PAD_ID} (use load_tokenizer)"
        )
    n = len(sentences)
    if n == 0:
        empty = np.zeros((0, max_length), np.int32)
        return EncodedSplit(empty, empty.copy(), np.zeros((0,), np.int32), 0, np.zeros((0,), bool))

    full_lengths = np.fromiter(
        (len(ids) for ids in tokenizer(sentences, truncation=False)["input_ids"]), dtype=np.int64, count=n
    )
    if (full_lengths == 0).any():
        i = int(np.argmax(full_lengths == 0))
        raise DataError(f"encode: sentence {i} ({sentences[i]!r}) encodes to 0 tokens; expected >= 1")

    enc = tokenizer(
        sentences, truncation=True, max_length=max_length, padding="max_length", return_tensors="np"
    )
    input_ids = np.asarray(enc["input_ids"], dtype=np.int32)
    attention_mask = np.asarray(enc["attention_mask"], dtype=np.int32)

    kept = np.minimum(full_lengths, max_length)
    expected_mask = (np.arange(max_length)[None, :] < kept[:, None]).astype(np.int32)
    if input_ids.shape != (n, max_length) or not np.array_equal(attention_mask, expected_mask):
        raise DataError(
            "encode: tokenizer output is not right-truncated and right-padded to max_length "
            f"(padding_side={tokenizer.padding_side!r}, truncation_side={tokenizer.truncation_side!r}); "
            "expected 'right' for both"
        )
    if not (input_ids[attention_mask == 0] == PAD_ID).all():
        raise DataError(f"encode: padding positions hold ids other than PAD_ID={PAD_ID}")

    truncated = full_lengths > max_length
    n_truncated = int(truncated.sum())
    if n_truncated:
        logger.info("truncated %d of %d sentences to %d tokens", n_truncated, n, max_length)
    return EncodedSplit(input_ids, attention_mask, labels.astype(np.int32), n_truncated, truncated)


def encode_splits(
    ds: datasets.DatasetDict, tokenizer, max_length: int
) -> dict[str, EncodedSplit]:
    """Encode every split of `ds` (columns 'sentence', 'label') with the same tokenizer and max_length."""
    out: dict[str, EncodedSplit] = {}
    for split in ds:
        out[split] = encode(ds[split]["sentence"], np.asarray(ds[split]["label"]), tokenizer, max_length)
        logger.info(
            "encoded %s: %d examples, max_length %d, %d truncated",
            split, len(out[split]), max_length, out[split].n_truncated,
        )
    return out


# -------------------------------------------------------------------------------------------- batching


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch: ceil(n / batch_size), because the last partial batch is kept (padded)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if n < 0:
        raise ValueError(f"n={n}: expected >= 0")
    return math.ceil(n / batch_size)


def epoch_order(n: int, *, shuffle: bool, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """Row order of one epoch: a permutation keyed by (seed, epoch) when shuffling, else file order."""
    if not shuffle:
        return np.arange(n)
    import jax

    from lora_kd_jax.core.keys import data_order_key

    return np.asarray(jax.random.permutation(data_order_key(seed, epoch), n))


def group_by_length(order: np.ndarray, row_lengths: np.ndarray, batch_size: int, window: int, *, seed: int,
                    epoch: int) -> np.ndarray:
    """`order` regrouped so each batch holds rows of similar length: each run of `window` batches is sorted by
    length (stable), then the full batches are put in an order keyed by (seed, epoch); a partial last batch stays
    last. Every row still appears once per epoch; what changes is which rows share a batch."""
    import jax

    from lora_kd_jax.core.keys import data_order_key

    chunk = window * batch_size
    grouped = np.concatenate([order[i:i + chunk][np.argsort(row_lengths[order[i:i + chunk]], kind="stable")]
                              for i in range(0, len(order), chunk)]) if len(order) else order
    n_full = len(grouped) // batch_size
    key = jax.random.fold_in(data_order_key(seed, epoch), 1)
    batches = np.asarray(jax.random.permutation(key, n_full))
    full = grouped[:n_full * batch_size].reshape(n_full, batch_size)[batches].reshape(-1)
    return np.concatenate([full, grouped[n_full * batch_size:]])


def batch_iterator(
    split: EncodedSplit,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    lengths: Sequence[int] = (),
    group_window: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """The one place batches are built: fixed [batch_size, ...] shapes so the step compiles once.

    Yields dicts with 'input_ids' int32 [B,L], 'attention_mask' int32 [B,L], 'labels' int32 [B] and
    'weights' float32 [B] (1.0 real row, 0.0 padding row) and 'index' int32 [B] (row in `split`, 0 on padding
    rows; lets a step gather per-example arrays such as cached teacher logits on device). The last partial batch
    is kept and filled with padding rows: weights 0, input_ids PAD_ID, attention_mask with a single 1 at position 0
    (so "last real token" indexing stays in range), label 0. Order: when shuffle, jax.random.permutation of N keyed by
    fold_in(key(seed), epoch); else file order. start_batch skips the first k batches of that epoch's order,
    so a resumed run sees exactly the batches it had not yet seen.

    `lengths` (length-aware batching): a small sorted set of padded lengths; each batch is cut to the shortest one
    that holds its longest row (at most one compiled shape per length). Exact for right-padded causal models that
    pool the last real token (GPT-2, the `last_token` student); not for `last_step` pooling, which reads the last
    padded position.

    `group_window` (with shuffle; 0 = off): rows are grouped by length within windows of that many batches
    (`group_by_length`), so cutting to `lengths` pays: uniformly random batches of 128 CoLA sentences almost always
    hold one of 17+ tokens, grouped ones mostly do not.
    """
    n = len(split)
    nb = num_batches(n, batch_size)
    if not 0 <= start_batch <= nb:
        raise ValueError(f"start_batch={start_batch}: expected 0 <= start_batch <= {nb} (batches per epoch)")
    order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    if shuffle and group_window > 0:
        order = group_by_length(order, split.attention_mask.sum(axis=1), batch_size, group_window, seed=seed,
                                epoch=epoch)
    seq_len = split.input_ids.shape[1]
    for b in range(start_batch, nb):
        idx = order[b * batch_size:(b + 1) * batch_size]
        k = len(idx)
        input_ids = np.full((batch_size, seq_len), PAD_ID, dtype=np.int32)
        attention_mask = np.zeros((batch_size, seq_len), dtype=np.int32)
        labels = np.zeros((batch_size,), dtype=np.int32)
        weights = np.zeros((batch_size,), dtype=np.float32)
        index = np.zeros((batch_size,), dtype=np.int32)
        index[:k] = idx
        input_ids[:k] = split.input_ids[idx]
        attention_mask[:k] = split.attention_mask[idx]
        attention_mask[k:, 0] = 1
        labels[:k] = split.labels[idx]
        weights[:k] = 1.0
        if lengths:
            keep = bucket_length(int(attention_mask.sum(axis=1).max()), lengths, seq_len)
            input_ids, attention_mask = input_ids[:, :keep], attention_mask[:, :keep]
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weights": weights,
               "index": index}


@dataclasses.dataclass(frozen=True)
class BatchSources:
    """What a training loop iterates: train(epoch, start_batch) and eval() each return a fresh batch iterator;
    `reported` holds further evaluation sets (the out-of-domain dev set) that are scored every epoch and reported
    beside validation, never used to choose the best epoch."""
    train: Callable[[int, int], Iterator[dict[str, np.ndarray]]]
    eval: Callable[[], Iterator[dict[str, np.ndarray]]]
    n_train_batches: int
    reported: dict[str, Callable[[], Iterator[dict[str, np.ndarray]]]] = dataclasses.field(default_factory=dict)


REPORTED_SPLITS = ("out_of_domain",)  # evaluated every epoch when the data has them; never pick the best epoch


def batch_sources(splits: dict[str, EncodedSplit], cfg: Config) -> BatchSources:
    """The train and evaluation batches a run's config asks for (batch sizes, seed, buckets, length grouping):
    the LoRA and the student trainers both take theirs from here."""
    train, val = splits["train"], splits["validation"]
    bs, ebs = cfg.train.batch_size, cfg.train.eval_batch
    buckets = cfg.data.buckets
    if bs > len(train):  # every step would be mostly padding, and a huge batch can exhaust memory
        raise DataError(f"train.batch_size={bs} exceeds the {len(train)} training rows: every step would pad to {bs} "
                        f"rows; use train.batch_size <= {len(train)}")
    if cfg.train.eval_batch_size > len(val):
        raise DataError(f"train.eval_batch_size={cfg.train.eval_batch_size} exceeds the {len(val)} validation rows; "
                        f"use at most {len(val)} (or 0 for train.batch_size)")

    def eval_of(split: EncodedSplit) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
        return lambda: batch_iterator(split, ebs, shuffle=False, lengths=buckets)

    def train_of(seed: int) -> Callable[[int, int], Iterator[dict[str, np.ndarray]]]:
        return lambda epoch, start: batch_iterator(train, bs, shuffle=True, seed=seed, epoch=epoch, start_batch=start,
                                                   lengths=buckets, group_window=cfg.data.group_window)

    if cfg.train.seeds:  # one batch per seed, stacked: seed k sees the batches of a single run with train.seed=k
        per_seed = [train_of(s) for s in cfg.train.seeds]

        def train_batches(epoch: int, start: int) -> Iterator[dict[str, np.ndarray]]:
            return map(stack_batches, zip(*(source(epoch, start) for source in per_seed)))
    else:
        train_batches = train_of(cfg.train.seed)
    return BatchSources(
        train=train_batches,
        eval=eval_of(val),
        n_train_batches=num_batches(len(train), bs),
        reported={name: eval_of(splits[name]) for name in REPORTED_SPLITS if name in splits})


def stack_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches of N seeds -> one batch with a leading seed axis [N, B, ...]. Token arrays cut to different bucket
    lengths are right-padded to the longest (PAD_ID, mask 0): exact wherever bucketing is (the last real token is
    read, never a padded position)."""
    longest = max(b["input_ids"].shape[1] for b in batches)

    def widen(x: np.ndarray, fill: int) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, longest - x.shape[1])), constant_values=fill) if x.shape[1] < longest else x

    out = {k: np.stack([b[k] for b in batches]) for k in batches[0] if k not in ("input_ids", "attention_mask")}
    out["input_ids"] = np.stack([widen(b["input_ids"], PAD_ID) for b in batches])
    out["attention_mask"] = np.stack([widen(b["attention_mask"], 0) for b in batches])
    return out


def bucket_length(longest: int, lengths: Sequence[int], seq_len: int) -> int:
    """The shortest of `lengths` (capped at seq_len) that holds `longest` tokens; seq_len if none does."""
    for n in sorted(lengths):
        if longest <= n <= seq_len:
            return n
    return seq_len
