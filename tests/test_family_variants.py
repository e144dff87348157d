"""The LoRA variants on the encoder and decoder families: DoRA + rsLoRA against PEFT (use_dora, use_rslora) on the
same weights and PiSSA's init against PEFT's, for BERT, Qwen3 and ModernBERT (its fused Wqkv, its head trained in
full); on BERT also the round trips of a DoRA + rsLoRA adapter and LoRA+'s optimizer groups against PEFT's
create_loraplus_optimizer.

Per family one tiny saved *ForSequenceClassification (`tiny_families`, the checkpoint test_families saves, shared
in the process) and one PEFT twin with non-zero B, magnitudes moved off the weight norms and a moved head, so that
every term of the variant shows. The layout and interop code is the families' (the one classifier and interop code
every family shares); tolerances are test_families'.
"""
from __future__ import annotations

import copy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import torch_reference as ref_lib  # noqa: E402
from test_families import (ALPHA, GRAD_RTOL, OUTPUT_RTOL, RANK, ROUND_TRIP_ATOL, _config, _from_peft,  # noqa: E402
                           _jax_logits, _torch_logits, grad_errs_vs_peft, saved)
from tiny_families import cola_sentences  # noqa: E402

from lora_kd_jax.core.config import ConfigError  # noqa: E402
from lora_kd_jax.models.families import BERT  # noqa: E402
from lora_kd_jax.data import encode  # noqa: E402
from tiny_families import family_tokenizer as load_family_tokenizer  # noqa: E402
from lora_kd_jax.interop import export  # noqa: E402
from lora_kd_jax.models import hf_names  # noqa: E402
from lora_kd_jax.models import build  # noqa: E402
from lora_kd_jax.models.build import build_classifier  # noqa: E402
from lora_kd_jax.training.state import partition  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")
VARIANT = ("lora.variant=dora", "lora.scaling=rslora")


def _twin(torch_model, family, **variant):
    """PEFT on the family's default targets with the variant (ModernBERT's head in modules_to_save, as export-peft
    writes it), B non-zero, DoRA magnitudes and the head moved (seeded)."""
    model = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(
        task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(family.default_targets),
        modules_to_save=list(family.trained_modules) or None, **variant))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or (".modules_to_save." in name and name.endswith("weight")):
                p.add_(torch.randn_like(p) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    return model.eval()


_SETUPS: dict = {}  # family -> its DoRA + rsLoRA model and twin, built once per process


def _setup(name: str, tmp_path_factory) -> types.SimpleNamespace:
    if name not in _SETUPS:
        d, torch_model, _ = saved(name, tmp_path_factory)  # test_families' checkpoint, saved once per process
        cfg = _config(d, *VARIANT)
        model, params = build_classifier(cfg, jax.random.key(0))
        twin = _twin(torch_model, model.family, use_dora=True, use_rslora=True)
        params = {**params, **jax.tree.map(jnp.asarray, _from_peft(twin, {"family": model.family,
                                                                         "head": params["head"]}))}
        split = encode(cola_sentences()[:12], np.arange(12) % 2, load_family_tokenizer(str(d), name), 20)
        _SETUPS[name] = types.SimpleNamespace(name=name, dir=d, torch=torch_model, cfg=cfg, model=model,
                                              params=params, twin=twin, split=split)
    return _SETUPS[name]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return _setup("bert", tmp_path_factory)


@pytest.fixture(scope="module", params=["bert", "qwen3", "modernbert"])
def fam(request, tmp_path_factory):
    """BERT (query, value), Qwen3 (q_proj, v_proj of grouped-query attention, head_dim 32) and ModernBERT (the
    fused Wqkv; its head trained in full)."""
    return _setup(request.param, tmp_path_factory)


def test_dora_rslora_forward_and_gradients_match_peft(fam):
    """Logits and d(mean CE)/d(every trainable leaf: a, b, m, head) against PEFT with use_dora and use_rslora."""
    model = fam.model
    assert model.spec.variant == "dora" and model.spec.scale == ALPHA / RANK ** 0.5
    err = ref_lib.max_rel_err(_jax_logits(model, fam.params, fam.split), _torch_logits(fam.twin, fam.split))
    errs = grad_errs_vs_peft(model, fam.params, fam.twin, fam.split)
    worst = max(errs, key=errs.get)
    print(f"{fam.name}: logits rel err {err:.2e}, worst gradient {worst} {errs[worst]:.2e}")
    assert err <= OUTPUT_RTOL, err
    n_targets = len(model.family.default_targets)  # query, value; q_proj, v_proj; ModernBERT's one Wqkv
    assert sum(k.startswith("lora/") for k in errs) == 2 * n_targets * 3  # 2 layers x targets x (a, b, m)
    assert errs[worst] <= GRAD_RTOL, f"{worst}: gradient rel err {errs[worst]:.3g} > {GRAD_RTOL}"


def test_dora_rslora_round_trips(bert, tmp_path):
    """export-peft -> PeftModel.from_pretrained (use_dora, use_rslora, magnitudes) gives our logits; that adapter
    -> import-peft gives them again; merge -> AutoModelForSequenceClassification too."""
    from transformers import AutoModelForSequenceClassification

    want = _jax_logits(bert.model, bert.params, bert.split)
    out = export.write_peft_adapter(bert.cfg, bert.model, bert.params, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert.dir), out).eval()
    assert (loaded.peft_config["default"].use_dora, loaded.peft_config["default"].use_rslora) == (True, True)
    assert np.abs(_torch_logits(loaded, bert.split) - want).max() <= ROUND_TRIP_ATOL
    cfg, model, params = export.import_peft(out, _config(bert.dir))
    assert (cfg.lora.variant, cfg.lora.scaling) == ("dora", "rslora")
    assert np.abs(_jax_logits(model, params, bert.split) - want).max() <= ROUND_TRIP_ATOL
    merged = AutoModelForSequenceClassification.from_pretrained(
        export.save_merged(bert.cfg, bert.model, bert.params, tmp_path / "merged")).eval()
    assert np.abs(_torch_logits(merged, bert.split) - want).max() <= ROUND_TRIP_ATOL


def test_lora_plus_groups_are_peft_loraplus_groups(bert):
    """With lora.plus_ratio each trained leaf's learning rate is the one create_loraplus_optimizer gives it (B, the
    magnitudes and the head's bias at ratio x lr; A and the head's kernel at lr); --dry-run still counts B and m as
    LoRA."""
    from peft.optimizers import create_loraplus_optimizer

    lr, ratio = 1e-3, 16.0
    model, params = build_classifier(_config(bert.dir, *VARIANT, f"lora.plus_ratio={ratio}"), jax.random.key(0))
    opt = create_loraplus_optimizer(bert.twin, optimizer_cls=torch.optim.Adam, lr=lr, loraplus_lr_ratio=ratio)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = {n: torch.full_like(p, lr_of[id(p)]) for n, p in bert.twin.named_parameters() if p.requires_grad}
    saved = types.SimpleNamespace(named_parameters=lambda: [(n, torch.nn.Parameter(v)) for n, v in named.items()])
    want = _from_peft(saved, {"family": BERT, "head": params["head"]})
    labels = model.param_labels(params)
    trained, _ = partition(params, labels)
    flat_labels = traverse_util.flatten_dict(labels)
    rate = {k: lr * model.lr_scales.get(flat_labels[k], 1.0) for k in flat_labels}
    got = traverse_util.unflatten_dict({k: np.full(np.shape(v), rate[k], np.float32)
                                        for k, v in traverse_util.flatten_dict(trained).items()})
    errs = ref_lib.tree_abs_errs(got, want)  # the same trained leaves on both sides, or it fails
    assert max(errs.values()) == 0.0, {k: e for k, e in errs.items() if e}
    with pytest.raises(ConfigError, match="lora.plus_ratio=16.0 with lora.modules_to_save .*word_embeddings"):
        build_classifier(_config(bert.dir, f"lora.plus_ratio={ratio}", "lora.modules_to_save=word_embeddings"),
                       jax.random.key(0), shapes_only=True)
    plan = build.plan(model, params, "").splitlines()  # --dry-run: B and m are LoRA, not modules trained in full
    assert plan[-1] == "trained in full: head (130 params)" and "2,304 params, DoRA magnitudes included" in plan[2]


def test_pissa_init_is_peft_pissa_and_exports_on_the_original_base(fam, tmp_path):
    """lora.init=pissa on the nn.Linear-layout kernels of BERT, Qwen3 and ModernBERT (fused Wqkv): B·A and the
    residual equal PEFT's init_lora_weights="pissa" on the same checkpoint; export-peft --save-base writes the
    original base and the converted rank-2r adapter, which PeftModel.from_pretrained loads to our logits (factors
    moved off their init)."""
    from transformers import AutoModelForSequenceClassification

    cfg = _config(fam.dir, "lora.init=pissa")
    model, params = build_classifier(cfg, jax.random.key(0))
    family = model.family
    twin = peft.get_peft_model(copy.deepcopy(fam.torch), peft.LoraConfig(
        task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(family.default_targets),
        modules_to_save=list(family.trained_modules) or None, init_lora_weights="pissa"))
    theirs = {k: v.detach().numpy() for k, v in twin.named_parameters()}
    ours = hf_names.lora_to_peft(family, model.start)
    worst = {"B A": 0.0, "residual": 0.0}
    for key in (k for k in ours if ".lora_A." in k):  # B A: each singular pair's sign is LAPACK's choice
        kb = key.replace(".lora_A.", ".lora_B.")
        want = theirs[kb.replace(".weight", ".default.weight")] @ theirs[key.replace(".weight", ".default.weight")]
        worst["B A"] = max(worst["B A"], float(np.abs(ours[kb] @ ours[key] - want).max()))
        np.testing.assert_allclose(ours[kb] @ ours[key], want, atol=2e-5, err_msg=key)  # test_variants' bound
    residual = hf_names.base_to_torch(family, jax.tree.map(np.asarray, model.base))
    adapted = [k for k in residual if k.endswith(tuple(f"{t}.weight" for t in family.default_targets))]
    assert len(adapted) == 2 * len(family.default_targets) and sum(".lora_A." in k for k in ours) == len(adapted)
    for key in adapted:
        got = theirs["base_model.model." + key.replace(".weight", ".base_layer.weight")]
        worst["residual"] = max(worst["residual"], float(np.abs(residual[key] - got).max()))
        np.testing.assert_allclose(residual[key], got, atol=2e-5, err_msg=key)
    moved = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(3), v.shape), params["lora"])
    params = {**params, "lora": moved}
    out = export.write_peft_adapter(cfg, model, params, tmp_path / "adapter", save_base=True)
    loaded = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(out / "base"),
                                            out).eval()
    assert loaded.peft_config["default"].r == 2 * RANK
    err = np.abs(_torch_logits(loaded, fam.split) - _jax_logits(model, params, fam.split)).max()
    print(f"{fam.name}: PiSSA max abs err B A {worst['B A']:.2e}, residual {worst['residual']:.2e}, "
          f"exported logits {err:.2e}")
    assert err <= ROUND_TRIP_ATOL, err
