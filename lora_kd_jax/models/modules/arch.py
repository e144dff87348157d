"""One architecture description for every family's linen module: the sizes and switches a module reads.

Why one type: a family is a translation of its Hugging Face `config.json` into this record (`models.families`), and
the modules read only this record, never transformers' config classes (whose fields move between versions: v5 keeps
Llama's rope base in `rope_parameters`). Frozen and hashable, so a module holding it is a static part of a jitted
function.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary position embedding: base `theta`, and the scaling Llama 3.x checkpoints carry (`kind` "llama3":
    transformers' `_compute_llama3_parameters`; "linear": positions divided by `factor`; "default": none)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclasses.dataclass(frozen=True)
class Arch:
    """What a transformer module of this library is built from. Widths are explicit: `head_dim` 0 means
    hidden_size // num_heads, `num_kv_heads` 0 means num_heads (no grouped-query attention)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    num_kv_heads: int = 0
    head_dim: int = 0
    activation: str = "gelu_new"
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    hidden_dropout: float = 0.0  # GPT-2's resid_pdrop, BERT's hidden_dropout_prob
    embedding_dropout: float = 0.0  # GPT-2's embd_pdrop (BERT's embeddings use hidden_dropout)
    attention_dropout: float = 0.0
    classifier_dropout: float | None = None  # BERT / RoBERTa heads; None = hidden_dropout
    type_vocab_size: int = 0  # BERT's token types (0 = none)
    pad_token_id: int = 0
    rope: Rope | None = None  # rotary positions (Llama); None = learned absolute positions
    attention_bias: bool = False  # Llama's q/k/v/o biases
    mlp_bias: bool = False  # Llama's gate/up/down biases
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's queries and keys (q_norm, k_norm) before the rotation
    layer_types: tuple[str, ...] = ()  # per block, "full_attention" or "sliding_attention" (ModernBERT); () = all full
    sliding_window: int = 0  # a sliding block's reach: a query reads the keys with |query - key| <= sliding_window
    local_rope: Rope | None = None  # the rotary base of the sliding blocks (ModernBERT's local_rope_theta)
    pooling: str = ""  # the base's pooled output: "cls" (first token) or "mean" (of the real tokens): ModernBERT's

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def with_layers(self, n: int) -> Arch:
        return dataclasses.replace(self, num_layers=n)
