"""The classification heads transformers' PyTorch classes put on a base, as data: where the head reads the sequence,
its layers (with their PyTorch names) and where dropout sits. Each family's record names one (`models.families`).

    last token -> score            GPT2ForSequenceClassification, Llama / Qwen3ForSequenceClassification (no bias)
    pooler -> dropout -> classifier                         BertForSequenceClassification
    first token -> dropout -> dense + tanh -> dropout -> out_proj    RobertaForSequenceClassification
    pooled -> head.dense + gelu -> head.norm -> dropout -> classifier      ModernBertForSequenceClassification
                                          (the base pools: [CLS] or the mean over real tokens, classifier_pooling)

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


ACTIVATIONS = {"tanh": jnp.tanh, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}  # torch's Tanh, GELU (erf)


@dataclasses.dataclass(frozen=True)
class HeadLayer:
    """One layer of a head: its path in the head tree (() = the head tree itself, GPT-2's {'kernel'}), its PyTorch
    module name, whether it maps to the hidden width (else to the labels), its bias and activation. A `norm` layer
    is a LayerNorm over the hidden width (`scale`, and `bias` when it has one; ModernBERT's head.norm)."""

    path: tuple[str, ...]
    torch: str
    to_hidden: bool = False
    bias: bool = True
    tanh: bool = False
    activation: str = ""  # "gelu" (ModernBERT's classifier_activation); `tanh` is the older spelling of "tanh"
    norm: bool = False  # a LayerNorm (eps `eps`), not a dense layer
    eps: float = 1e-5
    dropout: bool = True  # when the head has dropout, it sits before this layer (ModernBERT's: before `classifier`)


@dataclasses.dataclass(frozen=True)
class Head:
    pool: str  # last_token | first_token | pooler (the base's own pooled output: BERT's pooler, ModernBERT's pooling)
    layers: tuple[HeadLayer, ...]
    dropout: bool = False  # dropout before every layer (BERT, RoBERTa), at classifier_dropout or the hidden rate
    describe: str = ""

    def init(self, key: jax.Array, hidden: int, n_labels: int, std: float) -> Params:
        """transformers' init: normal(0, initializer_range) kernels, zero biases. A head held at the tree's root
        draws from `key` itself; named layers from split(key)[i] in order."""
        keys = [key] if self.layers[0].path == () else list(jax.random.split(key, max(2, len(self.layers))))
        out: dict = {}
        for layer, k in zip(self.layers, keys):
            width = hidden if layer.to_hidden or layer.norm else n_labels
            if layer.norm:
                leaves = {"scale": jnp.ones((width,))}
            else:
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
        n = max(2, len(self.layers))
        keys = jax.random.split(rng, n) if rng is not None else (None,) * n
        for i, layer in enumerate(self.layers):
            params = head if layer.path == () else head[layer.path[-1]]
            if self.dropout and layer.dropout:
                x = dropout(x, rate, keys[i])
            if layer.norm:
                centred = x - jnp.mean(x, axis=-1, keepdims=True)
                x = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + layer.eps)
                x = x * params["scale"].astype(jnp.float32)
            else:
                x = x @ params["kernel"].astype(jnp.float32)
            if layer.bias:
                x = x + params["bias"]
            if layer.tanh or layer.activation:
                x = ACTIVATIONS[layer.activation or "tanh"](x)
        return x


SCORE_AT_ROOT = Head("last_token", (HeadLayer((), "score", bias=False),), describe="last real token -> score")
SCORE = Head("last_token", (HeadLayer(("score",), "score", bias=False),), describe="last real token -> score (no bias)")
POOLER_CLASSIFIER = Head("pooler", (HeadLayer(("classifier",), "classifier"),), dropout=True,
                         describe="[CLS] (first token) -> pooler dense + tanh -> dropout -> classifier")
CLS_DENSE_CLASSIFIER = Head("first_token", (HeadLayer(("dense",), "classifier.dense", to_hidden=True, tanh=True),
                                            HeadLayer(("out_proj",), "classifier.out_proj")), dropout=True,
                            describe="<s> (first token) -> dropout -> dense + tanh -> dropout -> out_proj")
DENSE_NORM_CLASSIFIER = Head("pooler", (HeadLayer(("dense",), "head.dense", to_hidden=True, bias=False,
                                                 activation="gelu", dropout=False),
                                       HeadLayer(("norm",), "head.norm", bias=False, norm=True, dropout=False),
                                       HeadLayer(("classifier",), "classifier")), dropout=True,
                               describe="[CLS] or the mean of the real tokens (classifier_pooling) -> head.dense + "
                                        "gelu -> head.norm -> dropout -> classifier")
