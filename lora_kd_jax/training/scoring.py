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
    `forward(device_batch) -> (logits, aux)`; padding rows are dropped.

    Every batch is dispatched before any logits are read back (one transfer at the end), so the device never waits
    on the host between batches: a teacher labelling a transfer set of many thousand rows runs back to back."""
    placed, aux = [], []
    for batch in data_lib.batch_iterator(split, batch_size, shuffle=False, lengths=lengths):
        logits, extra = forward(put_batch(batch))
        aux.append(extra)
        placed.append((logits, batch["index"], batch["weights"] > 0))
    fetched = jax.device_get([logits for logits, _, _ in placed])
    if not fetched:
        return np.zeros((len(split), 0), np.float32), aux
    out = np.zeros((len(split), np.shape(fetched[0])[-1]), np.float32)
    for logits, (_, index, real) in zip(fetched, placed):
        out[index[real]] = np.asarray(logits)[real]
    return out, aux
