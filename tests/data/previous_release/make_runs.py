"""Writes the run dirs of this folder with the code of the release before the own-modules move (commit 80ff2ea: the
models on transformers 4.57's Flax classes): a tiny GPT-2 LoRA run and a tiny BERT LoRA run (random init, 48 CoLA rows,
one epoch), kept with config.yaml, metrics.json and checkpoints/best only.

    git worktree add /tmp/prev 80ff2ea && python -m venv /tmp/v4 && /tmp/v4/bin/pip install -e '/tmp/prev[test]'
    /tmp/v4/bin/python tests/data/previous_release/make_runs.py /tmp/out   # from a checkout of 80ff2ea

then copy /tmp/out/{gpt2,bert,bert_tokenizer} here. tests/test_modules.py restores and evaluates them with today's code.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lora_kd_jax.core.config import load_config
from lora_kd_jax.training import finetune
out = Path(sys.argv[1])
common = ["model.name=custom", "model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
          "data.limit=48", "train.batch_size=16", "train.epochs=1", "run.compilation_cache="]
finetune.train_lora(load_config(None, [*common, f"run.dir={out / 'gpt2'}"]), progress=False)
from tiny_families import train_tokenizer
tok_dir = out / "bert_tokenizer"
tok_dir.mkdir(parents=True)
train_tokenizer("bert", tok_dir)
finetune.train_lora(load_config(None, [*common, "model.type=bert", "model.vocab_size=400", "model.n_positions=64",
                                       f"data.tokenizer={tok_dir}", "lora.init=standard", "lora.targets=query,value",
                                       "data.max_length=24", f"run.dir={out / 'bert'}"]), progress=False)
