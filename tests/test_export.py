"""lora_kd_jax.interop.export: PEFT adapters out (loaded by PEFT itself) and in (trained by PEFT), merged checkpoints
loaded by plain transformers (PyTorch) and by this library, and inputs that fail naming what is missing or
mismatched.

Both sides use the same base: a random tiny GPT-2 written with save_pretrained (PyTorch safetensors), loaded here with
`model.init=pretrained model.path=DIR` and there with `GPT2ForSequenceClassification.from_pretrained(DIR)`.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from tiny import assert_resumed, latest_step, log_messages, make_mixed_length_batch, parity_config  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import GPT2Config, GPT2ForSequenceClassification  # noqa: E402

from lora_kd_jax.training.restore import open_run
from lora_kd_jax.commands import cli
from lora_kd_jax.interop import export
from lora_kd_jax.runs import rundir
from lora_kd_jax.training import finetune  # noqa: E402
from lora_kd_jax.runs import reader as runs_lib  # noqa: E402
from lora_kd_jax.core.config import save_config  # noqa: E402
from lora_kd_jax.models.hf_names import ConversionError  # noqa: E402
from lora_kd_jax.models.build import build_classifier  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")

# fp32 logits of the same function computed by two implementations (2 blocks, width 64): observed <= ~1e-6
ATOL = 1e-5
# the trained parts (LoRA, LayerNorms, head) must move the logits by far more than ATOL, or equality proves nothing
MOVED = 1e-3
LENGTHS = [20, 1, 7, 13, 20, 3]


def _batch(seed: int = 0) -> dict:
    return make_mixed_length_batch(LENGTHS, 20, seed=seed)


def _ours(model, params, batch) -> np.ndarray:
    return np.asarray(jax.jit(model.logits)(params, batch["input_ids"], batch["attention_mask"]))


def _torch_logits(torch_model, batch) -> np.ndarray:
    with torch.no_grad():
        out = torch_model(input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
                          attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)))
    return out.logits.numpy()


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _hf_classifier(base_dir) -> GPT2ForSequenceClassification:
    torch.manual_seed(0)  # `score` is not in the base checkpoint: random, then replaced by the adapter's
    return GPT2ForSequenceClassification.from_pretrained(str(base_dir)).eval()


def _cfg(base_dir, run_dir, *overrides):
    return parity_config("model.init=pretrained", f"model.path={base_dir}", "data.limit=32", "train.lr=1e-2",
                       *overrides, run_dir=run_dir)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from tiny import save_torch_gpt2

    d = tmp_path_factory.mktemp("base")
    save_torch_gpt2(d, seed=3)
    return d


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory):
    """Two short JAX runs (4 Adam steps each) on the shared base: `seed` init with rank 2 and lora.alpha=8 (which
    `seed` ignores: a wrong lora_alpha in the export would scale the update by 4), `standard` with rank 4, alpha 8."""
    out = {}
    for init, rank in (("seed", 2), ("standard", 4)):
        run_dir = tmp_path_factory.mktemp(f"run_{init}")
        finetune.train_lora(_cfg(base_dir, run_dir, f"lora.init={init}", f"lora.rank={rank}", "lora.alpha=8"),
                                 progress=False)
        out[init] = run_dir
    return out


@pytest.fixture(scope="module")
def restored(runs):
    """Each run's best checkpoint read back (runs.open_run): (config, model, params) as training left them."""
    return {init: _restore(run_dir) for init, run_dir in runs.items()}


def _restore(run_dir, which: str = "best"):
    run = open_run(run_dir, kind="lora", which=which)
    return run.config, run.model, run.params


# ------------------------------------------------------------------------------------------ export -> PEFT


@pytest.mark.parametrize("init", ["seed", "standard"])
def test_export_peft_loads_in_peft_with_equal_logits(init, runs, restored, base_dir, tmp_path):
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

    out = tmp_path / "adapter"
    cfg, model, params = restored[init]
    if init == "standard":
        cli.main(["export-peft", str(runs[init]), str(out)])  # the command line, as documented
    else:  # the same writer without restoring the run a second time
        export.write_peft_adapter(cfg, model, params, out)
    written = json.loads((out / export.ADAPTER_CONFIG).read_text())
    assert written["lora_alpha"] == (2 if init == "seed" else 8) and written["r"] == model.spec.rank
    assert written["base_model_name_or_path"] == str(Path(base_dir).absolute())

    peft_model = PeftModel.from_pretrained(_hf_classifier(base_dir), str(out)).eval()
    batch = _batch()
    ours, theirs = _ours(model, params, batch), _torch_logits(peft_model, batch)
    with peft_model.disable_adapter():  # the same torch model without LoRA, trained LayerNorms and head
        untrained = _torch_logits(peft_model, batch)
    print(f"{init}: |PEFT - ours| = {_err(theirs, ours):.1e}, effect of the adapter {_err(untrained, ours):.1e}")
    assert _err(theirs, ours) < ATOL
    assert _err(untrained, ours) > MOVED

    # every field we write is a LoraConfig field and reads back as written; the keys and shapes are exactly those
    # PEFT itself saves for the same config
    loaded = PeftConfig.from_pretrained(str(out))
    fields = LoraConfig().to_dict()
    assert set(written) <= set(fields), set(written) - set(fields)
    for k in ("r", "lora_alpha", "fan_in_fan_out", "task_type", "bias", "lora_dropout"):
        assert getattr(loaded, k) == written[k], k
    assert set(loaded.target_modules) == {"c_attn", "c_proj", "c_fc"}
    if init == "seed":  # and back: our own export imports to the same parameters, bit for bit
        back_cfg, _, back = export.import_peft(out, cfg)
        assert (back_cfg.lora.init, back_cfg.lora.alpha, back_cfg.lora.rank) == ("standard", 2.0, 2)  # scale 1
        for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            assert np.array_equal(np.asarray(got), np.asarray(want))
    own = get_peft_model(_hf_classifier(base_dir), LoraConfig(**{k: v for k, v in written.items() if k not in (
        "modules_to_save", "peft_type", "inference_mode")}, modules_to_save=["ln_1", "ln_2", "ln_f"]))
    own.save_pretrained(str(tmp_path / "own"))
    ours_sd = load_file(str(out / export.ADAPTER_WEIGHTS))
    own_sd = load_file(str(tmp_path / "own" / export.ADAPTER_WEIGHTS))
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in own_sd.items()}
    own_cfg = json.loads((tmp_path / "own" / export.ADAPTER_CONFIG).read_text())
    for k in written:
        if k != "target_modules":
            assert own_cfg[k] == written[k], k


def test_export_refuses_random_base_unless_saved_beside(tmp_path):
    """A run on a random-init base: export-peft says how to proceed; --save-base writes the base and PEFT loads both."""
    from peft import PeftModel

    cfg = parity_config("lora.init=seed", "lora.rank=2", run_dir=tmp_path / "run")
    model, params = build_classifier(cfg, jax.random.split(jax.random.key(cfg.train.seed))[0])
    params["head"]["kernel"] = params["head"]["kernel"] * 5.0  # make the untrained head matter
    params["gpt2"]["ln_f"]["scale"] = params["gpt2"]["ln_f"]["scale"] * 1.5  # as if trained: the adapter carries it
    export.write_imported_run(cfg, model, params, tmp_path / "run")  # a run dir holding exactly these params
    with pytest.raises(export.ExportError, match="random init.*--save-base"):
        export.export_peft(tmp_path / "run", tmp_path / "a", which="latest")
    with pytest.raises(SystemExit, match="export error: .*random init"):
        cli.main(["export-peft", str(tmp_path / "run"), str(tmp_path / "a"), "--which", "latest"])
    out = export.export_peft(tmp_path / "run", tmp_path / "b", which="latest", save_base=True)
    saved_base = load_file(str(out / "base" / export.TORCH_WEIGHTS))
    np.testing.assert_array_equal(saved_base["transformer.ln_f.weight"], np.ones(64, np.float32))  # the untrained base
    np.testing.assert_array_equal(saved_base["transformer.h.1.mlp.c_fc.weight"],
                                  np.asarray(params["gpt2"]["h"]["1"]["mlp"]["c_fc"]["kernel"]).T)
    peft_model = PeftModel.from_pretrained(_hf_classifier(out / "base"), str(out)).eval()
    batch = _batch(1)
    ours, theirs = _ours(model, params, batch), _torch_logits(peft_model, batch)
    with peft_model.disable_adapter():
        untrained = _torch_logits(peft_model, batch)
    print(f"random base: |PEFT - ours| = {_err(theirs, ours):.1e}, effect of the adapter {_err(untrained, ours):.1e}")
    assert _err(theirs, ours) < ATOL and _err(untrained, ours) > MOVED
    with pytest.raises(export.ExportError, match="already holds adapter_config.json"):
        export.export_peft(tmp_path / "run", tmp_path / "b", which="latest", save_base=True)


# ------------------------------------------------------------------------------------------ PEFT -> import


def _peft_trained(base_dir, out_dir, steps: int = 5, **lora_kwargs) -> torch.nn.Module:
    """PEFT creates an adapter on GPT2ForSequenceClassification, trains it with Adam (lr 1e-2), saves it."""
    from peft import LoraConfig, get_peft_model

    kwargs = dict(task_type="SEQ_CLS", r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                  fan_in_fan_out=True, lora_dropout=0.0, bias="none", modules_to_save=["ln_1", "ln_2", "ln_f"])
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(_hf_classifier(base_dir), LoraConfig(**kwargs))
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(7)
    ids, mask = (torch.from_numpy(batch[k].astype(np.int64)) for k in ("input_ids", "attention_mask"))
    labels = torch.from_numpy(batch["labels"].astype(np.int64))
    peft_model.train()
    for _ in range(steps):
        opt.zero_grad()
        peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(str(out_dir))
    return peft_model


@pytest.mark.parametrize("variant", ["full", "rslora_partial"])
def test_import_peft_trained_adapter_gives_peft_logits(variant, base_dir, tmp_path):
    kwargs = {} if variant == "full" else dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["c_attn"],
                                               modules_to_save=["ln_f"])
    peft_model = _peft_trained(base_dir, tmp_path / "adapter", **kwargs)
    cfg, model, params = export.import_peft(tmp_path / "adapter", _cfg(base_dir, tmp_path / "run"))
    batch = _batch(2)
    ours, theirs = _ours(model, params, batch), _torch_logits(peft_model, batch)
    with peft_model.disable_adapter():
        untrained = _torch_logits(peft_model, batch)
    print(f"{variant}: |ours - PEFT| = {_err(ours, theirs):.1e}, effect of the adapter {_err(untrained, theirs):.1e}")
    assert _err(ours, theirs) < ATOL
    assert _err(untrained, theirs) > MOVED
    if variant == "full":
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init) == (4, 16.0, "standard")
        assert cfg.lora.targets == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    else:
        assert cfg.lora.targets == ["attn.c_attn"] and cfg.lora.rank == 3
        assert abs(model.spec.scale - 5 / np.sqrt(3)) < 1e-6  # rsLoRA's alpha / sqrt(r)


def test_import_peft_run_dir_resumes_training(base_dir, tmp_path):
    """The command line writes a run dir; restore_lora_run reads the imported weights back exactly, and training
    continues from them with --resume (one epoch here)."""
    peft_model = _peft_trained(base_dir, tmp_path / "adapter")
    yaml_path = tmp_path / "cfg.yaml"
    save_config(_cfg(base_dir, tmp_path / "ignored"), yaml_path)
    run = tmp_path / "imported"
    cli.main(["import-peft", str(tmp_path / "adapter"), str(yaml_path), "train.epochs=1", "--out", str(run)])
    cfg, model, params = _restore(run, "latest")
    assert cfg.run.dir == str(run) and cfg.train.epochs == 1 and cfg.lora.alpha == 16.0
    batch = _batch(3)
    assert _err(_ours(model, params, batch), _torch_logits(peft_model, batch)) < ATOL
    with pytest.raises(runs_lib.RunError, match="no best checkpoint"):
        _restore(run, "best")
    from_step, since = latest_step(run), (run / "log.txt").stat().st_size if (run / "log.txt").exists() else 0
    summary = finetune.train_lora(cfg, resume=True, progress=False)
    assert summary["epochs_run"] == 1
    per_epoch = -(-32 // cfg.train.batch_size)  # data.limit=32
    assert_resumed(log_messages(run, since), from_step=from_step, to_step=from_step + per_epoch)
    _, _, after = _restore(run, "best")
    moved = _err(after["lora"]["h"]["0"]["attn"]["c_attn"]["a"], params["lora"]["h"]["0"]["attn"]["c_attn"]["a"])
    assert moved > 1e-4  # trained on from the imported adapter
    base_kernel = params["gpt2"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert _err(after["gpt2"]["h"]["0"]["attn"]["c_attn"]["kernel"], base_kernel) == 0.0  # the base stays frozen
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        cli.main(["import-peft", str(tmp_path / "adapter"), str(yaml_path), "--out", str(run)])


# ------------------------------------------------------------------------------------------------- merge


def test_merge_loads_in_plain_transformers_pytorch_and_flax(runs, restored, tmp_path):
    """The merged checkpoint in transformers 5's PyTorch classifier and as this library's model.path (its base; the
    head from model.safetensors), both giving the factored run's logits."""
    out = tmp_path / "merged"
    cli.main(["merge", str(runs["seed"]), str(out)])
    _, model, params = restored["seed"]
    batch = _batch(4)
    ours = _ours(model, params, batch)  # the unmerged, factored model

    pt, info = GPT2ForSequenceClassification.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    pt_logits = _torch_logits(pt.eval(), batch)

    fx_model, fx_params = build_classifier(parity_config("model.init=pretrained", f"model.path={out}"),
                                           jax.random.key(0), with_lora=False)
    hidden = np.asarray(fx_model.base_outputs(fx_params["gpt2"], batch["input_ids"], batch["attention_mask"])[0])
    last = batch["attention_mask"].sum(-1) - 1
    score = load_file(str(out / export.TORCH_WEIGHTS))["score.weight"]  # the head, (n_labels, n_embd)
    fx_logits = hidden[np.arange(len(last)), last] @ score.T

    base = GPT2ForSequenceClassification.from_pretrained(rundir.read_config(runs["seed"])["model"]["path"])
    lora_effect = _err(pt.transformer.h[0].attn.c_attn.weight.detach().numpy(),
                       base.transformer.h[0].attn.c_attn.weight.detach().numpy())
    print(f"merge: |PyTorch - ours| = {_err(pt_logits, ours):.1e}, |JAX (model.path) - ours| = "
          f"{_err(fx_logits, ours):.1e}, "
          f"LoRA moved c_attn by {lora_effect:.1e}")
    assert _err(pt_logits, ours) < ATOL and _err(fx_logits, ours) < ATOL
    assert lora_effect > MOVED
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 50256
    with pytest.raises(SystemExit, match="already holds"):
        cli.main(["merge", str(runs["seed"]), str(out)])


# -------------------------------------------------------------------------------------------- bad inputs


def _rewrite(src: Path, dst: Path, *, drop=(), config=None, weights=None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / export.ADAPTER_CONFIG).read_text())
    cfg.update(config or {})
    (dst / export.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    sd = {k: v for k, v in load_file(str(src / export.ADAPTER_WEIGHTS)).items() if k not in drop}
    sd.update(weights or {})
    save_file(sd, str(dst / export.ADAPTER_WEIGHTS))
    return dst


@pytest.fixture(scope="module")
def good_adapter(base_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "adapter"
    _peft_trained(base_dir, d, steps=1)
    return d


P = "base_model.model.transformer."


@pytest.mark.parametrize("case, match", [
    ("no lora_B", r"missing keys: base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_B\.weight"),
    ("no module", rf"missing keys .*{P}h\.1\.mlp\.c_fc\.lora_A\.weight, {P}h\.1\.mlp\.c_fc\.lora_B\.weight"),
    ("no layernorm", rf"missing keys .*{P}h\.1\.ln_2\.bias"),
    ("no head", r"missing keys: base_model\.model\.score\.weight"),
    ("rank_pattern", r"another rank layout: rank_pattern=\{'c_fc': 8\}"),
    ("odd rank", r"another rank layout: .*r=4 but transformer\.h\.1\.attn\.c_proj\.lora_A has rank 2"),
    ("dora", r"missing keys: .*lora_magnitude_vector"),
    ("causal lm", r"task_type is 'CAUSAL_LM', expected 'SEQ_CLS'"),
    ("not peft", r"missing adapter_config\.json"),
])
def test_import_rejects_broken_adapters_naming_the_problem(case, match, good_adapter, base_dir, tmp_path):
    src, dst = good_adapter, tmp_path / "bad"
    if case == "no lora_B":
        _rewrite(src, dst, drop=[P + "h.0.attn.c_attn.lora_B.weight"])
    elif case == "no module":
        _rewrite(src, dst, drop=[P + "h.1.mlp.c_fc.lora_A.weight", P + "h.1.mlp.c_fc.lora_B.weight"])
    elif case == "no layernorm":
        _rewrite(src, dst, drop=[P + "h.1.ln_2.bias"])
    elif case == "no head":
        _rewrite(src, dst, drop=["base_model.model.score.weight"])
    elif case == "rank_pattern":
        _rewrite(src, dst, config={"rank_pattern": {"c_fc": 8}})
    elif case == "odd rank":
        _rewrite(src, dst, weights={P + "h.1.attn.c_proj.lora_A.weight": np.zeros((2, 64), np.float32),
                                    P + "h.1.attn.c_proj.lora_B.weight": np.zeros((64, 2), np.float32)})
    elif case == "dora":
        _rewrite(src, dst, config={"use_dora": True})
    elif case == "causal lm":
        _rewrite(src, dst, config={"task_type": "CAUSAL_LM"})
    else:
        dst.mkdir()
    with pytest.raises((export.ExportError, ConversionError), match=match):
        export.import_peft(dst, _cfg(base_dir, tmp_path / "run"))


def test_import_rejects_other_architectures(base_dir, tmp_path):
    """A real PEFT adapter for a BERT classifier, and one for a narrower GPT-2, on our 64-wide GPT-2 base."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))
    get_peft_model(bert, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])).save_pretrained(
        str(tmp_path / "bert"))
    with pytest.raises(export.ExportError, match=r"not a LoRA adapter for GPT2ForSequenceClassification.*unexpected "
                                                 r"keys: base_model\.model\.bert\.encoder\.layer\.0\.attention"):
        export.import_peft(tmp_path / "bert", _cfg(base_dir, tmp_path / "run"))

    narrow = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=32, n_head=4, pad_token_id=50256))
    get_peft_model(narrow, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                      fan_in_fan_out=True)).save_pretrained(str(tmp_path / "narrow"))
    with pytest.raises(export.ExportError, match=r"another architecture: shapes do not fit the base .* width 64, .*"
                                                 rf"{P}h\.0\.attn\.c_attn\.lora_A\.weight: shape \(4, 32\), the "
                                                 r"base wants \(r, 64\)"):
        export.import_peft(tmp_path / "narrow", _cfg(base_dir, tmp_path / "run"))

    deep = GPT2ForSequenceClassification(GPT2Config(n_layer=3, n_embd=64, n_head=4, pad_token_id=50256))
    get_peft_model(deep, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn"], fan_in_fan_out=True)
                   ).save_pretrained(str(tmp_path / "deep"))
    with pytest.raises(export.ExportError, match=r"another architecture: LoRA on transformer\.h\.2\.attn\.c_attn, but "
                                                 r"the base .* has 2 layers"):
        export.import_peft(tmp_path / "deep", _cfg(base_dir, tmp_path / "run"))


def test_export_and_merge_reject_dirs_that_are_not_lora_runs(tmp_path, runs, restored):
    with pytest.raises(SystemExit, match="run error: .*not a run directory: no config.yaml"):
        cli.main(["export-peft", str(tmp_path), str(tmp_path / "out")])
    fake = tmp_path / "rnn"
    fake.mkdir()
    (fake / "config.yaml").write_text((Path(runs["seed"]) / "config.yaml").read_text())
    (fake / "metrics.json").write_text(json.dumps({"kind": "rnn"}))
    with pytest.raises(SystemExit, match="run error: .*is a 'rnn' run, not a 'lora' run"):
        cli.main(["merge", str(fake), str(tmp_path / "out")])
    (fake / "metrics.json").write_text(json.dumps({"kind": "lora"}))
    with pytest.raises(runs_lib.RunError, match="has no best checkpoint"):
        _restore(fake)
    with pytest.raises(SystemExit):
        cli.main(["merge", str(runs["seed"]), str(tmp_path / "o"), "--which", "worst"])
    # latest == best here (one epoch): both restore the same trained parameters
    latest = _restore(runs["seed"], "latest")[2]
    best = restored["seed"][2]
    assert _err(latest["lora"]["h"]["1"]["mlp"]["c_fc"]["b"], best["lora"]["h"]["1"]["mlp"]["c_fc"]["b"]) == 0
