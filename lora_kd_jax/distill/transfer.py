"""The transfer set a student is distilled on (Tang et al. 2019): the training rows, `distill.augment` augmented
copies of each (`data.augment`), and the sentences of a text file (`distill.unlabeled`), labelled once by the teacher.

Rows 0..n-1 are the training split itself (their gold labels kept); the augmented copies follow, sentence-major, then
the unlabeled sentences. Their hard labels (the `distill.alpha` term, and the training accuracy) are the teacher's
predictions, as Tang et al. label their transfer set; `teacher_labels` fills them in once the logits are known.

The copies are made from the training rows as the models read them: decoded from their token ids with the run's
tokenizer, the tokens its template adds left out ([CLS] ... [SEP], <s> ... </s>, <s> ...), a row cut at
data.max_length augmented as cut. GPT-2's and RoBERTa's byte-level BPE give the text back exactly; BERT's WordPiece
gives it as it reads it (lowercased, punctuation split off), Llama's as its pieces join. The set depends on the rows,
`distill.augment_seed` and the p_* settings only, never on train.seed: every seed of a run, a single run of each of
those seeds and a resume all see the same transfer set.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lora_kd_jax.core.config import Config
from lora_kd_jax.data import augment as augment_lib
from lora_kd_jax.data.encoding import EncodedSplit, encode
from lora_kd_jax.models.tokenizers import tokenizer_for
from lora_kd_jax.data.errors import DataError

log = logging.getLogger(__name__)

LOGITS_DIR = "teacher_logits"  # in the run dir, unless distill.logits_cache names another place


def wanted(cfg: Config) -> bool:
    """Whether the run distils on a transfer set larger than its training split."""
    return bool(cfg.distill.augment or cfg.distill.unlabeled)


def logits_cache_dir(cfg: Config) -> Path:
    """Where the transfer set's teacher logits are kept: distill.logits_cache, else RUN_DIR/teacher_logits."""
    d = cfg.distill.logits_cache
    return Path(d).expanduser() if d else Path(cfg.run.dir) / LOGITS_DIR


@dataclasses.dataclass(frozen=True, eq=False)
class TransferSet:
    split: EncodedSplit  # labels: gold on the training rows, 0 elsewhere until `teacher_labels`
    n_train: int  # the first n_train rows are the training split
    report: dict[str, Any]  # how it was made: written to the log and metrics.json


def template_sizes(tokenizer) -> tuple[int, int]:
    """(tokens the tokenizer adds before a single text, tokens it adds after): BERT's [CLS] / [SEP] (1, 1),
    RoBERTa's <s> / </s> (1, 1), Llama's <s> (1, 0), GPT-2's (0, 0); read off one encoded probe."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return start, len(full) - start - len(plain)
    raise DataError(f"{type(tokenizer).__name__}: {probe!r} encodes to {full} with its special tokens and to "
                    f"{plain} without; expected the second inside the first")


def decoded_texts(split: EncodedSplit, tokenizer) -> list[str]:
    """Each row's text as the model reads it: its real tokens less the template's (`template_sizes`), decoded,
    nothing cleaned up (a special token inside the text, such as [UNK], stays as its text)."""
    before, after = template_sizes(tokenizer)
    rows = [ids[mask == 1].tolist() for ids, mask in zip(split.input_ids, split.attention_mask)]
    return tokenizer.batch_decode([r[before:len(r) - after] for r in rows], clean_up_tokenization_spaces=False)


def build_transfer_set(cfg: Config, train: EncodedSplit) -> TransferSet:
    """The training split, its augmented copies and the unlabeled file's sentences, encoded as the run encodes."""
    d = cfg.distill
    t0 = time.perf_counter()
    tokenizer = tokenizer_for(cfg)  # GPT-2's, or the teacher family's (`teacher.in_teacher_vocabulary`)
    made: list[str] = []
    report: dict[str, Any] = {"train": len(train), "augment": d.augment}
    if d.augment:
        mask = augment_lib.mask_token(tokenizer)
        aug = augment_lib.augment(decoded_texts(train, tokenizer), d.augment, d.augment_seed, p_mask=d.p_mask,
                                  p_swap=d.p_swap, p_ngram=d.p_ngram, mask=mask)
        made = aug.sentences
        report.update({"augmented": len(made), "augmented_unchanged": aug.unchanged, "p_mask": d.p_mask,
                       "p_swap": d.p_swap, "p_ngram": d.p_ngram, "augment_seed": d.augment_seed,
                       "word_classes": aug.classes.n_classes, "mask_token": mask})
    unlabeled, blank = augment_lib.read_unlabeled(d.unlabeled) if d.unlabeled else ([], 0)
    if d.unlabeled:
        report.update({"unlabeled": len(unlabeled), "unlabeled_file": d.unlabeled, "unlabeled_blank_lines": blank})
    new = encode([*made, *unlabeled], np.zeros(len(made) + len(unlabeled), train.labels.dtype), tokenizer,
                 cfg.data.max_length)
    split = EncodedSplit(np.concatenate([train.input_ids, new.input_ids]),
                         np.concatenate([train.attention_mask, new.attention_mask]),
                         np.concatenate([train.labels, new.labels]), train.n_truncated + new.n_truncated,
                         _truncated_rows(train, new), pad_id=train.pad_id)
    report.update({"size": len(split), "truncated_added": new.n_truncated,
                   "build_seconds": round(time.perf_counter() - t0, 3)})
    log.info("transfer set: %d rows = %d training + %d augmented (%d copies each, %d came out unchanged) + %d "
             "unlabeled (%d blank lines skipped); %d added rows cut to %d tokens; made in %.1f s", len(split),
             len(train), len(made), d.augment, report.get("augmented_unchanged", 0), len(unlabeled), blank,
             new.n_truncated, cfg.data.max_length, report["build_seconds"])
    return TransferSet(split, len(train), report)


def _truncated_rows(train: EncodedSplit, new: EncodedSplit) -> np.ndarray | None:
    if train.truncated_rows is None or new.truncated_rows is None:
        return None
    return np.concatenate([train.truncated_rows, new.truncated_rows])


def teacher_labels(transfer: TransferSet, logits: Any) -> np.ndarray:
    """The transfer set's hard labels: gold on the training rows, the teacher's prediction on the others (its
    argmax; a regression teacher's output). `logits` may be the replicated device array: any one copy is read."""
    if isinstance(logits, jax.Array) and not logits.is_fully_addressable:  # several hosts: this host's copy
        logits = logits.addressable_data(0)
    logits = np.asarray(logits)
    labels = transfer.split.labels.copy()
    rest = logits[transfer.n_train:]
    labels[transfer.n_train:] = rest[:, 0] if logits.shape[-1] == 1 else np.argmax(rest, axis=-1)
    return labels
