"""What a bench run is asked for (`BenchArgs`) and the sizes, modes and variants it may name: shared by the
step benches (`bench`) and the seeded ones (`bench_seeded`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from lora_kd_jax.core.config import Config, load_config
from lora_kd_jax.models.resolve import resolve

# tiny: a CPU smoke size for teacher and student alike (both keep the real 50,257-token vocabulary)
TINY = ["model.name=custom", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "student.embed_dim=64",
        "student.hidden_dim=64"]
VARIANTS = {"gpt2": ["model.name=gpt2"], "gpt2-medium": ["model.name=gpt2-medium"], "tiny": TINY}
BENCHES = ("lora_train_step", "teacher_forward", "distill_step", "distill_step_cached", "epoch")
# with seeds: the LoRA step, the cached-logits distillation step and the RNN baseline step, N seeds in one program
SEEDED_BENCHES = ("lora_train_step", "distill_step_cached", "student_step")
MODES = {"fp32": "float32", "bf16": "bfloat16"}  # the teacher's compute and frozen-base dtype
# --lora-variants: the LoRA train step of each, beside plain LoRA (standard init, same rank, dropout, batch)
LORA_VARIANTS = {
    "lora": ["lora.init=standard"],
    "rslora": ["lora.init=standard", "lora.scaling=rslora"],
    "dora": ["lora.init=standard", "lora.variant=dora"],
    "lora_plus": ["lora.init=standard", "lora.plus_ratio=16"],
    "pissa": ["lora.init=pissa"],
    "olora": ["lora.init=olora"],
    "dora_rslora_plus": ["lora.init=standard", "lora.variant=dora", "lora.scaling=rslora", "lora.plus_ratio=16"],
    "qlora_nf4": ["lora.init=standard", "lora.quantize=nf4"],  # QLoRA: the blocks' kernels quantized (docs/qlora.md)
    "qlora_nf4_dq": ["lora.init=standard", "lora.quantize=nf4", "lora.double_quant=true"],
    "qlora_int8": ["lora.init=standard", "lora.quantize=int8"],
}


# --family: the LoRA train step of a random-init BERT / RoBERTa / Llama / Qwen3 / ModernBERT sequence classifier instead
# of GPT-2's (benchmarks/peer_torch.py --family times the same through PEFT). Sizes: (n_layer, n_embd, n_head), the
# feed-forward as the family's config_kwargs (4 x n_embd; Qwen3 3 x, ModernBERT 1.5 x); "base" is bert-base's and
# roberta-base's shape (the others take the same shape: no released size has it).
FAMILY_SIZES = {"tiny": (2, 64, 4), "base": (12, 768, 12)}
FAMILY_VOCAB = {"bert": 30522, "roberta": 50265, "llama": 32000,  # bert-base-uncased's, roberta-base's, Llama 2's,
                "qwen3": 151936, "modernbert": 50368}  # Qwen3's, ModernBERT's
FAMILY_BENCHES = ("lora_train_step",)


def default_benches(variants: list[str]) -> list[str]:
    """Everything, except a full CoLA epoch of a real-size model on a CPU (minutes per epoch there)."""
    if jax.default_backend() == "cpu" and any(v != "tiny" for v in variants):
        return [b for b in BENCHES if b != "epoch"]
    return list(BENCHES)


@dataclasses.dataclass
class BenchArgs:
    variants: list[str]
    modes: list[str]
    benches: list[str]
    batch: int = 128
    seq: int = 64
    steps: int = 30
    warmup: int = 3
    peak_tflops: float = 0.0
    student_dtypes: list[str] = dataclasses.field(default_factory=lambda: ["auto"])  # measured side by side
    trim: bool = True  # length-aware: drop all-padding columns (exact for right padding + causal attention)
    data_dir: str = ""  # epoch bench: a CoLA dir in raw layout ('' skips the bench; the CLI passes the packaged one)
    limit: int = 0  # epoch bench: first N CoLA training sentences (data.limit); 0 = the full 8,551
    tokenizer: str = ""  # '' = the packaged GPT-2 tokenizer
    seeds: list[int] = dataclasses.field(default_factory=list)  # seed counts N: the seeded benches instead; [] = none
    lora_variants: list[str] = dataclasses.field(default_factory=list)  # LORA_VARIANTS to time instead; [] = none
    out: str | None = None
    profile: int = 0  # a jax.profiler trace of this many more steps of each step bench, after its timed steps
    profile_dir: str = "bench_profile"  # where: one subdir per bench, variant, mode (and seed count / dtype)
    student: list[str] = dataclasses.field(default_factory=list)  # student.* overrides, e.g. student.arch=cnn
    family: str | None = None  # a model.type: that family's LoRA step (FAMILY_SIZES variants) instead of the study's

    def profiling(self, *name: Any) -> tuple[int, str]:
        """(steps, directory) of this bench's trace; (0, '') when --profile is off."""
        if not self.profile:
            return 0, ""
        return self.profile, str(Path(self.profile_dir) / "_".join(map(str, name)))


def variant_config(variant: str, mode: str, *overrides: str) -> Config:
    dtype = MODES[mode]
    return resolve(load_config(None, [*VARIANTS[variant], "model.init=random", f"model.dtype={dtype}",
                                      f"model.base_dtype={dtype}", "lora.dropout=0.1", *overrides]))
