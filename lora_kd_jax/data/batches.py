"""The one batch builder: each epoch's row order, length grouping, fixed-shape batches, buckets, seed stacking.

Why one builder: training, evaluation, distillation and `evaluation` must see exactly the same examples in the
same order, with the same padding rows, so every batch in the toolkit comes from `batch_iterator`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from lora_kd_jax.core.config import Config
from lora_kd_jax.data.encoding import EncodedSplit
from lora_kd_jax.data.errors import DataError
from lora_kd_jax.data.encoding import PAD_ID

TOKEN_ARRAYS = {"input_ids": PAD_ID, "attention_mask": 0, "token_type_ids": 0}  # [B, L] arrays and their padding
# (input_ids: GPT-2's; a split pads with its tokenizer's own `EncodedSplit.pad_id`, passed on to `stack_batches`)


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
    rows; lets a step gather per-example arrays such as cached teacher logits on device), and 'token_type_ids'
    int32 [B,L] when the split has them (BERT's sentence pairs; `models.interface.token_inputs` passes them on).
    The last partial batch is kept and filled with padding rows: weights 0, input_ids the split's own pad id
    (`EncodedSplit.pad_id`: GPT-2's eos, BERT's [PAD], ...: an id every model of that vocabulary has a row for),
    attention_mask with a single 1 at position 0 (so "last real token" indexing stays in range), token types and
    label 0. Order: when shuffle, jax.random.permutation of N keyed by
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
        input_ids = np.full((batch_size, seq_len), split.pad_id, dtype=np.int32)
        attention_mask = np.zeros((batch_size, seq_len), dtype=np.int32)
        labels = np.zeros((batch_size,), dtype=split.labels.dtype)  # int32 ids, float32 regression targets
        weights = np.zeros((batch_size,), dtype=np.float32)
        index = np.zeros((batch_size,), dtype=np.int32)
        index[:k] = idx
        input_ids[:k] = split.input_ids[idx]
        attention_mask[:k] = split.attention_mask[idx]
        attention_mask[k:, 0] = 1
        labels[:k] = split.labels[idx]
        weights[:k] = 1.0
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weights": weights,
                 "index": index}
        if split.token_type_ids is not None:  # BERT's pairs: segment 0 / 1; padding rows and positions 0
            batch["token_type_ids"] = np.zeros((batch_size, seq_len), dtype=np.int32)
            batch["token_type_ids"][:k] = split.token_type_ids[idx]
        if lengths:
            keep = bucket_length(int(attention_mask.sum(axis=1).max()), lengths, seq_len)
            batch.update({name: batch[name][:, :keep] for name in TOKEN_ARRAYS if name in batch})
        yield batch


@dataclasses.dataclass(frozen=True)
class BatchSources:
    """What a training loop iterates: train(epoch, start_batch) and eval() each return a fresh batch iterator;
    `reported` holds further evaluation sets (CoLA's out-of-domain dev set, data.report's files) that are scored
    every epoch and reported beside validation, never used to choose the best epoch."""
    train: Callable[[int, int], Iterator[dict[str, np.ndarray]]]
    eval: Callable[[], Iterator[dict[str, np.ndarray]]]
    n_train_batches: int
    reported: dict[str, Callable[[], Iterator[dict[str, np.ndarray]]]] = dataclasses.field(default_factory=dict)


REPORTED_SPLITS = ("out_of_domain",)  # CoLA's: evaluated every epoch when the data has them; never pick the best epoch


def batch_sources(splits: dict[str, EncodedSplit], cfg: Config,
                  seed_labels: dict[int, np.ndarray] | None = None) -> BatchSources:
    """The train and evaluation batches a run's config asks for (batch sizes, seed, buckets, length grouping):
    the LoRA and the student trainers both take theirs from here. `seed_labels` gives each seed of train.seeds its
    own training labels (a transfer set labelled by each seed's teacher); the rows and their order are unchanged."""
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
        rows = dataclasses.replace(train, labels=seed_labels[seed]) if seed_labels else train
        return lambda epoch, start: batch_iterator(rows, bs, shuffle=True, seed=seed, epoch=epoch, start_batch=start,
                                                   lengths=buckets, group_window=cfg.data.group_window)

    if cfg.train.seeds:  # one batch per seed, stacked: seed k sees the batches of a single run with train.seed=k
        per_seed = [train_of(s) for s in cfg.train.seeds]

        def train_batches(epoch: int, start: int) -> Iterator[dict[str, np.ndarray]]:
            return (stack_batches(b, train.pad_id) for b in zip(*(source(epoch, start) for source in per_seed)))
    else:
        train_batches = train_of(cfg.train.seed)
    return BatchSources(
        train=train_batches,
        eval=eval_of(val),
        n_train_batches=num_batches(len(train), bs),
        reported={name: eval_of(split) for name, split in splits.items() if name not in ("train", "validation")})


def stack_batches(batches: Sequence[dict[str, np.ndarray]], pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
    """Batches of N seeds -> one batch with a leading seed axis [N, B, ...]. Token arrays cut to different bucket
    lengths are right-padded to the longest (input ids `pad_id`, the split's `EncodedSplit.pad_id`; mask 0): exact
    wherever bucketing is (the last real token is read, never a padded position)."""
    longest = max(b["input_ids"].shape[1] for b in batches)
    fills = {**TOKEN_ARRAYS, "input_ids": pad_id}

    def widen(x: np.ndarray, fill: int) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, longest - x.shape[1])), constant_values=fill) if x.shape[1] < longest else x

    return {k: np.stack([widen(b[k], fills[k]) if k in fills else b[k] for b in batches])
            for k in batches[0]}


def bucket_length(longest: int, lengths: Sequence[int], seq_len: int) -> int:
    """The shortest of `lengths` (capped at seq_len) that holds `longest` tokens; seq_len if none does."""
    for n in sorted(lengths):
        if longest <= n <= seq_len:
            return n
    return seq_len
