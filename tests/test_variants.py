"""The LoRA variants (rsLoRA, DoRA, LoRA+, PiSSA, OLoRA) against PyTorch + PEFT on the same tiny GPT-2 weights.

One module-scoped base (a saved random 2-layer GPT-2) serves every test. Per variant: logits and the gradients of
every trainable leaf against PEFT's autograd (factors with non-zero B and non-unit DoRA magnitudes, so that every
term of the variant matters); 30 Adam steps against torch.optim.Adam (LoRA+: PEFT's create_loraplus_optimizer);
round trips: our adapter -> export-peft -> PEFT, a PEFT-trained adapter -> import-peft, merge -> the same logits.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
import torch_reference as ref_lib  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402
from peft.optimizers import create_loraplus_optimizer  # noqa: E402
from tiny import make_mixed_length_batch, parity_config  # noqa: E402
from transformers import GPT2ForSequenceClassification  # noqa: E402

from lora_kd_jax.core.config import ConfigError  # noqa: E402
from lora_kd_jax.core.keys import classifier_base_key  # noqa: E402
from lora_kd_jax.data import EncodedSplit, batch_iterator, num_batches  # noqa: E402
from lora_kd_jax.interop import export  # noqa: E402
from lora_kd_jax.lora import decompose  # noqa: E402
from lora_kd_jax.models import hf_names as convert  # noqa: E402
from lora_kd_jax.models.families import GPT2  # noqa: E402
from lora_kd_jax.models.build import build_classifier  # noqa: E402
from lora_kd_jax.models.interface import LORA, LORA_B, NORM  # noqa: E402
from lora_kd_jax.training.state import train_state  # noqa: E402
from lora_kd_jax.training.steps import cross_entropy_objective, make_train_step  # noqa: E402
from test_parity_lora import GRAD_RTOL, OUTPUT_RTOL, jax_logits_loss_grads, torch_logits_loss_grads  # noqa: E402
from test_parity_train import FORWARD_ATOL, LOSS_RTOL, PARAM_ATOL  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")

RANK, ALPHA = 4, 8.0
ROUND_TRIP_ATOL = 1e-4  # the bound for JAX -> PEFT logits (observed ~1e-6)
VARIANTS = {  # name -> our lora.* overrides; PEFT's LoraConfig follows from them (`_peft_config`)
    "rslora": ("lora.scaling=rslora",),
    "dora": ("lora.variant=dora",),
    "dora_rslora": ("lora.variant=dora", "lora.scaling=rslora"),
    "pissa_dora": ("lora.init=pissa", "lora.variant=dora"),
    "olora": ("lora.init=olora",),
}
LENGTHS = (20, 9, 1, 14, 5, 17)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved random GPT-2 whose Conv1D biases are not zero (DoRA's output subtracts the bias: zeros would hide it)."""
    from tiny import save_random_checkpoint

    def biased(params):
        rng = np.random.default_rng(4)
        flat = {p: np.asarray(v) for p, v in convert.flatten(params).items()}
        for path, v in flat.items():
            if path[0] == "gpt2" and path[-1] == "bias" and not any(s.startswith("ln_") for s in path):
                flat[path] = (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
        return convert.unflatten(flat)

    d = tmp_path_factory.mktemp("variants_base")
    save_random_checkpoint(parity_config(), d, seed=3, edit=biased)
    return d


def _cfg(base_dir, *overrides):
    return parity_config("model.init=pretrained", f"model.path={base_dir}", "lora.init=standard",
                         f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "lora.dropout=0.0", *overrides)


def _build(base_dir, name: str, *more: str, moved: bool = True):
    """(cfg, model, params) of a variant, with random LayerNorms and, when `moved`, non-zero B and magnitudes
    off their init (so the variant's every term is exercised)."""
    cfg = _cfg(base_dir, *VARIANTS[name], *more)
    model, params = build_classifier(cfg, jax.random.key(0), base_key=classifier_base_key(cfg))
    params = ref_lib.randomize_layernorms(jax.tree.map(np.asarray, params), seed=5)
    if moved:
        rng = np.random.default_rng(6)
        flat = convert.flatten(params["lora"])
        for path, v in flat.items():
            if path[-1] == "b":
                flat[path] = v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
            elif path[-1] == "m":
                flat[path] = v * (1 + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
        params["lora"] = convert.unflatten(flat)
    return cfg, model, params


def _peft_config(cfg, **kw) -> LoraConfig:
    lc = cfg.lora
    return LoraConfig(r=lc.rank, lora_alpha=lc.alpha, target_modules=ref_lib.PEFT_TARGET_MODULES, fan_in_fan_out=True,
                      lora_dropout=0.0, bias="none", use_rslora=lc.scaling == "rslora", use_dora=lc.variant == "dora",
                      init_lora_weights=lc.init if lc.init == "pissa" else True, **kw)


def _reference(model, params, base):
    """The reference classifier over `base` with our LayerNorms and head (PEFT goes on top of it)."""
    return ref_lib.build_reference(model.arch, _with_norms(base, params["gpt2"]), params["head"])


def _with_norms(base, gpt2_params):
    """`base` with the LayerNorms of `gpt2_params`."""
    flat = dict(convert.flatten(base))
    flat.update({p: v for p, v in convert.flatten(gpt2_params).items() if any(s.startswith("ln_") for s in p)})
    return convert.unflatten(flat)


def _torch(sd):
    return {k: torch.from_numpy(v) for k, v in sd.items()}


def _batch(seed=0):
    return make_mixed_length_batch(LENGTHS, 20, seed=seed)


def _original_base(cfg):
    plain = build_classifier(cfg, classifier_base_key(cfg), base_key=classifier_base_key(cfg), with_lora=False)[0]
    return jax.tree.map(np.asarray, plain.base)


# ---------------------------------------------------------------------------------------- forward, gradients


@pytest.mark.parametrize("name", ["rslora", "dora", "dora_rslora", "pissa_dora"])
def test_forward_and_gradients_match_peft(name, base_dir):
    cfg, model, params = _build(base_dir, name)
    base = _original_base(cfg)
    ref = _reference(model, params, base)
    peft_model = get_peft_model(ref, _peft_config(cfg))
    if cfg.lora.init == "pissa":  # PEFT factorised the same base itself: its factors and residual are ours
        theirs = {k: v.detach().numpy() for k, v in peft_model.state_dict().items()}
        ours = convert.lora_to_peft(GPT2, model.start, adapter_name="default")
        for key in (k for k in ours if ".lora_A." in k):  # B A: each singular pair's sign is LAPACK's choice
            kb = key.replace(".lora_A.", ".lora_B.")
            np.testing.assert_allclose(ours[kb] @ ours[key], theirs[kb] @ theirs[key], atol=2e-5, err_msg=key)
        residual = ref_lib.flax_gpt2_to_torch(jax.tree.map(np.asarray, model.base))
        for key, v in residual.items():
            if key.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
                got = theirs[convert.PEFT_PREFIX + "transformer." + key.replace(".weight", ".base_layer.weight")]
                np.testing.assert_allclose(v, got, atol=2e-5, err_msg=key)  # seen 2.3e-6
        # from here on both sides hold our residual (bit for bit), so only the variant's arithmetic is compared
        params["gpt2"] = _with_norms(jax.tree.map(np.asarray, model.base), params["gpt2"])
        for n, p in peft_model.base_model.model.transformer.named_parameters():
            plain = n.replace(".base_layer.", ".")
            if n.endswith(".base_layer.weight"):  # the adapted kernels (biases and LayerNorms are not decomposed)
                p.data.copy_(torch.from_numpy(residual[plain]))
    set_peft_model_state_dict(peft_model, _torch(convert.lora_to_peft(GPT2, params["lora"])))
    ref_lib.set_trainable(ref)
    batch = _batch()
    _, j_logits, j_loss, j_grads = jax_logits_loss_grads(model, jax.tree.map(jnp.asarray, params), batch)
    _, t_logits, t_loss, t_grads = torch_logits_loss_grads(ref, batch)
    assert ref_lib.max_rel_err(j_logits, t_logits) <= OUTPUT_RTOL
    errs = ref_lib.tree_rel_errs(j_grads, t_grads)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= GRAD_RTOL, f"{name}: {worst} grad rel err {errs[worst]:.2e}"
    if cfg.lora.variant == "dora":
        assert any(k.endswith("/m") for k in errs)
    print(f"{name}: logits {ref_lib.max_rel_err(j_logits, t_logits):.1e}, worst grad {worst} {errs[worst]:.1e}")


def test_olora_factors_are_peft_olora_on_the_out_in_weight():
    """PEFT's olora_init on an nn.Linear (weight (out, in)) gives our factors and residual (PEFT cannot run it on
    GPT-2's Conv1D: it ignores fan_in_fan_out)."""
    w = np.random.default_rng(0).standard_normal((48, 16)).astype(np.float32)
    lin = torch.nn.Sequential(torch.nn.Linear(16, 48, bias=False))
    lin[0].weight.data.copy_(torch.from_numpy(w))
    p = get_peft_model(lin, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights="olora"))
    layer = p.base_model.model[0]
    A, B = decompose.factorise(jnp.asarray(w), 3, 2.0, "olora")
    np.testing.assert_allclose(np.asarray(A), layer.lora_A["default"].weight.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(B), layer.lora_B["default"].weight.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(w - 2.0 * np.asarray(B @ A), layer.base_layer.weight.detach().numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------------- trajectories


def _dataset() -> EncodedSplit:
    rng = np.random.default_rng(10)
    b = make_mixed_length_batch(rng.integers(1, 21, 20).tolist(), 20, seed=11)
    return EncodedSplit(b["input_ids"], b["attention_mask"], b["labels"], n_truncated=0)


@pytest.mark.parametrize("name,plus", [("dora", 1.0), ("dora_rslora", 4.0)])
def test_thirty_adam_steps_match_peft(name, plus, base_dir):
    """30 Adam steps (lr 1e-3, batch 8) of our train step against torch.optim.Adam over PEFT's model; with LoRA+
    (plus_ratio 4), PEFT's create_loraplus_optimizer, and the per-group rates read from our optimizer state."""
    steps, lr, batch_size = 30, 1e-3, 8
    cfg, model, params = _build(base_dir, name, f"lora.plus_ratio={plus}", f"train.lr={lr}", moved=False)
    ref = _reference(model, params, _original_base(cfg))
    peft_model = get_peft_model(ref, _peft_config(cfg))
    set_peft_model_state_dict(peft_model, _torch(convert.lora_to_peft(GPT2, params["lora"])))
    ref_lib.set_trainable(ref)
    setup = train_state(model, jax.tree.map(jnp.asarray, params), cfg.train, jax.random.key(14))
    if plus != 1.0:
        inner = setup.state.opt_state.inner_states
        rates = {g: float(inner[g].inner_state.hyperparams["learning_rate"]) for g in (LORA, LORA_B, NORM, "head")}
        assert rates == pytest.approx({LORA: lr, LORA_B: plus * lr, NORM: plus * lr, "head": lr}, rel=1e-7), rates
        opt = create_loraplus_optimizer(peft_model, torch.optim.Adam, lr=lr, loraplus_lr_ratio=plus)
    else:
        opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=lr)
    state, frozen = setup.state, setup.frozen
    step = make_train_step(model, setup.tx, cross_entropy_objective)
    split = _dataset()
    per_epoch = num_batches(len(split), batch_size)
    jl, tl = [], []
    for epoch in range(steps // per_epoch):
        for batch in batch_iterator(split, batch_size, shuffle=True, seed=0, epoch=epoch):
            state, sums = step(state, {"frozen": frozen}, batch)
            jl.append(float(sums["loss_sum"] / sums["count"]))
            opt.zero_grad(set_to_none=True)
            loss = ref_lib.ce_loss(ref, batch)
            loss.backward()
            opt.step()
            tl.append(loss.item())
    jl, tl = np.array(jl), np.array(tl)
    err = np.abs(jl - tl) / np.abs(tl)
    assert len(jl) == steps and err.max() <= LOSS_RTOL, f"{name}: step {err.argmax()} loss rel err {err.max():.2e}"
    assert tl[-per_epoch:].mean() < tl[:per_epoch].mean()
    errs = ref_lib.tree_abs_errs(jax.tree.map(np.asarray, state.trainable), ref_lib.as_flax(ref, trainable_only=True))
    worst = max(errs, key=errs.get)
    assert errs[worst] <= PARAM_ATOL, f"{name}: {worst} |dparam| {errs[worst]:.2e}"
    ids, mask = split.input_ids, split.attention_mask
    final = ref_lib.as_flax(ref)
    final["gpt2"] = _with_norms(jax.tree.map(np.asarray, frozen["gpt2"]), final["gpt2"])
    with torch.no_grad():
        t_logits = ref(*ref_lib.tensors({"input_ids": ids, "attention_mask": mask})).numpy()
    fwd = float(np.abs(np.asarray(model.logits(jax.tree.map(jnp.asarray, final), ids, mask)) - t_logits).max())
    assert fwd <= FORWARD_ATOL, fwd
    print(f"{name} plus={plus}: loss rel err {err.max():.1e}, worst param {worst} {errs[worst]:.1e}, fwd {fwd:.1e}")


# --------------------------------------------------------------------------------------------- round trips


def _hf(base_dir):
    torch.manual_seed(0)
    return GPT2ForSequenceClassification.from_pretrained(str(base_dir)).eval()


def _logits(model, params, batch):
    return np.asarray(jax.jit(model.logits)(jax.tree.map(jnp.asarray, params), batch["input_ids"],
                                            batch["attention_mask"]))


def _hf_inputs(batch):
    ids, mask = ref_lib.tensors(batch)
    return {"input_ids": ids, "attention_mask": mask}


def _torch_logits(m, batch):
    with torch.no_grad():
        return m(**_hf_inputs(batch)).logits.numpy()


@pytest.mark.parametrize("name", ["dora_rslora", "pissa_dora", "olora"])
def test_round_trips_export_import_merge(name, base_dir, tmp_path):
    cfg, model, params = _build(base_dir, name)
    batch = _batch(2)
    ours = _logits(model, params, batch)
    # merge: the plain kernels compute the adapter's function (JAX), and plain transformers loads them (PyTorch)
    merged = model.merged(jax.tree.map(jnp.asarray, params))
    assert np.abs(_logits(model, merged, batch) - ours).max() <= ROUND_TRIP_ATOL
    export.save_merged(cfg, model, params, tmp_path / "merged")
    assert np.abs(_torch_logits(_hf(tmp_path / "merged"), batch) - ours).max() <= ROUND_TRIP_ATOL
    # JAX -> PEFT: PeftModel.from_pretrained on the original base reproduces our logits
    out = export.write_peft_adapter(cfg, model, params, tmp_path / "adapter", base_model=str(base_dir))
    peft_model = PeftModel.from_pretrained(_hf(base_dir), str(out), is_trainable=True)
    peft_model.eval()
    err = float(np.abs(_torch_logits(peft_model, batch) - ours).max())
    assert err <= ROUND_TRIP_ATOL, f"{name}: export-peft -> PEFT logits differ by {err:.2e}"
    pc = peft_model.peft_config["default"]
    decomposed = cfg.lora.init in ("pissa", "olora")
    assert (pc.use_dora, pc.use_rslora) == (cfg.lora.variant == "dora", cfg.lora.scaling == "rslora")
    assert pc.r == (2 * RANK if decomposed else RANK) and pc.init_lora_weights is True
    # PEFT trains it on (B non-zero, magnitudes off 1), saves it; import-peft gives PEFT's logits
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.from_numpy(batch["labels"].astype(np.int64))
    peft_model.train()
    for _ in range(3):
        opt.zero_grad()
        peft_model(**_hf_inputs(batch), labels=labels).loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "trained"))
    theirs = _torch_logits(peft_model, batch)
    cfg2, model2, params2 = export.import_peft(tmp_path / "trained", _cfg(base_dir))
    assert (cfg2.lora.variant, cfg2.lora.scaling) == (cfg.lora.variant, cfg.lora.scaling)
    err = float(np.abs(_logits(model2, params2, batch) - theirs).max())
    assert err <= ROUND_TRIP_ATOL and float(np.abs(theirs - ours).max()) > 1e-3, err
    if cfg.lora.variant == "dora":
        m = np.concatenate([np.asarray(v) for k, v in convert.flatten(params2["lora"]).items() if k[-1] == "m"])
        assert np.abs(m - np.concatenate([np.asarray(v) for k, v in convert.flatten(params["lora"]).items()
                                          if k[-1] == "m"])).max() > 1e-4  # PEFT moved the magnitudes


def test_peft_pissa_adapter_imports_in_peft_form(base_dir, tmp_path):
    """An adapter saved in PEFT's own PiSSA form (init_lora_weights "pissa") imports as lora.init=pissa: the base
    is factorised again on import, as PEFT does on load."""
    cfg = _cfg(base_dir, *VARIANTS["pissa_dora"])
    peft_model = get_peft_model(_hf(base_dir), _peft_config(cfg, task_type="SEQ_CLS"))
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(3)
    for _ in range(2):
        opt.zero_grad()
        peft_model(**_hf_inputs(batch), labels=torch.from_numpy(batch["labels"].astype(np.int64))).loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "pissa"))
    cfg2, model2, params2 = export.import_peft(tmp_path / "pissa", _cfg(base_dir))
    assert (cfg2.lora.init, cfg2.lora.variant) == ("pissa", "dora")
    err = float(np.abs(_logits(model2, params2, batch) - _torch_logits(peft_model, batch)).max())
    assert err <= ROUND_TRIP_ATOL, err


def test_refusals_name_the_combination(base_dir):
    with pytest.raises(ConfigError, match="lora.scaling=rslora with lora.init=seed"):
        parity_config("lora.init=seed", "lora.scaling=rslora")
    with pytest.raises(ConfigError, match="lora.rank=65 with lora.init=pissa"):
        build_classifier(_cfg(base_dir, "lora.init=pissa", "lora.rank=65"), jax.random.key(0))
    with pytest.raises(ConfigError, match="lora.plus_ratio: must be > 0"):
        parity_config("lora.plus_ratio=0")
    assert dataclasses.asdict(parity_config().lora)["plus_ratio"] == 1.0


def test_every_variant_at_once_trains_two_seeds_and_resumes(tmp_path):
    """PiSSA + DoRA + rsLoRA + LoRA+ with adapter dropout, two seeds at once through the real trainer: 1 epoch +
    --resume equals 2 epochs, metric for metric; each seed's best checkpoint evaluates to its recorded epoch."""
    import json

    from tiny import assert_resumed, log_messages, tiny_config

    from lora_kd_jax.commands import evaluation
    from lora_kd_jax.training import finetune

    every = ("lora.init=pissa", "lora.variant=dora", "lora.scaling=rslora", "lora.plus_ratio=4", "lora.dropout=0.1",
             "train.seeds=[0,1]", "data.limit=48", "train.batch_size=16")

    def cfg(run, epochs):
        return tiny_config(*every, f"train.epochs={epochs}", f"run.dir={run}")

    finetune.train_lora(cfg(tmp_path / "a", 2), progress=False)
    finetune.train_lora(cfg(tmp_path / "b", 1), progress=False)
    since = (tmp_path / "b" / "log.txt").stat().st_size
    finetune.train_lora(cfg(tmp_path / "b", 2), resume=True, progress=False)
    assert_resumed(log_messages(tmp_path / "b", since), from_step=3, to_step=6)  # 48 rows / 16 a epoch
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text())["epochs"] for r in "ab")
    assert len(a) == 2 and a == b
    for seed in (0, 1):
        record = json.loads((tmp_path / "b" / f"seed_{seed}" / "metrics.json").read_text())
        best = record["epochs"][record["summary"]["best_epoch"] - 1]["val"]
        report = evaluation.Predictor.from_run(tmp_path / "b" / f"seed_{seed}").evaluate("in_domain", limit=48)
        assert (report.accuracy, report.mcc, report.loss) == (best["accuracy"], best["mcc"], best["loss"])
