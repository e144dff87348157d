"""Hugging Face checkpoints in (`models.hf_checkpoint`): sharded safetensors written by transformers 5 load, train and
land on the mesh as shards; every bad checkpoint ends in one line naming the file (and the tensor) before anything is
read; a decoder whose tokenizer has no pad token trains as it is and its PEFT export runs in PyTorch."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from tiny import XLA_CACHE, one_line_exit, save_torch_gpt2  # noqa: E402


SMALL = ["data.limit=16", "train.batch_size=8", "train.epochs=1", "lora.dropout=0.0", XLA_CACHE]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny GPT2Model saved by transformers 5 in shards of at most 200 KB: model.safetensors.index.json and its
    files, and the torch model."""
    d = tmp_path_factory.mktemp("sharded")
    model = save_torch_gpt2(d, seed=5)
    model.save_pretrained(str(d), max_shard_size="200KB")
    (d / "model.safetensors").unlink(missing_ok=True)
    return d, model


def test_a_sharded_checkpoint_loads_as_pytorch_holds_it_and_trains(sharded, tmp_path):
    import jax

    from lora_kd_jax.models.build import build_classifier
    from lora_kd_jax.training import finetune
    from tiny import tiny_config

    d, torch_model = sharded
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2, index  # really sharded
    cfg = tiny_config("model.init=pretrained", f"model.path={d}", "model.n_positions=64")
    model, params = build_classifier(cfg, jax.random.key(0), with_lora=False)
    want = {k: v.detach().numpy() for k, v in torch_model.state_dict().items() if not k.endswith("attn.bias")}
    got = {"h.0.attn.c_attn.weight": np.asarray(params["gpt2"]["h"]["0"]["attn"]["c_attn"]["kernel"]).T,
           "wte.weight": np.asarray(params["gpt2"]["wte"]["embedding"]),
           "h.1.ln_2.bias": np.asarray(params["gpt2"]["h"]["1"]["ln_2"]["bias"])}
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    summary = finetune.train_lora(tiny_config("model.init=pretrained", f"model.path={d}", "model.n_positions=64",
                                              *SMALL, f"run.dir={tmp_path / 'run'}"), progress=False)
    assert summary["epochs_run"] == 1 and 0 <= summary["best_val_accuracy"] <= 1


def test_on_eight_devices_each_holds_only_its_shard_of_the_fsdp_leaves(sharded, tmp_path):
    """Read onto a 2 x 4 mesh as training reads it: every leaf FSDP splits arrives as shards, a quarter of the tensor
    on each of the 8 devices (no device holds the whole), each shard exactly that slice of the checkpoint's tensor."""
    from test_mesh import run_worker

    out = tmp_path / "shards.json"
    run_worker("load", str(sharded[0]), str(out))
    leaves = json.loads(out.read_text())
    assert "wte/embedding" in leaves and len(leaves) >= 3, leaves  # the token table, the biggest kernels
    for path, leaf in leaves.items():
        (shard,) = leaf["shards"]
        assert leaf["devices"] == 8 and leaf["exact"], (path, leaf)
        assert 4 * int(np.prod(shard)) == int(np.prod(leaf["shape"])), (path, leaf)


# ------------------------------------------------------------------------------------------- bad checkpoints



def _broken(sharded, tmp_path, case: str):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "ckpt"
    shutil.copytree(sharded[0], d)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    if case == "missing shard":
        (d / shards[-1]).unlink()
        return d, rf"model error: {index_path}: names the shard {shards[-1]}, which is missing"
    if case == "truncated":
        data = (d / shards[0]).read_bytes()
        (d / shards[0]).write_bytes(data[:len(data) // 2])
        return d, rf"model error: {d / shards[0]}: tensor .* ends at byte \d+ of a \d+-byte file: the file is truncated"
    if case == "index names a tensor no shard holds":
        index["weight_map"]["h.7.attn.c_attn.weight"] = shards[0]
        index_path.write_text(json.dumps(index))
        return d, rf"model error: {index_path}: names the tensor h\.7\.attn\.c_attn\.weight in {shards[0]}, which"
    key = "h.0.attn.c_attn.weight"
    shard = d / index["weight_map"][key]
    tensors = load_file(str(shard))
    if case == "wrong shape":
        tensors[key] = tensors[key][:, :96]
        expect = rf"model error: {shard}: tensor h\.0\.attn\.c_attn\.weight has shape \(64, 96\), the model expects " \
                 r"\(64, 192\)"
    elif case == "wrong dtype":
        tensors[key] = tensors[key].astype(np.int64)
        expect = rf"model error: {shard}: tensor h\.0\.attn\.c_attn\.weight has dtype I64, expected a floating-point"
    else:  # another architecture
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
        return d, rf"model error: {d / 'config.json'}: model_type 't5' is not a family this library fine-tunes \(it " \
                  r"serves gpt2, bert, roberta, llama, qwen3, modernbert\)"
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return d, expect


@pytest.mark.parametrize("case", ["missing shard", "truncated", "index names a tensor no shard holds", "wrong shape",
                                  "wrong dtype", "model_type of no family"])
def test_a_bad_checkpoint_is_one_line_naming_the_file_and_nothing_is_built(case, sharded, tmp_path):
    import re

    d, expect = _broken(sharded, tmp_path, case)
    run = tmp_path / "run"
    from lora_kd_jax.assets import CONFIGS_DIR

    message = one_line_exit("train-lora", str(CONFIGS_DIR / "smoke.yaml"), "--no-progress", *SMALL, "model.init=pretrained",
                        f"model.path={d}", "model.n_positions=64", f"run.dir={run}")
    assert re.match(expect, message), message
    assert not run.exists()  # refused before the run dir was written


# ------------------------------------------------------------------------------------- a tokenizer without pad


def test_a_llama_whose_tokenizer_has_no_pad_token_trains_and_its_peft_export_runs_in_pytorch(tmp_path):
    """Llama 3's tokenizer (and many Llama-family ones) has no pad token; config.json names pad_token_id. The run
    trains from model.path, pads with config.json's id (logged), writes it into its exports' config, and
    PeftModel.from_pretrained on the checkpoint, fed by the exported tokenizer, gives predict's probabilities."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    import tiny_families
    from lora_kd_jax.commands.evaluation import Predictor
    from lora_kd_jax.interop.export import export_peft
    from lora_kd_jax.training import finetune
    from tiny import tiny_config

    ckpt = tmp_path / "ckpt"
    tok = tiny_families.train_tokenizer("llama", ckpt)
    pad = tok.pad_token_id  # <pad> stays a token of the vocabulary, but the tokenizer does not call it its pad
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    (ckpt / "special_tokens_map.json").unlink(missing_ok=True)
    assert AutoTokenizer.from_pretrained(str(ckpt)).pad_token is None
    llama = AutoConfig.for_model("llama", vocab_size=len(tok), pad_token_id=pad, num_labels=2, hidden_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(llama).save_pretrained(str(ckpt))
    cfg = tiny_config("model.init=pretrained", f"model.path={ckpt}", "lora.init=standard", *SMALL,
                      f"run.dir={tmp_path / 'run'}")
    finetune.train_lora(cfg, progress=False)
    assert "config.json's pad_token_id" in (tmp_path / "run" / "log.txt").read_text()
    out = export_peft(tmp_path / "run", tmp_path / "adapter")
    sentences = ["the cat sat on the mat .", "colorless green ideas sleep", "a b"]
    ours = [p.probability if p.label == "acceptable" else 1 - p.probability
            for p in Predictor.from_run(tmp_path / "run").predict(sentences)]
    exported = AutoTokenizer.from_pretrained(str(out))
    assert exported.pad_token_id == pad
    base = AutoModelForSequenceClassification.from_pretrained(str(ckpt))
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    batch = exported(sentences, padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        theirs = torch.softmax(peft_model(**batch).logits, -1)[:, 1].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # test_families' round-trip tolerance
