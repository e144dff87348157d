"""The configuration's schema: one dataclass per section, each key with its type, default, choices and doc.

Choices are `Literal` types on the fields, and each key's doc lives in its field (`metadata["doc"]`): the parser
checks values against the types, and the configuration reference (`lora-kd-jax config`, the docs page) is generated
from these classes, so a key is described in exactly one place. Range checks and the checks that relate keys live
in `validate`; files and `section.key=value` overrides in `parse`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

Dtype = Literal["auto", "float32", "bfloat16"]
ModelType = Literal["gpt2", "bert", "roberta", "llama", "qwen3", "modernbert"]  # models.families.FAMILIES (tested)
DEFAULT_LORA_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # left as is: the family's defaults


def key(default: Any, doc: str, **checks: Any) -> Any:
    """A config key: its default (a list is copied per instance), its doc, and range checks for `validate`
    (`positive`, `non_negative`, `probability`)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"doc": doc, **checks})
    return dataclasses.field(default=default, metadata={"doc": doc, **checks})


@dataclasses.dataclass
class ModelConfig:
    """The classifier's base: a GPT-2, BERT, RoBERTa, Llama, Qwen3 or ModernBERT checkpoint (a released size, a
    hub id, a local dir) or a random init of a given size."""

    name: str = key("gpt2", "A released size (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2), `custom` (sizes "
                    "from model.n_layer/n_embd/n_head), or a hub id ORG/NAME of any family, whose config.json decides "
                    "model.type.")
    init: Literal["pretrained", "random"] = key("pretrained", "pretrained: load the weights (model.path, the hub); "
                                                "random: draw them with the family's initialisers at the given size.")
    path: str = key("", "A local checkpoint dir written by save_pretrained; takes precedence over model.name.")
    type: ModelType = key(
        "gpt2", "The architecture family; a checkpoint (model.path, a hub id) decides it from its config.json.")
    n_layer: int | None = key(None, "Blocks; overrides the named size (a random init), or is read from the checkpoint.",
                              positive=True)
    n_embd: int | None = key(None, "Width; as model.n_layer.", positive=True)
    n_head: int | None = key(None, "Attention heads; as model.n_layer.", positive=True)
    vocab_size: int = key(50257, "Tokens of the vocabulary (a random init; a checkpoint's own otherwise).", positive=True)
    n_positions: int = key(1024, "Positions the model reads (a random init; a checkpoint's own otherwise).",
                           positive=True)
    dropout: float = key(0.0, "Dropout inside the base (every dropout of the family's blocks); 0 in the study's "
                         "seed-faithful configs.", probability=True)
    dtype: Dtype = key("auto", "Compute dtype; auto picks per backend (float32 on CPU, bfloat16 on GPU/TPU).")
    base_dtype: Dtype = key("auto", "Storage dtype of the frozen base weights; auto = the compute dtype.")
    base_seed: int = key(-1, "The seed whose key draws a random-init base; -1 = train.seed (train.seeds: the first).")
    num_labels: int = key(0, "Outputs of the head; 0 = from the data (CoLA: 2; a regression: 1).", non_negative=True)


@dataclasses.dataclass
class DataConfig:
    """What a run reads: CoLA (packaged, hub or a local dir), a GLUE task, or your own table files; the
    tokenizer and the length rows are cut to."""

    dir: str = key("", "Where CoLA is read: \"\" = the packaged CoLA v1.1, `hub` = nyu-mll/glue, or a local dir (raw "
                   "or GLUE layout; with data.task, that task's GLUE files).")
    tokenizer: str = key("", "\"\" = the model's own (the packaged GPT-2 files for GPT-2, model.path's otherwise), a hub "
                         "name, or a local dir.")
    max_length: int = key(20, "Tokens per row: longer rows are cut (counted in the log), shorter ones padded.",
                          positive=True)
    limit: int = key(0, "Keep the first N rows of each file (after every label was checked); 0 = all.",
                     non_negative=True)
    buckets: list[int] = key([], "Length-aware batching: the padded lengths a batch is cut to; [] = off.")
    group_window: int = key(0, "With buckets: sort rows by length within windows of N batches; 0 = off.",
                            non_negative=True)
    task: Literal["", "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"] = key(
        "", "A GLUE preset: its columns, label names, problem type and metric.")
    train: str = key("", "A table file (.tsv/.csv/.jsonl/.json/.parquet) to train on; \"\" = CoLA from data.dir.")
    validation: str = key("", "The table file whose train.select metric picks the best epoch (needed with data.train).")
    report: list[str] = key([], "Further table files scored every epoch and reported beside validation.")
    text: str = key("sentence", "The text column (tables).")
    text_pair: str = key("", "The second text's column of a sentence pair; \"\" = single sentences.")
    label: str = key("label", "The label column: integers, strings (ids in sorted order) or real numbers (regression).")
    labels: list[str] = key([], "Label names by id; [] = from the training file.")
    problem: Literal["auto", "classification", "regression"] = key(
        "auto", "auto: a label column of non-integer numbers is a regression.")


@dataclasses.dataclass
class LoraConfig:
    """The adapters: rank, scale, init (the study's seed init, PEFT's standard, PiSSA, OLoRA), rsLoRA, DoRA,
    LoRA+, the modules they adapt, and QLoRA's quantized base."""

    rank: int = key(4, "Rank r of every adapter.", positive=True)
    alpha: float = key(4.0, "Scale alpha / rank (rsLoRA: alpha / sqrt(rank)); the seed init has no scaling.",
                       positive=True)
    dropout: float = key(0.1, "Dropout on the adapter's input.", probability=True)
    init: Literal["seed", "standard", "pissa", "olora"] = key(
        "seed", "seed: U, V Xavier-uniform, no scaling (the study's); standard: A random, B zero (PEFT's); pissa / "
        "olora: factors of the frozen weight (SVD / QR), the residual kept as the base.")
    scaling: Literal["standard", "rslora"] = key("standard", "standard: alpha / rank; rslora: alpha / sqrt(rank).")
    variant: Literal["lora", "dora"] = key("lora", "dora: a trained magnitude per output feature times the "
                                           "normalised direction (PEFT's use_dora).")
    plus_ratio: float = key(1.0, "LoRA+: the learning rate of B (and every trained 1-D leaf) = plus_ratio x the rate.",
                            positive=True)
    targets: list[str] = key(DEFAULT_LORA_TARGETS, "Modules to adapt: names (a dotted suffix, globs), `re:REGEX`, or "
                             "`all-linear`; left as is, the family's own defaults (GPT-2: its four Conv1D; BERT, "
                             "RoBERTa: query, value; Llama, Qwen3: q_proj, v_proj; ModernBERT: Wqkv).")
    modules_to_save: list[str] = key([], "Base modules trained in full beside the head (PEFT's modules_to_save).")
    quantize: Literal["none", "nf4", "int8"] = key(
        "none", "QLoRA: store every frozen linear kernel of the blocks quantized, dequantized in each step in the "
        "compute dtype: nf4 (bitsandbytes' 4-bit NormalFloat, blocks of 64) or int8 (LLM.int8()'s row-wise weights).")
    double_quant: bool = key(False, "With lora.quantize=nf4: quantize the per-block absmax values too (bitsandbytes' "
                             "compress_statistics: 8-bit, blocks of 256).")


@dataclasses.dataclass
class TrainConfig:
    """The optimisation: batch, learning rate and its schedule, epochs, seeds (one or many at once) and the
    metric that picks the best epoch."""

    batch_size: int = key(128, "Rows per optimizer step (of every seed).", positive=True)
    eval_batch_size: int = key(0, "Rows per evaluation batch; 0 = train.batch_size.", non_negative=True)
    select: Literal["", "accuracy", "mcc", "f1", "macro_f1", "pearson", "spearman"] = key(
        "", "The validation metric that picks the best epoch; \"\" = accuracy (a regression: pearson).")
    lr: float = key(1e-3, "Adam's learning rate.", positive=True)
    epochs: int = key(10, "Passes over the training set.", positive=True)
    seed: int = key(0, "The run's seed: adapters, head, dropout, data order (and a random base).")
    seeds: list[int] = key([], "N seeds trained at once in one program, each an ordinary run in RUN/seed_<k>; "
                           "[] = train.seed alone.")
    on_nonfinite: Literal["stop", "skip"] = key("stop", "A NaN/Inf loss: stop (naming step and epoch), or skip that "
                                                "batch's update.")
    schedule: Literal["constant", "linear", "cosine"] = key("constant", "The learning rate over the run (linear and "
                                                            "cosine decay to 0).")
    warmup: float = key(0.0, "Linear warm-up from 0: steps (>= 1), or a fraction of all steps (< 1).",
                        non_negative=True)
    weight_decay: float = key(0.0, "Decoupled weight decay (AdamW); never on norms, biases or DoRA magnitudes.",
                              non_negative=True)
    max_grad_norm: float = key(0.0, "Clip the global norm of the trainable gradients to this; 0 = no clipping.",
                               non_negative=True)
    accumulate: int = key(1, "Split each batch into K micro-batches for one optimizer step (less memory).",
                          positive=True)
    patience: int = key(0, "Stop after P epochs without a better validation score; 0 = off.", non_negative=True)
    max_steps: int = key(0, "Stop after N optimizer steps (the schedule then spans N); 0 = off.", non_negative=True)

    @property
    def eval_batch(self) -> int:
        """The evaluation batch size: train.eval_batch_size, or train.batch_size when that is 0."""
        return self.eval_batch_size or self.batch_size


@dataclasses.dataclass
class StudentConfig:
    """The distilled (or from-scratch) student: the study's RNN, a BiLSTM, a CNN or a smaller transformer of the
    teacher's family."""

    vocab_size: int = key(50257, "The student's vocabulary (a teacher of another family sets its own).", positive=True)
    embed_dim: int = key(768, "Token embedding width.", positive=True)
    hidden_dim: int = key(768, "Recurrent width (rnn, bilstm).", positive=True)
    cell: Literal["rnn", "gru", "lstm"] = key("rnn", "rnn: the recurrent cell (tanh RNN, as the study's).")
    bidirectional: bool = key(False, "rnn: a backward pass too.")
    pooling: Literal["last_token", "last_step"] = key("last_token", "rnn: the output read: at the last real token, or "
                                                      "the study's last (padded) position.")
    dtype: Dtype = key("auto", "Compute dtype; auto = float32 on every measured backend.")
    arch: Literal["rnn", "bilstm", "cnn", "transformer"] = key(
        "rnn", "rnn: the study's; bilstm: Tang et al. 2019; cnn: Kim 2014; transformer: the teacher's architecture, "
        "fewer layers, DistilBERT-style start.")
    relu_dim: int = key(0, "bilstm: the ReLU layer before the output; 0 = student.hidden_dim.", non_negative=True)
    cnn_widths: list[int] = key([3, 4, 5], "cnn: the n-gram widths of the filters.")
    cnn_filters: int = key(100, "cnn: filters per width.", positive=True)
    dropout: float = key(0.0, "bilstm, cnn, transformer: dropout (Kim's CNN: 0.5).", probability=True)
    embeddings: Literal["random", "teacher"] = key("random", "teacher: start from distill.teacher's token table "
                                                   "(PCA-projected when narrower).")
    layers: int = key(0, "transformer: blocks; 0 = half the teacher's, rounded up (no teacher: 2).", non_negative=True)
    teacher_layers: list[int] = key([], "transformer: the teacher's blocks it starts from, in order; [] = every other "
                                    "one from 0 (DistilBERT).")
    heads: int = key(0, "transformer without a teacher: attention heads; 0 = embed_dim // 64.", non_negative=True)


STUDENT_KEYS: dict[str, tuple[str, ...]] = {  # student.* keys that one student.arch alone reads
    "rnn": ("cell", "bidirectional", "pooling"),
    "transformer": ("layers", "teacher_layers", "heads"),
}


@dataclasses.dataclass
class DistillConfig:
    """Distillation from a finished LoRA run: the loss and its temperature, and the transfer set (augmented
    copies, unlabeled text)."""

    teacher: str = key("", "A LoRA run dir (or its checkpoints/ dir): the teacher.")
    temperature: float = key(2.0, "T of the T²-scaled KL loss.", positive=True)
    alpha: float = key(0.0, "Weight of the hard-label cross-entropy; 0 = KL only (the study's).", non_negative=True)
    cache_teacher_logits: bool = key(True, "Compute the teacher's logits once per dataset instead of every step.")
    loss: Literal["kl", "mse"] = key("kl", "kl: T²·KL (the study's); mse: squared distance of the logits (Tang et al.).")
    augment: int = key(0, "Transfer set: N augmented copies of each training sentence (Tang et al.); 0 = none.",
                       non_negative=True)
    p_mask: float = key(0.1, "Augmentation: a word becomes the mask token.", probability=True)
    p_swap: float = key(0.1, "Augmentation: a word is swapped for one of its class.", probability=True)
    p_ngram: float = key(0.25, "Augmentation: the copy is cut to a random n-gram (n in 1..5).", probability=True)
    augment_seed: int = key(0, "The augmentation's seed (one transfer set for every train.seed).", non_negative=True)
    unlabeled: str = key("", "A text file, one sentence per line, added to the transfer set.")
    logits_cache: str = key("", "Where the transfer set's teacher logits are kept; \"\" = RUN_DIR/teacher_logits.")


@dataclasses.dataclass
class MeshConfig:
    """How the devices of a multi-device run are split between data parallelism and sharding the frozen base."""

    data: int = key(-1, "Data-parallel devices; -1 = every device left after mesh.fsdp.")
    fsdp: int = key(1, "Devices that shard the frozen base weights (FSDP-style); batches split over both axes.",
                    positive=True)


@dataclasses.dataclass
class DistributedConfig:
    """Multi-host runs (jax.distributed)."""

    enabled: bool = key(False, "Call jax.distributed.initialize (multi-host); SLURM/TPU settings are detected.")
    coordinator_address: str = key("", "host:port of process 0; \"\" = detected.")
    num_processes: int = key(0, "0 = detected.")
    process_id: int = key(-1, "-1 = detected.")
    cpu_collectives: Literal["gloo", "mpi", "none"] = key("gloo", "CPU-only runs: the collectives implementation.")


@dataclasses.dataclass
class RunConfig:
    """Where and how a run writes: its directory, the compilation cache, Weights & Biases."""

    dir: str = key("runs/default", "The run directory: config, metrics, plots, checkpoints, log.")
    overwrite: bool = key(False, "Allow writing into a run dir that holds a different run.")
    compilation_cache: str = key("~/.cache/lora_kd_jax/xla", "XLA's persistent compilation cache; \"\" = off.")
    plots: bool = key(True, "Draw accuracy.png, loss.png and optimizer.png in the run dir (at most every 30 s, and "
                            "at the end); false: metrics.json and TensorBoard only (many short runs).")
    wandb: str = key("", "A Weights & Biases project to log to (needs `pip install wandb`); \"\" = off.")


@dataclasses.dataclass
class Config:
    """A whole run's settings, one section each; `lora-kd-jax config` lists every key."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
