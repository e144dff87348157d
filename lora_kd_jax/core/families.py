"""The model families as plain data: names, where each keeps its weights, what LoRA adapts by default, its head.

Plain Python (no jax, no transformers), like `gpt2_layout`: `config` validates `model.type` and
`lora.modules_to_save` before jax is imported, while `models.families`, `models.encoder` and the interop modules
name the same modules. Module names are transformers' own, the same in its Flax and PyTorch classes, so PEFT's
`target_modules` and `modules_to_save` match them too.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family as `AutoModelForSequenceClassification` builds it."""

    name: str  # config.json's model_type, and model.type
    prefix: str  # the base model's attribute in the *ForSequenceClassification module (its state dict prefix)
    default_targets: tuple[str, ...]  # lora.targets when the config leaves them at the default (PEFT's defaults)
    head_modules: tuple[str, ...]  # the head's modules under their PyTorch names (always trained, always saved)
    pools: str  # how the head reads the sequence, for `describe` and the README
    torch_class: str  # transformers' PyTorch sequence classifier


GPT2 = "gpt2"
BERT = Family("bert", "bert", ("query", "value"), ("classifier",),
              "[CLS] (first token) -> pooler dense + tanh -> dropout -> classifier", "BertForSequenceClassification")
ROBERTA = Family("roberta", "roberta", ("query", "value"), ("classifier",),
                 "<s> (first token) -> dropout -> dense + tanh -> dropout -> out_proj",
                 "RobertaForSequenceClassification")
LLAMA = Family("llama", "model", ("q_proj", "v_proj"), ("score",), "last real token -> score (no bias)",
               "LlamaForSequenceClassification")
ENCODERS: dict[str, Family] = {f.name: f for f in (BERT, ROBERTA, LLAMA)}  # the families of `models.encoder`
TYPES: tuple[str, ...] = (GPT2, *ENCODERS)  # model.type's choices


def config_sizes(family: str, hf: dict) -> dict[str, int | None]:
    """model.n_layer/n_embd/n_head/n_positions/vocab_size from a checkpoint's config.json of a non-GPT-2 family.
    n_positions counts usable positions: RoBERTa spends pad_token_id + 1 of its position table on the offset."""
    if family == LLAMA.name:
        return {"n_layer": hf.get("num_hidden_layers"), "n_embd": hf.get("hidden_size"),
                "n_head": hf.get("num_attention_heads"), "n_positions": hf.get("max_position_embeddings"),
                "vocab_size": hf.get("vocab_size")}
    positions = hf.get("max_position_embeddings")
    if family == ROBERTA.name and isinstance(positions, int):
        positions -= int(hf.get("pad_token_id", 1)) + 1
    return {"n_layer": hf.get("num_hidden_layers"), "n_embd": hf.get("hidden_size"),
            "n_head": hf.get("num_attention_heads"), "n_positions": positions, "vocab_size": hf.get("vocab_size")}
