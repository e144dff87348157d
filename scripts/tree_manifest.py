"""The parameter trees of transformers 4.57's Flax classes, written once as a manifest the tests hold our modules to.

transformers 5 removed its Flax classes; this library's own linen modules (`lora_kd_jax.models.modules`) keep their
trees (module paths, leaf names, shapes, dtypes), so that LoRA targets, PEFT name maps, existing Orbax run dirs and
`flax_model.msgpack` checkpoints keep working. This script ran under transformers 4.57 to write
`tests/data/transformers_4_57_trees.json`; `tests/test_modules.py` checks that our modules build exactly these trees.

To run it again (needs the 4.x line, which still has the Flax classes):

    python -m venv /tmp/tf457 && /tmp/tf457/bin/pip install "transformers==4.57.6" "flax>=0.12,<0.13" "jax<0.12"
    /tmp/tf457/bin/python scripts/tree_manifest.py tests/data/transformers_4_57_trees.json

`--compare` also checks, on the same random parameters, that our modules compute what the 4.57 Flax classes
computed (float32, bfloat16, and with dropout on the same random stream); it needs this package importable.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from flax import traverse_util

# the tests' tiny sizes (tests/tiny.py, tests/tiny_families.py)
SIZES = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=50257),
    "bert": dict(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 max_position_embeddings=64),
    "roberta": dict(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1),
    "llama": dict(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False),
}


def flax_module(family: str, dropout: float = 0.0, dtype=jnp.float32):
    """transformers 4.57's linen module of `family` at the tiny size (BERT with its pooler, RoBERTa without, as
    the classifiers use them)."""
    import transformers as tf
    from transformers.models.bert.modeling_flax_bert import FlaxBertModule
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2Module
    from transformers.models.llama.modeling_flax_llama import FlaxLlamaModule
    from transformers.models.roberta.modeling_flax_roberta import FlaxRobertaModule

    if family == "gpt2":
        return FlaxGPT2Module(tf.GPT2Config(**SIZES[family], resid_pdrop=dropout, embd_pdrop=dropout,
                                            attn_pdrop=dropout), dtype=dtype)
    if family == "llama":
        return FlaxLlamaModule(tf.LlamaConfig(**SIZES[family], attention_dropout=dropout), dtype=dtype)
    config = (tf.BertConfig if family == "bert" else tf.RobertaConfig)(
        **SIZES[family], hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    module = FlaxBertModule if family == "bert" else FlaxRobertaModule
    return module(config, dtype=dtype, add_pooling_layer=family == "bert")


def inputs(family: str, batch: int = 3, length: int = 8):
    ids = jax.random.randint(jax.random.key(1), (batch, length), 3, 390)
    mask = (jnp.arange(length)[None] < jnp.array([length, 5, 2])[:, None]).astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length), ids.shape) + (2 if family == "roberta" else 0)
    if family in ("gpt2", "llama"):
        return ids, mask, pos
    return ids, mask, jnp.zeros_like(ids), pos


def manifest() -> dict:
    """{family: {"config": its config.json, "tree": {path: [shape, dtype]}}}."""
    out = {}
    for family in SIZES:
        module = flax_module(family)
        shapes = jax.eval_shape(lambda k: module.init(k, *inputs(family))["params"], jax.random.key(0))
        out[family] = {"config": {"model_type": family, **SIZES[family]},
                       "tree": {"/".join(k): [list(v.shape), str(v.dtype)]
                                for k, v in sorted(traverse_util.flatten_dict(shapes).items())}}
    return out


def compare() -> None:
    """Our modules against 4.57's on one random init (drawn by 4.57's module from one key: ours must draw the same)."""
    from lora_kd_jax.models.families import FAMILIES

    for family in SIZES:
        for dtype, dropout in ((jnp.float32, 0.0), (jnp.bfloat16, 0.0), (jnp.float32, 0.1)):
            theirs = flax_module(family, dropout, dtype)
            x = inputs(family)
            params = theirs.init(jax.random.key(0), *x)["params"]
            fam = FAMILIES[family]
            hf = theirs.config.to_dict()
            ours = fam.module(fam.arch(hf), dtype)
            own_init = ours.init(jax.random.key(0), x[0], x[1], x[-1], x[2] if len(x) == 4 else None)["params"]
            same_init = jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, own_init))
            rngs = {"dropout": jax.random.key(7)}
            det = dropout == 0.0
            a = theirs.apply({"params": params}, *x, deterministic=det, rngs=rngs)[0]
            b = ours.apply({"params": params}, x[0], x[1], x[-1], x[2] if len(x) == 4 else None,
                           deterministic=det, rngs=rngs)[0]
            real = x[1][..., None] > 0
            diff = float(jnp.max(jnp.where(real, jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), 0)))
            print(f"{family:8s} {jnp.dtype(dtype).name:9s} dropout {dropout}: same init {same_init}, "
                  f"max |diff| on real tokens {diff:.3g}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="write the manifest here (JSON)")
    ap.add_argument("--compare", action="store_true", help="compare our modules' outputs with 4.57's")
    args = ap.parse_args(argv)
    if args.out:
        trees = manifest()
        lines = [f'  "{family}": {{\n    "config": {json.dumps(entry["config"])},\n    "tree": {{\n'
                 + ",\n".join(f'      "{k}": {json.dumps(v)}' for k, v in entry["tree"].items()) + "\n    }\n  }"
                 for family, entry in sorted(trees.items())]
        with open(args.out, "w") as f:
            f.write("{\n" + ",\n".join(lines) + "\n}\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.compare:
        compare()


if __name__ == "__main__":
    main()
