"""The model families, as data: one `Family` record per architecture says everything in which they differ.

A family is its linen module (`models.modules`), the translation of its Hugging Face config.json into that module's
`Arch`, the head PyTorch's *ForSequenceClassification puts on it (`models.heads`), and names: where its base sits in
the parameter tree and in PyTorch's state dict, how its kernels are laid out, which modules LoRA adapts and which
train in full by default (PEFT's defaults), how position ids are counted, where its blocks and token table are.
Everything else (the classifier, loading, LoRA, PEFT interop, distillation, the bench) reads these records and never
branches on a family's name. Adding a family: one module, one record here, its parity test (docs: architecture).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_kd_jax.models import heads
from lora_kd_jax.models.modules import bert, gpt2, llama, modernbert, qwen3
from lora_kd_jax.models.modules.arch import Arch


def count_from_zero(ids: jax.Array, pad: int) -> jax.Array:
    """Positions 0..L-1 (right padding: the real tokens sit at 0..n-1, as PyTorch counts them)."""
    return jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)


def count_after_pad(ids: jax.Array, pad: int) -> jax.Array:
    """RoBERTa's positions: real tokens count from pad + 1, padding sits at pad (PyTorch's
    create_position_ids_from_input_ids)."""
    real = (ids != pad).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + pad


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One architecture family as transformers' AutoModelForSequenceClassification builds it. Each is one object
    (`FAMILIES`), compared by identity (it holds dicts: no value hash)."""

    name: str  # config.json's model_type, and model.type
    torch_class: str  # transformers' PyTorch sequence classifier
    module_class: type[nn.Module]  # the linen base (`models.modules`)
    arch: Callable[[dict], Arch]  # config.json (a dict) -> Arch
    config_kwargs: Callable[..., dict]  # model.* sizes -> the transformers config class's keyword arguments
    head: heads.Head
    prefix: str  # where the base sits in the parameter tree ({prefix: base, 'lora': ..., 'head': ...})
    torch_prefix: str  # the base's attribute in the *ForSequenceClassification (its state dict prefix)
    kernel_layout: str  # out_in (GPT-2's Conv1D, as its Flax classes stored it) | in_out (nn.Dense)
    default_targets: tuple[str, ...]  # what lora.targets adapts when left at its default (PEFT's defaults)
    trained_modules: tuple[str, ...] = ()  # base modules trained in full by default, beside the head
    blocks: tuple[str, ...] = ()  # where the base keeps its blocks, numbered '0'..'N-1'
    token_table: tuple[str, ...] = ()  # the token embedding table's path in the base
    positions: Callable[[jax.Array, int], jax.Array] = count_from_zero
    position_offset: Callable[[Arch], int] = lambda arch: 0  # positions of the table the offset spends
    module_kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. BERT's pooler
    named_sizes: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)  # model.name -> sizes
    hub_ids: dict[str, str] = dataclasses.field(default_factory=dict)  # model.name -> the hub repository of its weights
    tokenizer_needs: tuple[str, ...] = ()  # special tokens its tokenizer must have (the template's)
    tokenizer_class: str = "PreTrainedTokenizerFast"  # reads a dir of bare vocabulary files (no tokenizer.json)
    packaged_tokenizer: bool = False  # the package ships its tokenizer (data.tokenizer="" offline)
    unk_token: str = ""  # the unknown-word token of a tokenizer that names none (distillation's augmentation masks
    #                      with the mask token, else this one): Qwen's <|endoftext|>, its tokenizer class's default

    def module(self, arch: Arch, dtype: Any = jnp.float32) -> nn.Module:
        return self.module_class(arch, dtype, **self.module_kwargs)

    @property
    def fan_in_fan_out(self) -> bool:
        """PEFT's fan_in_fan_out for this family's linear layers: true for GPT-2's Conv1D."""
        return self.kernel_layout == "out_in"

    def usable_positions(self, arch: Arch) -> int:
        return arch.max_positions - self.position_offset(arch)


GPT2 = Family(
    name="gpt2", torch_class="GPT2ForSequenceClassification", module_class=gpt2.GPT2Model, arch=gpt2.arch,
    config_kwargs=gpt2.config_kwargs, head=heads.SCORE_AT_ROOT, prefix="gpt2", torch_prefix="transformer",
    kernel_layout="out_in", default_targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    trained_modules=("ln_1", "ln_2", "ln_f"), blocks=("h",), token_table=("wte", "embedding"),
    named_sizes={"gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20),
                 "gpt2-xl": (48, 1600, 25), "distilgpt2": (6, 768, 12)},
    hub_ids={"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
             "distilgpt2": "distilbert/distilgpt2"},
    tokenizer_class="GPT2TokenizerFast", packaged_tokenizer=True)
BERT = Family(
    name="bert", torch_class="BertForSequenceClassification", module_class=bert.BertModel, arch=bert.arch,
    config_kwargs=bert.config_kwargs, head=heads.POOLER_CLASSIFIER, prefix="bert", torch_prefix="bert",
    kernel_layout="in_out", default_targets=("query", "value"), blocks=("encoder", "layer"),
    token_table=("embeddings", "word_embeddings", "embedding"), module_kwargs={"pooler": True},
    tokenizer_needs=("cls_token", "sep_token", "pad_token"), tokenizer_class="BertTokenizerFast")
ROBERTA = dataclasses.replace(
    BERT, name="roberta", torch_class="RobertaForSequenceClassification", head=heads.CLS_DENSE_CLASSIFIER,
    prefix="roberta", torch_prefix="roberta", config_kwargs=functools.partial(
        bert.config_kwargs, pad=1, position_offset=2, type_vocab_size=1),
    positions=count_after_pad, position_offset=lambda arch: arch.pad_token_id + 1, module_kwargs={"pooler": False},
    tokenizer_needs=("bos_token", "eos_token", "pad_token"), tokenizer_class="RobertaTokenizerFast")
LLAMA = Family(
    name="llama", torch_class="LlamaForSequenceClassification", module_class=llama.LlamaModel, arch=llama.arch,
    config_kwargs=llama.config_kwargs, head=heads.SCORE, prefix="model", torch_prefix="model",
    kernel_layout="in_out", default_targets=("q_proj", "v_proj"), blocks=("layers",),
    token_table=("embed_tokens", "embedding"), tokenizer_needs=("bos_token",), tokenizer_class="LlamaTokenizerFast")

QWEN3 = dataclasses.replace(  # the Llama module with q/k norms (`modules.qwen3`); no template tokens, no bos
    LLAMA, name="qwen3", torch_class="Qwen3ForSequenceClassification", arch=qwen3.arch,
    config_kwargs=qwen3.config_kwargs, tokenizer_needs=(), tokenizer_class="Qwen2TokenizerFast",
    unk_token="<|endoftext|>")
MODERNBERT = Family(  # PEFT has no default targets for modernbert: Wqkv is BERT's query / value here (one fused layer);
    # its head (head.dense, head.norm, classifier) trains in full, so export-peft names `head` in modules_to_save too
    name="modernbert", torch_class="ModernBertForSequenceClassification", module_class=modernbert.ModernBertModel,
    arch=modernbert.arch, config_kwargs=modernbert.config_kwargs, head=heads.DENSE_NORM_CLASSIFIER, prefix="model",
    torch_prefix="model", kernel_layout="in_out", default_targets=("Wqkv",), trained_modules=("head",),
    blocks=("layers",), token_table=("embeddings", "tok_embeddings", "embedding"),
    tokenizer_needs=("cls_token", "sep_token", "pad_token"))

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, BERT, ROBERTA, LLAMA, QWEN3, MODERNBERT)}


def family(name: str) -> Family:
    """The record of model.type / config.json's model_type `name`; an unknown one is an error listing them."""
    if name not in FAMILIES:
        raise KeyError(f"{name!r} is not a family this library fine-tunes ({', '.join(FAMILIES)})")
    return FAMILIES[name]


def named_size(name: str) -> tuple[Family, tuple[int, int, int]] | None:
    """(family, (n_layer, n_embd, n_head)) of a model.name that names a released size (gpt2-medium, ...)."""
    for fam in FAMILIES.values():
        if name in fam.named_sizes:
            return fam, fam.named_sizes[name]
    return None


def resolved_size(m: Any) -> tuple[int, int, int]:
    """(n_layer, n_embd, n_head) of a model section: its model.* sizes, else its released size's (model.name)."""
    named = named_size(m.name)
    base = named[1] if named is not None else (0, 0, 1)
    return tuple(o if o is not None else b for o, b in zip((m.n_layer, m.n_embd, m.n_head), base))  # type: ignore
