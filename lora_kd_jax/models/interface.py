"""The interfaces of the models: `ClassifierModel`, what every model that classifies has (a family's classifier with
LoRA, each student), and `FamilyModel`, what interop, distillation and the bench may ask of a family's classifier.

The trainers, the state recipe, the run reader and evaluation call only ClassifierModel:

    params = model.init(key)                                  # the full tree, drawn from one named key
    labels = model.param_labels(params)                       # a group name at every leaf: which leaves train, how
    logits = model.logits(params, input_ids, attention_mask,  # float32 [B, n_labels]
                          deterministic=True, rng=None)

A batch of BERT sentence pairs also carries 'token_type_ids' (segment 0 / 1); `token_inputs` passes them as the
keyword `token_type_ids=` when the batch has them, and nothing otherwise. Every model that can meet such a batch
takes the keyword: the encoder families read them, the students accept and ignore them (distilled on a BERT
teacher's pairs, the teacher reads them: `distill.teacher`, `distill.losses`); GPT-2's batches never hold them, so
its signature is the one above.

Labels name optimizer groups (`training.optimizer` gives each group its transform): FROZEN leaves never train,
every other label is a trained group. A model decides its own labels because only it knows its tree.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

Params = dict[str, Any]
Labels = dict[str, Any]  # the tree of `params` with a group name (str) at every leaf

FROZEN = "frozen"  # held once, never updated (optax.set_to_zero)
LORA, NORM, HEAD = "lora", "norm", "head"  # the LoRA classifier's trained groups: factors, LayerNorms, the head
LORA_B = "lora_b"  # LoRA+ only: B and the DoRA magnitudes, at their own learning rate
STUDENT = "student"  # every leaf of a student trains
GROUPS = (LORA, LORA_B, NORM, HEAD, STUDENT)  # the trained groups, in the order the optimizer lists them


@runtime_checkable
class ClassifierModel(Protocol):
    def init(self, key: jax.Array) -> Params: ...

    def param_labels(self, params: Params) -> Labels: ...

    def logits(self, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array: ...

    def describe(self) -> str: ...


@runtime_checkable
class FamilyModel(ClassifierModel, Protocol):
    """A family's classifier (`models.classifier.Classifier`): its family record and architecture, its LoRA spec and
    the factors a PiSSA/OLoRA run started from, the base it holds, what it trains in full, and the merge."""

    family: Any  # models.families.Family
    arch: Any  # models.modules.arch.Arch
    spec: Any  # lora.transform.LoraSpec | None
    start: Params | None
    base: Params | None
    n_labels: int
    to_save: tuple[str, ...]

    def merged(self, params: Params) -> Params: ...


def lr_scales(model: object) -> dict[str, float]:
    """A model's learning rate multipliers by group ({} = every group at the run's rate): optional, since only a
    model that knows its variants has them (the LoRA classifier's `lr_scales`, LoRA+)."""
    return dict(getattr(model, "lr_scales", None) or {})


def token_inputs(batch: dict) -> dict:
    """The model's keyword inputs of a batch beyond ids and mask: {'token_type_ids': ...} when the batch has them
    (BERT's pairs, `data.batch_iterator`), else {}."""
    return {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last real token of each right-padded row: mask.sum - 1 (as the original pools)."""
    return jnp.sum(attention_mask, axis=-1).astype(jnp.int32) - 1
