"""Tiny BERT / RoBERTa / Llama / Qwen3 / ModernBERT checkpoints and tokenizers the family tests build themselves (no
hub).

A WordPiece tokenizer (BERT), a byte-level BPE one (RoBERTa; Qwen3's, without special tokens in its template;
ModernBERT's, [CLS] a [SEP]) or a SentencePiece-style BPE one (Llama) is trained with the `tokenizers` library on the
packaged CoLA training sentences, wrapped as transformers' fast tokenizer of the family and saved; a 2-layer, 64-wide
PyTorch *ForSequenceClassification with that vocabulary is saved beside it with save_pretrained.
"""
from __future__ import annotations

from pathlib import Path

from lora_kd_jax.assets import COLA_DIR
from lora_kd_jax.data.cola import read_cola_tsv

VOCAB = 400
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def cola_sentences() -> list[str]:
    return read_cola_tsv(COLA_DIR / "in_domain_train.tsv")[0]


def train_tokenizer(family: str, out_dir: Path):
    """The family's fast tokenizer, trained on CoLA and saved to out_dir (tokenizer.json + its config)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast, LlamaTokenizerFast, RobertaTokenizerFast

    if family == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(cola_sentences(), trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=special))
        # the trainer learns the same tokens every time but numbers them differently from run to run (the other
        # families' trainers do not): numbered in a fixed order, every session's BERT sees the same vocabulary
        learnt = sorted(t for t in tok.get_vocab() if t not in special)
        tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(special + learnt)}, unk_token="[UNK]")
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                           special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        tok.decoder = decoders.WordPiece()
        fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                 sep_token="[SEP]", mask_token="[MASK]")
    elif family == "llama":  # SentencePiece-style BPE: a metaspace (▁) marks word starts, <s> opens every text
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        special = ["<unk>", "<s>", "</s>", "<pad>"]
        tok.train_from_iterator(cola_sentences(), trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", add_bos_token=True, add_eos_token=False)
    elif family in ("qwen3", "modernbert"):  # byte-level BPE as theirs; Qwen's adds no token, ModernBERT's [CLS] [SEP]
        from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        qwen = family == "qwen3"
        special = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if qwen
                   else ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
        tok.train_from_iterator(cola_sentences(), trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.decoder = decoders.ByteLevel()
        if qwen:  # Qwen3's tokenizer_config.json: no bos, no unk, pads with <|endoftext|>
            fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, unk_token=None, eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>")
        else:
            cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
            tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                               special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
            fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                           sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok.train_from_iterator(cola_sentences(), trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                          ("<s>", tok.token_to_id("<s>")))
        tok.decoder = decoders.ByteLevel()
        fast = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                    cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    fast.save_pretrained(str(out_dir))
    return fast


def save_checkpoint(family: str, out_dir: Path, seed: int = 0):
    """A random 2-layer, 64-wide PyTorch *ForSequenceClassification with a trained tokenizer, saved to out_dir
    (config.json, model.safetensors, the tokenizer files). Returns (torch model, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tok = train_tokenizer(family, out_dir)
    if family == "llama":  # grouped-query attention (2 key/value heads for 4 query heads), as Llama 2/3 use
        sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    elif family == "qwen3":  # head_dim 32 != 64 / 4 heads, grouped-query attention, tied embeddings (as Qwen3-0.6B)
        sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=None,
                     eos_token_id=tok.eos_token_id)
    elif family == "modernbert":  # block 0 global, block 1 local over |q - k| <= 4: rows of 20 tokens outgrow it
        sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                     max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=2,
                     classifier_pooling="mean", cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    else:
        sizes = {**SIZES, "max_position_embeddings": 66 if family == "roberta" else 64,
                 **({"type_vocab_size": 1} if family == "roberta" else {})}
    config = AutoConfig.for_model(family, vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=2, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model, tok


def family_tokenizer(path, family: str):
    """The family's tokenizer in `path` as a run loads it (data.tokenizer=path): its template's tokens checked, right
    padding, a pad token."""
    from lora_kd_jax.data import load_tokenizer
    from lora_kd_jax.models.families import FAMILIES

    from lora_kd_jax.models.tokenizers import with_unk_token

    fam = FAMILIES[family]
    return with_unk_token(load_tokenizer(str(path), needs=fam.tokenizer_needs, tokenizer_class=fam.tokenizer_class),
                          fam)
