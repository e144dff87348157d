"""The classification heads transformers' PyTorch classes put on a base, as data: where the head reads the sequence,
its layers (with their PyTorch names) and where dropout sits. Each family's record names one (`models.families`).

    last token -> score            GPT2ForSequenceClassification, LlamaForSequenceClassification (no bias, no dropout)
    pooler -> dropout -> classifier                         BertForSequenceClassification
    first token -> dropout -> dense + tanh -> dropout -> out_proj    RobertaForSequenceClassification

Heads compute in float32 whatever the base's compute dtype (they are trained, and tiny).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_kd_jax.models.interface import last_token_index

Params = dict[str, Any]


def pool_last_token(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


@dataclasses.dataclass(frozen=True)
class HeadLayer:
    """One dense layer of a head: its path in the head tree (() = the head tree itself, GPT-2's {'kernel'}), its
    PyTorch module name, whether it maps to the hidden width (else to the labels), its bias and activation."""

    path: tuple[str, ...]
    torch: str
    to_hidden: bool = False
    bias: bool = True
    tanh: bool = False


@dataclasses.dataclass(frozen=True)
class Head:
    pool: str  # last_token | first_token | pooler (the base's own pooler output)
    layers: tuple[HeadLayer, ...]
    dropout: bool = False  # dropout before every layer (BERT, RoBERTa), at classifier_dropout or the hidden rate
    describe: str = ""

    def init(self, key: jax.Array, hidden: int, n_labels: int, std: float) -> Params:
        """transformers' init: normal(0, initializer_range) kernels, zero biases. A head held at the tree's root
        draws from `key` itself; named layers from split(key)[i] in order."""
        keys = [key] if self.layers[0].path == () else list(jax.random.split(key))
        out: dict = {}
        for layer, k in zip(self.layers, keys):
            width = hidden if layer.to_hidden else n_labels
            leaves = {"kernel": std * jax.random.normal(k, (hidden, width), jnp.float32)}
            if layer.bias:
                leaves["bias"] = jnp.zeros((width,))
            if layer.path == ():
                return leaves
            out[layer.path[-1]] = leaves
        return out

    def apply(self, head: Params, hidden: jax.Array, pooled: jax.Array | None, attention_mask: jax.Array,
              rng: jax.Array | None, rate: float) -> jax.Array:
        """Logits [B, n_labels] from the base's hidden states [B, L, H] (and its pooler output, BERT's)."""
        if self.pool == "last_token":
            x = pool_last_token(hidden, attention_mask)
        elif self.pool == "first_token":
            x = hidden[:, 0]
        else:
            x = pooled
        x = x.astype(jnp.float32)
        keys = jax.random.split(rng) if rng is not None else (None, None)
        for i, layer in enumerate(self.layers):
            params = head if layer.path == () else head[layer.path[-1]]
            if self.dropout:
                x = dropout(x, rate, keys[i])
            x = x @ params["kernel"].astype(jnp.float32)
            if layer.bias:
                x = x + params["bias"]
            if layer.tanh:
                x = jnp.tanh(x)
        return x


SCORE_AT_ROOT = Head("last_token", (HeadLayer((), "score", bias=False),), describe="last real token -> score")
SCORE = Head("last_token", (HeadLayer(("score",), "score", bias=False),), describe="last real token -> score (no bias)")
POOLER_CLASSIFIER = Head("pooler", (HeadLayer(("classifier",), "classifier"),), dropout=True,
                         describe="[CLS] (first token) -> pooler dense + tanh -> dropout -> classifier")
CLS_DENSE_CLASSIFIER = Head("first_token", (HeadLayer(("dense",), "classifier.dense", to_hidden=True, tanh=True),
                                            HeadLayer(("out_proj",), "classifier.out_proj")), dropout=True,
                            describe="<s> (first token) -> dropout -> dense + tanh -> dropout -> out_proj")
