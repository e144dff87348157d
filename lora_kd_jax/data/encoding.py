"""The GPT-2 tokenizer and encoding: sentences -> fixed-width, right-padded int32 arrays (`EncodedSplit`).

Why here and only here: the teacher, the student and `evaluation` must cut and pad a sentence the same way, and
every cut is counted (`n_truncated`, `truncated_rows`), never guessed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_kd_jax.assets import TOKENIZER_DIR
from lora_kd_jax.core.errors import first_line
from lora_kd_jax.data.errors import DataError, listing
from lora_kd_jax.core.gpt2_layout import PAD_ID  # GPT-2 eos, used as pad (`data.PAD_ID` stays importable)

if TYPE_CHECKING:  # heavy import stays lazy so `import lora_kd_jax.data` is cheap
    import transformers

logger = logging.getLogger(__name__)


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
                                f"({type(e).__name__}: {first_line(e)})") from None
        elif (p / "tokenizer.json").is_file():
            try:
                tok = transformers.AutoTokenizer.from_pretrained(str(p), use_fast=True)
            except Exception as e:
                raise DataError(f"{p / 'tokenizer.json'}: not a readable tokenizer "
                                f"({type(e).__name__}: {first_line(e)})") from None
        else:
            raise DataError(
                f"{shown}: no tokenizer files: expected vocab.json + merges.txt or tokenizer.json; "
                f"the dir holds {listing(p)}"
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
                f"({type(e).__name__}: {first_line(e)}); without network leave data.tokenizer empty for the "
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


def load_family_tokenizer(name_or_dir: str, family: str) -> transformers.PreTrainedTokenizerFast:
    """A BERT / RoBERTa / Llama fast tokenizer (WordPiece, byte-level BPE, SentencePiece-converted) from a
    save_pretrained dir (tokenizer.json) or a hub name, with the special tokens, right padding and pad id PyTorch's
    classifier expects: [CLS] ... [SEP] / <s> ... </s> / <s> ... added by the tokenizer itself, padding with its own
    pad token (a Llama tokenizer without one: give it one, and the checkpoint's config the same pad_token_id)."""
    import transformers

    p = Path(name_or_dir).expanduser()
    if not name_or_dir:
        raise DataError(f"data.tokenizer is empty and model.type={family}: the packaged tokenizer is GPT-2's; set "
                        "data.tokenizer to the model's tokenizer dir (or keep it beside model.path)")
    if p.exists() and not p.is_dir():
        raise DataError(f"data.tokenizer={name_or_dir}: is a file; expected a tokenizer dir (tokenizer.json)")
    if not p.is_dir() and _looks_like_path(name_or_dir):
        raise DataError(f"data.tokenizer={name_or_dir}: no such directory")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(p) if p.is_dir() else name_or_dir, use_fast=True)
    except Exception as e:  # a dir without tokenizer files, no network for a hub name
        raise DataError(f"data.tokenizer={name_or_dir}: the {family} tokenizer does not load "
                        f"({type(e).__name__}: {first_line(e)}); expected a dir written by save_pretrained") from None
    if not isinstance(tok, transformers.PreTrainedTokenizerFast):
        raise DataError(f"{name_or_dir}: got {type(tok).__name__}; expected a fast (Rust) tokenizer")
    needed = {"bert": ("cls_token", "sep_token", "pad_token"), "roberta": ("bos_token", "eos_token", "pad_token"),
              "llama": ("bos_token", "pad_token")}
    lacking = [t for t in needed.get(family, ("pad_token",)) if getattr(tok, t) is None]
    if lacking:
        raise DataError(f"data.tokenizer={name_or_dir}: a {family} tokenizer needs {', '.join(lacking)}; this one "
                        "has none")
    tok.padding_side = tok.truncation_side = "right"  # what the classifiers expect (their pooling reads token 0)
    return tok


def tokenizer_for(cfg: Any) -> transformers.PreTrainedTokenizerFast:
    """The run's tokenizer: GPT-2's (`load_tokenizer`), or the encoder family's, defaulting to model.path's dir."""
    family = getattr(cfg.model, "type", "gpt2")
    if family == "gpt2":
        return load_tokenizer(cfg.data.tokenizer)
    return load_family_tokenizer(cfg.data.tokenizer or cfg.model.path, family)


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedSplit:
    """One tokenized split as fixed-width int32 arrays (eq=False: arrays have no single truth value)."""

    input_ids: np.ndarray  # int32 [N, max_length], right padded with `pad_id`
    attention_mask: np.ndarray  # int32 [N, max_length], 1 on real tokens
    labels: np.ndarray  # int32 [N] class ids, or float32 [N] targets of a regression run
    n_truncated: int  # sentences (or pairs) longer than max_length that were cut
    truncated_rows: np.ndarray | None = None  # bool [N]: which rows were cut (set by `encode`)
    token_type_ids: np.ndarray | None = None  # int32 [N, max_length]: BERT's segment ids of a pair (0 a, 1 b)
    pad_id: int = PAD_ID  # the tokenizer's pad id (GPT-2's eos; BERT's [PAD], ...): what the batcher pads with

    def __post_init__(self) -> None:
        ids, mask, labels = self.input_ids, self.attention_mask, self.labels
        if ids.ndim != 2 or mask.shape != ids.shape or labels.shape != (ids.shape[0],):
            raise DataError(
                f"EncodedSplit: inconsistent shapes input_ids {ids.shape}, attention_mask {mask.shape}, "
                f"labels {labels.shape}; expected [N, L], [N, L], [N]"
            )
        types = () if self.token_type_ids is None else (("token_type_ids", self.token_type_ids),)
        for field, arr in (("input_ids", ids), ("attention_mask", mask), *types):
            if arr.shape != ids.shape:
                raise DataError(f"EncodedSplit: {field} has shape {arr.shape}; expected {ids.shape}")
            if arr.dtype != np.int32:
                raise DataError(f"EncodedSplit: {field} has dtype {arr.dtype}; expected int32")
        if labels.dtype not in (np.int32, np.float32):
            raise DataError(f"EncodedSplit: labels have dtype {labels.dtype}; expected int32 (classes) or float32 "
                            "(regression)")

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
    pad_id = tokenizer.pad_token_id  # GPT-2's: its eos (PAD_ID); an encoder family's: its own [PAD] / <pad>
    if pad_id is None:
        raise DataError(f"encode: the tokenizer has no pad token; expected {PAD_ID} for GPT-2 (use load_tokenizer)")
    n = len(sentences)
    if n == 0:
        empty = np.zeros((0, max_length), np.int32)
        return EncodedSplit(empty, empty.copy(), np.zeros((0,), np.int32), 0, np.zeros((0,), bool), pad_id=int(pad_id))

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
    if not (input_ids[attention_mask == 0] == pad_id).all():
        raise DataError(f"encode: padding positions hold ids other than the pad id {pad_id}")

    truncated = full_lengths > max_length
    n_truncated = int(truncated.sum())
    if n_truncated:
        logger.info("truncated %d of %d sentences to %d tokens", n_truncated, n, max_length)
    return EncodedSplit(input_ids, attention_mask, _label_array(labels), n_truncated, truncated, pad_id=int(pad_id))


def _label_array(labels: np.ndarray) -> np.ndarray:
    """Class ids as int32, regression targets (a float array) as float32."""
    return labels.astype(np.float32 if labels.dtype.kind == "f" else np.int32)


def fair_split(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Tokens kept of each text of a pair within `budget`: both whole when they fit; else the shorter is kept whole
    when it fits in half the budget and the longer gets the rest, otherwise each gets half (the first the odd one)."""
    if len_a + len_b <= budget:
        return len_a, len_b
    keep_a = min(len_a, max(budget - len_b, budget - budget // 2))
    return keep_a, min(len_b, budget - keep_a)


def encode_pairs(first: Sequence[str], second: Sequence[str], labels: np.ndarray, tokenizer,
                 max_length: int) -> EncodedSplit:
    """Sentence pairs as one right-padded sequence, the way the model's family reads them: GPT-2 (no pair template)
    gets `_gpt2_pairs`; BERT / RoBERTa / Llama get their own tokenizer's pair template (`_template_pairs`). Cut
    pairs are counted and logged."""
    first, second, labels = list(first), list(second), np.asarray(labels)
    n = len(first)
    if len(second) != n or labels.shape != (n,):
        raise DataError(f"encode_pairs: {n} first texts, {len(second)} second texts and labels of shape "
                        f"{labels.shape}; expected the same number of each")
    if tokenizer.pad_token_id is None:
        raise DataError("encode_pairs: the tokenizer has no pad token (load it with load_tokenizer / "
                        "load_family_tokenizer)")
    gpt2 = tokenizer.pad_token_id == PAD_ID and tokenizer.num_special_tokens_to_add(pair=True) == 0
    least = 3 if gpt2 else tokenizer.num_special_tokens_to_add(pair=True) + 2
    if not isinstance(max_length, int) or max_length < least:
        raise DataError(f"max_length={max_length!r}: a sentence pair needs at least {least} tokens (one of each text "
                        f"and {least - 2} the tokenizer adds)" if not gpt2 else
                        f"max_length={max_length!r}: a sentence pair needs at least 3 tokens (one of each text and "
                        "the separator)")
    tokens_a, tokens_b = ([tokenizer(texts, add_special_tokens=False)["input_ids"] if n else [] for texts in
                           (first, second)])
    for i, (a, b) in enumerate(zip(tokens_a, tokens_b)):
        if not a or not b:
            raise DataError(f"encode_pairs: pair {i} ({first[i]!r}, {second[i]!r}) has a text of 0 tokens")
    split = (_gpt2_pairs(tokens_a, tokens_b, _label_array(labels), max_length) if gpt2 else
             _template_pairs(first, second, _label_array(labels), tokenizer, max_length))
    if split.n_truncated:
        how = "split fairly" if gpt2 else "cut from the longer text first, as transformers' longest_first"
        logger.info("truncated %d of %d sentence pairs to %d tokens (the budget %s)", split.n_truncated, n,
                    max_length, how)
    return split


def _gpt2_pairs(tokens_a: list[list[int]], tokens_b: list[list[int]], labels: np.ndarray,
                max_length: int) -> EncodedSplit:
    """First text, GPT-2's end-of-text token (id 50256) as the separator, second text. GPT-2 has no separator token:
    <|endoftext|> is the one special token it knows (it sat between documents in pretraining), and a new token would
    need a new, untrained embedding row. Each text is tokenized on its own (as transformers' tokenizers encode a
    pair); when the two do not fit, `fair_split` spends the max_length - 1 tokens between them, cutting each at its
    end."""
    n = len(tokens_a)
    ids = np.full((n, max_length), PAD_ID, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    truncated = np.zeros((n,), bool)
    for i, (a, b) in enumerate(zip(tokens_a, tokens_b)):
        keep_a, keep_b = fair_split(len(a), len(b), max_length - 1)
        row = [*a[:keep_a], PAD_ID, *b[:keep_b]]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        truncated[i] = keep_a < len(a) or keep_b < len(b)
    return EncodedSplit(ids, mask, labels, int(truncated.sum()), truncated)


def _template_pairs(first: list[str], second: list[str], labels: np.ndarray, tokenizer,
                    max_length: int) -> EncodedSplit:
    """The family tokenizer called on (text, text_pair), as PyTorch code calls it: its own template ([CLS] a [SEP] b
    [SEP] with token types 0 / 1 for BERT, <s> a </s></s> b </s> for RoBERTa, Llama's as its tokenizer gives) and
    transformers' truncation="longest_first" (a token off the longer text at a time). Token types are kept when the
    tokenizer returns them (BERT's; RoBERTa's and Llama's take none)."""
    n = len(first)
    if n == 0:
        empty = np.zeros((0, max_length), np.int32)
        return EncodedSplit(empty, empty.copy(), labels, 0, np.zeros((0,), bool),
                            pad_id=int(tokenizer.pad_token_id))
    full = np.array([len(ids) for ids in tokenizer(first, second, truncation=False)["input_ids"]], np.int64)
    enc = tokenizer(first, second, truncation="longest_first", max_length=max_length, padding="max_length",
                    return_tensors="np")
    ids, mask = (np.asarray(enc[k], dtype=np.int32) for k in ("input_ids", "attention_mask"))
    expected_mask = (np.arange(max_length)[None, :] < np.minimum(full, max_length)[:, None]).astype(np.int32)
    if ids.shape != (n, max_length) or not np.array_equal(mask, expected_mask):
        raise DataError("encode_pairs: tokenizer output is not right-truncated and right-padded to max_length "
                        f"(padding_side={tokenizer.padding_side!r}); expected 'right'")
    types = np.asarray(enc["token_type_ids"], dtype=np.int32) if "token_type_ids" in enc else None
    truncated = full > max_length
    return EncodedSplit(ids, mask, labels, int(truncated.sum()), truncated, types, int(tokenizer.pad_token_id))


def encode_splits(ds: Mapping[str, Any], tokenizer, max_length: int) -> dict[str, EncodedSplit]:
    """Encode every split of `ds` (columns 'sentence', 'label': `load_columns`' dicts or a `datasets.DatasetDict`)
    with the same tokenizer and max_length."""
    out: dict[str, EncodedSplit] = {}
    for split in ds:
        out[split] = encode(ds[split]["sentence"], np.asarray(ds[split]["label"]), tokenizer, max_length)
        logger.info(
            "encoded %s: %d examples, max_length %d, %d truncated",
            split, len(out[split]), max_length, out[split].n_truncated,
        )
    return out


def _looks_like_path(text: str) -> bool:
    """A value meant as a local path (a hub id is 'name' or 'owner/name', never starting with . / or ~)."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1
