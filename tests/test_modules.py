"""Our own linen modules stand in for transformers 4's Flax classes: the same parameter trees (a manifest written under
4.57, `scripts/tree_manifest.py`), run dirs written by the previous release restore and evaluate to their recorded
numbers, and Llama as Llama 3.x checkpoints need it (rope base, head_dim, biases, llama3 rope scaling) against
transformers 5's PyTorch LlamaForSequenceClassification and PEFT."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from lora_kd_jax.models.classifier import base_shapes
from lora_kd_jax.models.families import FAMILIES
from lora_kd_jax.models.modules.arch import Rope

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("family", ["gpt2", "bert", "roberta", "llama"])
def test_modules_build_the_trees_of_transformers_457(family):
    """Every leaf path, shape and dtype of the family's module equals the tree transformers 4.57's Flax class built
    at the same config (so LoRA targets, PEFT name maps, Orbax run dirs and flax_model.msgpack files keep working)."""
    from transformers import AutoConfig

    entry = json.loads((DATA / "transformers_4_57_trees.json").read_text())[family]
    fam = FAMILIES[family]
    config = dict(entry["config"])
    hf = AutoConfig.for_model(config.pop("model_type"), **config).to_dict()
    shapes = base_shapes(fam, fam.module(fam.arch(hf)))
    ours = {"/".join(k): [list(v.shape), str(v.dtype)] for k, v in _flat(shapes).items()}
    assert ours == entry["tree"]


def _flat(tree: dict, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k): v})
    return out


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_a_previous_release_run_restores_and_evaluates_to_its_recorded_numbers(family, tmp_path, xla_default_codegen):
    """A tiny LoRA run dir written by the release on transformers 4.57's Flax classes (tests/data/previous_release):
    restored by today's code onto today's modules, its best checkpoint scores the 48 validation and out-of-domain
    rows it trained with exactly as its metrics.json recorded them. Compiled as that release compiled
    (xla_default_codegen): on an AVX-512 AMD EPYC the suite's faster code generation puts the loss one float32 step
    off the record (0.62326765 vs 0.62326769); XLA's defaults give it to the bit there too."""
    from lora_kd_jax.commands.evaluation import Predictor

    run = tmp_path / family
    shutil.copytree(DATA / "previous_release" / family, run)
    shutil.copytree(DATA / "previous_release" / "bert_tokenizer", tmp_path / "bert_tokenizer")
    config = yaml.safe_load((run / "config.yaml").read_text())
    if config["data"]["tokenizer"]:  # the tokenizer dir it was written beside
        config["data"]["tokenizer"] = str(tmp_path / "bert_tokenizer")
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    clf = Predictor.from_run(run)
    inside, outside = clf.evaluate("in_domain", limit=48), clf.evaluate("out_of_domain", limit=48)
    assert (inside.accuracy, inside.mcc, inside.loss) == (summary["best_val_accuracy"], summary["val_mcc_at_best"],
                                                          summary["val_loss_at_best"])
    assert (outside.accuracy, outside.mcc) == (summary["out_of_domain_accuracy_at_best"],
                                               summary["out_of_domain_mcc_at_best"])


LLAMA3 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              intermediate_size=96, max_position_embeddings=8192, rope_theta=500000.0, attention_bias=True,
              mlp_bias=True, tie_word_embeddings=False,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192})


def test_llama3_rope_head_dim_and_biases_match_pytorch_and_peft(tmp_path, xla_default_codegen):
    """A tiny Llama as Llama 3.x checkpoints are (rope_theta 500000, head_dim 32 at hidden 64 / 4 heads, grouped-query
    attention, q/k/v/o and MLP biases, the llama3 rope scaling): logits without LoRA vs PyTorch's classifier and with
    LoRA vs PEFT, and the gradients of every trainable leaf vs PEFT's, at the families' tolerances. The same weights
    with transformers 4's Flax rope (base 10000, no scaling) give logits far outside the tolerance. Compiled as users
    compile (xla_default_codegen): the suite's faster code generation rounds one gradient to 7.5e-6 of PEFT's on the
    machine the bound was set on and 1.06e-5 on an AVX-512 AMD EPYC, over the 5e-6 bound (3.6e-6 as users compile)."""
    torch = pytest.importorskip("torch")
    import test_families as tf
    import tiny_families
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import torch_reference as ref_lib
    from lora_kd_jax.data import encode
    from lora_kd_jax.models.build import build_classifier

    tok = tiny_families.train_tokenizer("llama", tmp_path)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=2,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **LLAMA3)
    torch.manual_seed(0)
    torch_model = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():  # non-zero biases, so that a bias left out shows
        for name, p in torch_model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    torch_model.save_pretrained(str(tmp_path), safe_serialization=True)
    cfg = tf._config(tmp_path)
    model, params = build_classifier(cfg, jax.random.key(0))
    a = model.arch
    assert (a.head_width, a.rope.theta, a.rope.kind, a.attention_bias, a.mlp_bias) == (32, 500000.0, "llama3", True,
                                                                                       True)
    twin = tf._peft(torch_model, seed=1)
    params = {**params, **jax.tree.map(np.asarray, tf._from_peft(twin, {"family": model.family,
                                                                       "head": params["head"]}))}
    split = encode(tiny_families.cola_sentences()[:12], np.arange(12) % 2, tiny_families.family_tokenizer(
        tmp_path, "llama"), 20)
    plain = {k: v for k, v in params.items() if k != "lora"}
    plain["head"] = {"score": {"kernel": torch_model.score.weight.detach().numpy().T}}
    err_plain = ref_lib.max_rel_err(tf._jax_logits(model, plain, split), tf._torch_logits(torch_model, split))
    err_lora = ref_lib.max_rel_err(tf._jax_logits(model, params, split), tf._torch_logits(twin, split))
    assert err_plain <= tf.OUTPUT_RTOL and err_lora <= tf.OUTPUT_RTOL, (err_plain, err_lora)
    errs = tf.grad_errs_vs_peft(model, params, twin, split)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tf.GRAD_RTOL, f"{worst}: gradient rel err {errs[worst]:.3g}"
    old_rope = dataclasses.replace(model, spec=None, arch=dataclasses.replace(a, rope=Rope(10000.0)))
    err_old = ref_lib.max_rel_err(tf._jax_logits(old_rope, plain, split), tf._torch_logits(torch_model, split))
    assert err_old > 100 * tf.OUTPUT_RTOL, err_old


def test_a_random_base_drawn_again_is_a_fresh_copy_of_the_same_draw(monkeypatch):
    """`random_base` keeps its last draws (up to RECENT_BASE_BYTES each): the same module and key again give the
    arrays a new draw gives, bit for bit, in buffers of their own (a run may donate the leaves it trains: the next
    run's copy is untouched); another key draws anew; a base above the bound is not kept."""
    from lora_kd_jax.models import classifier
    from lora_kd_jax.models.build import arch_of
    from tiny import tiny_config

    fam = FAMILIES["gpt2"]
    module = fam.module(arch_of(tiny_config()))
    fresh = classifier._init_base(module, jax.random.key(7), *classifier.example_inputs(fam))
    first, second = (classifier.random_base(fam, module, jax.random.key(7)) for _ in range(2))
    other = classifier.random_base(fam, module, jax.random.key(8))
    for a, b, f in zip(*(jax.tree.leaves(t) for t in (first, second, fresh))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(f))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(f))
    assert not np.array_equal(np.asarray(first["wte"]["embedding"]), np.asarray(other["wte"]["embedding"]))
    jax.jit(lambda x: x + 1.0, donate_argnums=0)(first["ln_f"]["scale"])  # as a train step donates a norm it trains
    assert first["ln_f"]["scale"].is_deleted() and not second["ln_f"]["scale"].is_deleted()
    third = classifier.random_base(fam, module, jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(third["ln_f"]["scale"]), np.asarray(fresh["ln_f"]["scale"]))
    monkeypatch.setattr(classifier, "RECENT_BASE_BYTES", 0)
    monkeypatch.setattr(classifier, "_recent_bases", type(classifier._recent_bases)())
    big = classifier.random_base(fam, module, jax.random.key(9))
    assert not classifier._recent_bases and big["wte"]["embedding"].shape == fresh["wte"]["embedding"].shape
