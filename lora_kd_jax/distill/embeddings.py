"""`student.embeddings=teacher`: the student's token embedding starts from its teacher's (GPT-2's wte, or the word
embedding table of a BERT / RoBERTa / Llama teacher).

A LoRA teacher never trains wte, so its table is the base model's. When the student is as wide as the teacher the
table is copied unchanged. When it is narrower, the table is projected onto its top `student.embed_dim` principal
axes (PCA: the table centred on its mean row, times the leading eigenvectors of its covariance; each axis's sign
fixed so its largest-magnitude entry is positive, so the result is one table, not one of 2^E). PCA keeps the most
variance of any linear map to that width, so the distances between tokens the teacher learned survive as well as
a linear projection allows; no rescaling. A student wider than its teacher is refused: there is nothing to project up.
"""
from __future__ import annotations

import logging

import jax
import numpy as np

from lora_kd_jax.core.config import Config, ConfigError

log = logging.getLogger(__name__)


def pca_projection(table: np.ndarray, width: int) -> tuple[np.ndarray, float]:
    """(the [V, width] PCA scores of `table` [V, D], the fraction of its variance they keep); width <= D."""
    table = np.asarray(table, np.float64)
    centred = table - table.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)  # ascending
    top = vectors[:, ::-1][:, :width]
    signs = np.sign(top[np.abs(top).argmax(axis=0), np.arange(width)])
    top = top * np.where(signs == 0, 1.0, signs)
    kept = float(values[::-1][:width].sum() / max(values.sum(), 1e-30))
    return (centred @ top).astype(np.float32), kept


def teacher_wte(teacher) -> np.ndarray:
    """The teacher's token embedding table [V, D] (float32 on the host); `teacher` is a restored Teacher or
    {seed: Teacher}, whose tables must then be one table (a pretrained or one random-init base: they are)."""
    teachers = list(teacher.values()) if isinstance(teacher, dict) else [teacher]
    tables = [np.asarray(jax.device_get(_token_table(t)), np.float32) for t in teachers]
    if any(not np.array_equal(tables[0], t) for t in tables[1:]):
        raise ConfigError("student.embeddings=teacher: the per-seed teachers have different token embeddings, so "
                          "there is no one table to start from; use student.embeddings=random or one teacher dir")
    return tables[0]


def _token_table(teacher) -> jax.Array:
    """GPT-2's wte, BERT / RoBERTa's embeddings.word_embeddings or Llama's embed_tokens (transformers' names)."""
    fam = teacher.model.family
    node = teacher.params[fam.prefix]
    for p in fam.token_table:
        node = node[p]
    return node


def student_embedding(cfg: Config, teacher) -> np.ndarray | None:
    """The table the student's 'embed' starts from: None for student.embeddings=random; else the teacher's wte,
    copied (same width) or PCA-projected to student.embed_dim (logged with the variance it keeps)."""
    sc = cfg.student
    if sc.embeddings == "random":
        return None
    table = teacher_wte(teacher)
    vocab, width = table.shape
    if vocab != sc.vocab_size:
        raise ConfigError(f"student.embeddings=teacher: the teacher's wte has {vocab} rows, student.vocab_size is "
                          f"{sc.vocab_size}; set student.vocab_size={vocab}")
    if sc.embed_dim > width:
        raise ConfigError(f"student.embeddings=teacher with student.embed_dim={sc.embed_dim}, wider than the "
                          f"teacher's {width}: a projection can only narrow; set student.embed_dim <= {width}")
    if sc.embed_dim == width:
        log.info("student.embeddings=teacher: the teacher's wte (%d x %d) copied", vocab, width)
        return table
    projected, kept = pca_projection(table, sc.embed_dim)
    log.info("student.embeddings=teacher: the teacher's wte (%d x %d) PCA-projected to %d dims, keeping %.1f%% of "
             "its variance", vocab, width, sc.embed_dim, 100 * kept)
    return projected
