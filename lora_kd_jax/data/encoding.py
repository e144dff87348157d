"""Tokenizers and encoding: sentences -> fixed-width, right-padded int32 arrays (`EncodedSplit`).

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
PAD_ID = 50256  # the packaged (GPT-2) tokenizer's pad id: its eos, <|endoftext|>

if TYPE_CHECKING:  # heavy import stays lazy so `import lora_kd_jax.data` is cheap
    import transformers

logger = logging.getLogger(__name__)


def _read_tokenizer(p: Path, tokenizer_class: str, shown: str) -> Any:
    """A tokenizer from a local dir: transformers' AutoTokenizer where the dir says what it is (tokenizer.json,
    tokenizer_config.json), else the family's fast class over its vocabulary files (GPT-2's released vocab.json +
    merges.txt need no config)."""
    import transformers

    described = (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()
    files = sorted(f.name for f in p.iterdir() if f.name in ("vocab.json", "merges.txt", "vocab.txt",
                                                             "tokenizer.model"))
    if not described and not files:
        raise DataError(f"{shown}: no tokenizer files: expected tokenizer.json, or vocab.json + merges.txt; the dir "
                        f"holds {listing(p)}")
    try:
        if described:
            return transformers.AutoTokenizer.from_pretrained(str(p), use_fast=True)
        return getattr(transformers, tokenizer_class).from_pretrained(str(p))
    except Exception as e:  # a cut-off vocab.json, a merges.txt of another format, a broken tokenizer.json
        read = [p / "tokenizer.json"] if (p / "tokenizer.json").is_file() else [p / f for f in files]
        raise DataError(f"{' / '.join(map(str, read))}: not a readable tokenizer ({type(e).__name__}: "
                        f"{first_line(e)})") from None


def load_tokenizer(name_or_dir: str = "", *, needs: Sequence[str] = (), tokenizer_class: str = "GPT2TokenizerFast",
                   pad_id: int | None = None, vocab_size: int | None = None) -> transformers.PreTrainedTokenizerFast:
    """A fast tokenizer padding and cutting on the right, as the classifiers read rows: '' = the packaged GPT-2 BPE
    files, a local dir, or a hub name. `needs` are special tokens its template must have (BERT's [CLS], ...).

    Its pad token is its own, else `pad_id` (the checkpoint's config.json pad_token_id), else its eos token: GPT-2
    has no pad token and pads with eos, as do many decoders (Llama 3); the attention mask keeps padding inert, and
    the choice is logged. A tokenizer with more ids than the model's `vocab_size` is refused."""
    import transformers

    p = TOKENIZER_DIR if name_or_dir == "" else Path(name_or_dir).expanduser()
    shown = f"packaged GPT-2 tokenizer ({p})" if name_or_dir == "" else f"data.tokenizer={name_or_dir}"
    if p.is_dir():
        tok = _read_tokenizer(p, tokenizer_class, shown)
    elif p.exists():
        raise DataError(f"{shown}: is a file; expected a tokenizer dir, a hub name such as 'gpt2', or '' for the "
                        "packaged GPT-2 tokenizer")
    elif _looks_like_path(name_or_dir):
        raise DataError(f"{shown}: no such directory (expected a dir with tokenizer.json or vocab.json + "
                        "merges.txt, a hub name such as 'gpt2', or '' for the packaged GPT-2 tokenizer)")
    else:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(name_or_dir, use_fast=True)
        except Exception as e:  # no network, unknown repo: transformers raises OSError, ValueError, ...
            raise DataError(
                f"{shown}: could not load it from the Hugging Face hub ({type(e).__name__}: {first_line(e)}); "
                "without network leave data.tokenizer empty for the checkpoint's own tokenizer or the packaged GPT-2 "
                "tokenizer (the same files as the hub's gpt2), or give a local dir") from None
    if not isinstance(tok, transformers.PreTrainedTokenizerFast):
        raise DataError(f"{shown}: got {type(tok).__name__}; expected a fast (Rust) tokenizer")
    lacking = [t for t in needs if getattr(tok, t) is None]
    if lacking:
        raise DataError(f"{shown}: this model's template needs {', '.join(lacking)}; the tokenizer has none")
    if vocab_size is not None and len(tok) > vocab_size:
        raise DataError(f"{shown}: {len(tok)} tokens, more than the model's vocabulary of {vocab_size}: it is the "
                        "tokenizer of another model")
    if tok.pad_token is None:
        if pad_id is not None:
            tok.pad_token = tok.convert_ids_to_tokens(int(pad_id))
            logger.info("%s has no pad token: padding with id %d, config.json's pad_token_id (%r)", shown, pad_id,
                        tok.pad_token)
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
            logger.info("%s has no pad token: padding with its eos token %r (id %d)", shown, tok.eos_token,
                        tok.eos_token_id)
        else:
            raise DataError(f"{shown}: no pad token, no pad_token_id in the checkpoint's config.json and no eos "
                            "token to pad with; give the tokenizer a pad token")
    tok.padding_side = tok.truncation_side = "right"  # what the classifiers expect (their pooling reads from it)
    return tok


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
        raise DataError("encode: the tokenizer has no pad token (load it with load_tokenizer, which gives it one)")
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
        raise DataError("encode_pairs: the tokenizer has no pad token (load it with load_tokenizer, which gives it "
                        "one)")
    gpt2 = tokenizer.num_special_tokens_to_add(pair=True) == 0  # no pair template: eos between the texts
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
    split = (_gpt2_pairs(tokens_a, tokens_b, _label_array(labels), max_length, tokenizer) if gpt2 else
             _template_pairs(first, second, _label_array(labels), tokenizer, max_length))
    if split.n_truncated:
        how = "split fairly" if gpt2 else "cut from the longer text first, as transformers' longest_first"
        logger.info("truncated %d of %d sentence pairs to %d tokens (the budget %s)", split.n_truncated, n,
                    max_length, how)
    return split


def _gpt2_pairs(tokens_a: list[list[int]], tokens_b: list[list[int]], labels: np.ndarray,
                max_length: int, tokenizer: Any) -> EncodedSplit:
    """A tokenizer without a pair template (GPT-2's): first text, its end-of-text token (GPT-2's id 50256) as the
    separator, second text, padded with its pad id. GPT-2 has no separator token:
    <|endoftext|> is the one special token it knows (it sat between documents in pretraining), and a new token would
    need a new, untrained embedding row. Each text is tokenized on its own (as transformers' tokenizers encode a
    pair); when the two do not fit, `fair_split` spends the max_length - 1 tokens between them, cutting each at its
    end."""
    n, sep, pad = len(tokens_a), int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    ids = np.full((n, max_length), pad, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    truncated = np.zeros((n,), bool)
    for i, (a, b) in enumerate(zip(tokens_a, tokens_b)):
        keep_a, keep_b = fair_split(len(a), len(b), max_length - 1)
        row = [*a[:keep_a], sep, *b[:keep_b]]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        truncated[i] = keep_a < len(a) or keep_b < len(b)
    return EncodedSplit(ids, mask, labels, int(truncated.sum()), truncated, pad_id=pad)


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
