#!/usr/bin/env python
"""The PyTorch + PEFT peer of scripts/bench.py: the same three steps, the way most people would write them in torch.

Why it lives here: the JAX figures in the README only mean something next to a competitor run on the same machine in
the same session, so the competitor ships with the repository instead of being fetched from somewhere else. It is a
benchmark, not part of the package: nothing in `lora_kd_jax` imports it, and it needs torch, transformers and peft,
which the toolkit itself does not.

What it times, per variant and mode (one JSON line each, printed and appended to --out):
  lora_train_step  HF GPT2ForSequenceClassification + PEFT LoRA r=4 (alpha 4, dropout 0.1) on c_attn, c_proj and
                   c_fc, with the layer norms and the score head trainable too (the seed's trainable set); Adam lr
                   1e-3, cross-entropy; fields also give the first step (s) and the parameter counts.
  teacher_forward  the same model in eval mode, no grad.
  distill_step     that teacher's forward (no grad) inside the step, then the seed's student (Embedding 50257x768,
                   one-layer tanh RNN 768, Linear 2 on the last position) forward/backward, KL at T=2, Adam lr 1e-3.
With --family bert|roberta|llama|qwen3|modernbert, lora_train_step alone, of that family instead:
                   AutoModelForSequenceClassification (random init, FAMILY_SIZES: --variants tiny,base, no dropout in
                   the base) + PEFT LoRA (task SEQ_CLS, r=4, alpha 4, dropout 0.1, PEFT's default targets query/value
                   or q_proj/v_proj, ModernBERT's Wqkv, the head trained), as `lora-kd-jax bench --family` builds
                   it; ids drawn below the family's vocabulary, padded with its pad id.
Modes: fp32, bf16 (autocast), compile-fp32, compile-bf16 (torch.compile of teacher and student). Weights are random:
step time does not depend on their values. The batch is scripts/bench.py's `peer_batch`: torch.Generator seeded 0
draws ids in [0, 50256), lengths in [5, seq/2 + 8) capped at seq, then labels; rows are right-padded with 50256.
Timing: `WARMUP` untimed calls, then the mean of --steps calls between two device synchronisations.

usage: benchmarks/peer_torch.py [--tiny] [--variants gpt2,gpt2-medium] [--modes fp32,bf16,compile-bf16]
                                [--batch 128] [--seq 64] [--steps 30] [--out results.jsonl] [--lora-variant dora]
                                [--family bert|roberta|llama|qwen3|modernbert]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Iterable

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2ForSequenceClassification

VOCAB = 50257
PAD_ID = 50256  # GPT-2's eos, used as pad (as in lora_kd_jax.data)
SIZES = {"gpt2": {"n_embd": 768, "n_layer": 12, "n_head": 12},
         "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
         "tiny": {"n_embd": 64, "n_layer": 2, "n_head": 4}}
MODES = ("fp32", "bf16", "compile-fp32", "compile-bf16")
# --family: lora_kd_jax.commands.bench's FAMILY_SIZES (n_layer, n_embd, n_head; feed-forward 4 x n_embd), vocabularies
# and pad ids (bert-base-uncased's, roberta-base's, Llama 2's vocabulary)
FAMILY_SIZES = {"tiny": (2, 64, 4), "base": (12, 768, 12)}
FAMILY_VOCAB = {"bert": 30522, "roberta": 50265, "llama": 32000, "qwen3": 151936, "modernbert": 50368}
FAMILY_PAD = {"bert": 0, "roberta": 1, "llama": 0, "qwen3": 0, "modernbert": 0}
FAMILY_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "llama": ["q_proj", "v_proj"],
                  "qwen3": ["q_proj", "v_proj"], "modernbert": ["Wqkv"]}  # PEFT has no modernbert default: ours
FAMILY_FFN = {"qwen3": 3.0, "modernbert": 1.5}  # feed-forward x n_embd as lora_kd_jax's config_kwargs (else 4)
STUDENT_WIDTH = 768  # the seed's student, for every variant
TEMPERATURE = 2.0
WARMUP = 5
IMPL = "torch+peft"

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PyTorch + PEFT peer benchmark (JSON lines on stdout, appended to --out)")
    p.add_argument("--tiny", action="store_true", help="the 2-layer, 64-wide smoke size only (overrides --variants)")
    p.add_argument("--variants", default="gpt2,gpt2-medium", help="comma list of " + ", ".join(SIZES))
    p.add_argument("--modes", default="fp32,bf16,compile-bf16", help="comma list of " + ", ".join(MODES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed calls after warm-up (mean reported)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--lora-variant", default="lora", choices=("lora", "dora"), help="PEFT's LoRA or DoRA (use_dora)")
    p.add_argument("--family", default="gpt2", choices=("gpt2", *FAMILY_VOCAB),
                   help="bert, roberta, llama, qwen3, modernbert: the LoRA train step of that family's classifier "
                   "(--variants tiny, base)")
    a = p.parse_args(argv)
    if a.family != "gpt2" and a.variants == p.get_default("variants"):
        a.variants = "base"
    a.variants = ["tiny"] if a.tiny else [v for v in a.variants.split(",") if v]
    a.modes = [m for m in a.modes.split(",") if m]
    sizes = SIZES if a.family == "gpt2" else FAMILY_SIZES
    for flag, values, known in (("--variants", a.variants, sizes), ("--modes", a.modes, MODES)):
        for v in values:
            if v not in known:
                p.error(f"{flag}: unknown value '{v}'; choose from {', '.join(known)}")
    if a.steps < 1 or a.batch < 1 or a.seq < 1:
        p.error("expected --steps, --batch and --seq >= 1")
    return a


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peer_batch(batch: int, seq: int, device: torch.device, vocab: int = VOCAB, pad_id: int = PAD_ID) -> Batch:
    """Right-padded random rows; the draw order (ids, lengths, labels) is the contract with lora_kd_jax.commands.bench
    (a family's ids drawn below its vocabulary, padded with its pad id)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (batch, seq), generator=g)
    lengths = torch.randint(5, seq // 2 + 8, (batch,), generator=g).clamp(max=seq)
    labels = torch.randint(0, 2, (batch,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad_id)
    return ids.to(device), mask.to(device), labels.to(device)


def lora_classifier(variant: str, device: torch.device, use_dora: bool = False) -> torch.nn.Module:
    """GPT-2 classifier (random init) with PEFT LoRA; LayerNorms trainable as well as the adapters and the head."""
    base = GPT2ForSequenceClassification(GPT2Config(**SIZES[variant], num_labels=2, pad_token_id=PAD_ID))
    lora = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.1, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, modules_to_save=["score"], use_dora=use_dora)  # GPT-2's Conv1D stores weights [in, out]
    model = get_peft_model(base, lora)
    for name, param in model.named_parameters():
        if ".ln_" in name or "ln_f" in name:
            param.requires_grad = True
    return model.to(device)


def family_classifier(family: str, variant: str, device: torch.device, use_dora: bool = False) -> torch.nn.Module:
    """A BERT / RoBERTa / Llama / Qwen3 / ModernBERT sequence classifier (random init, no dropout in the base) with
    PEFT LoRA at PEFT's default targets; PEFT's SEQ_CLS trains the head (classifier / score) too, and ModernBERT's
    head.dense / head.norm as lora_kd_jax trains them (modules_to_save=["head"])."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    n_layer, n_embd, n_head = FAMILY_SIZES[variant]
    sizes = dict(vocab_size=FAMILY_VOCAB[family], hidden_size=n_embd, num_hidden_layers=n_layer,
                 num_attention_heads=n_head, intermediate_size=int(FAMILY_FFN.get(family, 4) * n_embd),
                 pad_token_id=FAMILY_PAD[family], num_labels=2)
    if family in ("llama", "qwen3"):
        sizes.update(num_key_value_heads=n_head, max_position_embeddings=512, tie_word_embeddings=False,
                     **({"head_dim": n_embd // n_head} if family == "qwen3" else {}))
    elif family == "modernbert":
        sizes.update(max_position_embeddings=512)
    else:  # RoBERTa's position table holds pad_id + 1 more rows (its positions start after the pad id)
        sizes.update(max_position_embeddings=514 if family == "roberta" else 512, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, type_vocab_size=1 if family == "roberta" else 2)
    base = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(family, **sizes))
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=4, lora_dropout=0.1, target_modules=FAMILY_TARGETS[family],
                      use_dora=use_dora, modules_to_save=["head"] if family == "modernbert" else None)
    return get_peft_model(base, lora).to(device)


class Student(torch.nn.Module):
    """The seed's student: Embedding -> one-layer tanh RNN -> Linear(2) on the last (padded) position."""

    def __init__(self, width: int = STUDENT_WIDTH) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, width)
        self.rnn = torch.nn.RNN(width, width, num_layers=1, batch_first=True)
        self.fc = torch.nn.Linear(width, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.emb(ids))
        return self.fc(hidden[:, -1])


def mean_seconds(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    """Seconds per call: `WARMUP` untimed calls, then `steps` calls between two synchronisations."""
    for _ in range(WARMUP):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def timing_fields(seconds: float, batch: int) -> dict:
    return {"ms_per_step": round(seconds * 1e3, 3), "seq_per_s": round(batch / seconds, 1)}


def bench_mode(variant: str, mode: str, data: Batch, steps: int, device: torch.device, use_dora: bool = False,
               family: str = "gpt2") -> Iterable[dict]:
    """The three steps in one mode (a --family: its LoRA step alone); yields records without the common fields (run()
    adds those)."""
    ids, mask, labels = data
    compiled, amp = mode.startswith("compile"), mode.endswith("bf16")

    def autocast() -> torch.autocast:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)

    torch.manual_seed(0)
    if family != "gpt2":
        model = family_classifier(family, variant, device, use_dora)
    else:
        model = lora_classifier(variant, device, use_dora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-3)
    forward = torch.compile(model) if compiled else model

    def train_step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = forward(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    train_step()
    sync(device)
    first = time.perf_counter() - t0
    yield {"bench": "lora_train_step", "real_tokens": int(mask.sum()), **timing_fields(mean_seconds(
        train_step, steps, device), len(ids)), "first_step_s": round(first, 2),
        "trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in model.parameters())}
    if family != "gpt2":  # the teacher and distillation steps are GPT-2's
        return

    model.eval()  # from here on the model is the (frozen) teacher

    def teacher_logits() -> torch.Tensor:
        with torch.no_grad(), autocast():
            return forward(input_ids=ids, attention_mask=mask).logits

    yield {"bench": "teacher_forward", **timing_fields(mean_seconds(teacher_logits, steps, device), len(ids))}

    student = Student().to(device)
    student_opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    student_forward = torch.compile(student) if compiled else student

    def distill_step() -> torch.Tensor:
        student_opt.zero_grad(set_to_none=True)
        target = teacher_logits().float()
        with autocast():
            logits = student_forward(ids).float()
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits / TEMPERATURE, -1),
                                          torch.softmax(target / TEMPERATURE, -1),
                                          reduction="batchmean") * TEMPERATURE ** 2
        loss.backward()
        student_opt.step()
        return loss

    yield {"bench": "distill_step", **timing_fields(mean_seconds(distill_step, steps, device), len(ids))}


def emit(rec: dict, out: str | None) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def run(args: argparse.Namespace) -> list[dict]:
    device = pick_device()
    if device.type == "cuda":  # TF32 matmuls, torch's usual fast fp32 on GPUs (on a CPU it could mean bf16 passes)
        torch.set_float32_matmul_precision("high")
    records = []
    family = getattr(args, "family", "gpt2")
    for variant in args.variants:
        data = (peer_batch(args.batch, args.seq, device) if family == "gpt2" else
                peer_batch(args.batch, args.seq, device, FAMILY_VOCAB[family], FAMILY_PAD[family]))
        for mode in args.modes:
            for rec in bench_mode(variant, mode, data, args.steps, device, args.lora_variant == "dora", family):
                rec = {"bench": rec.pop("bench"), "impl": IMPL, "variant": variant, "mode": mode,
                       **({"family": family} if family != "gpt2" else {}), "lora_variant": args.lora_variant,
                       "batch": args.batch, "seq": args.seq, **rec, "device": device_name(device)}
                emit(rec, args.out)
                records.append(rec)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # this mode's models are gone; free their blocks before the next
    return records


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
