"""Every row of an encoded split through a jitted forward, back in row order: the one loop behind the teacher's
cached logits and evaluation. Batches are the training's own (`data.batch_iterator`, file order, fixed shapes),
so each row sees the program that scored it in training."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from lora_kd_jax import data as data_lib


def score_rows(split: data_lib.EncodedSplit, batch_size: int, forward: Callable[[dict], tuple[jax.Array, Any]],
               put_batch: Callable[[dict], dict], *, lengths: Sequence[int] = ()
               ) -> tuple[np.ndarray, list[Any]]:
    """(float32 logits [N, n_labels] with row i = example i, the `aux` of every batch in order), where
    `forward(device_batch) -> (logits, aux)`; padding rows are dropped."""
    out: np.ndarray | None = None
    aux = []
    for batch in data_lib.batch_iterator(split, batch_size, shuffle=False, lengths=lengths):
        logits, extra = forward(put_batch(batch))
        aux.append(extra)
        logits = np.asarray(jax.device_get(logits))
        if out is None:
            out = np.zeros((len(split), logits.shape[-1]), np.float32)
        real = batch["weights"] > 0
        out[batch["index"][real]] = logits[real]
    return (np.zeros((len(split), 0), np.float32) if out is None else out), aux
