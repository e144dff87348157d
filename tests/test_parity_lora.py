"""LoRA parity with PyTorch: the original's U/V layer (seed init) and PEFT (standard init).

Outputs of the adapted model and the gradients of the mean cross-entropy w.r.t. every trainable leaf (LoRA
factors, every LayerNorm scale and bias, the head) against torch autograd; adapter dropout semantics; initial
distributions of the factors against torch's initialisers.
"""
from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
import torch_reference as ref_lib  # noqa: E402
from tiny import make_mixed_length_batch, parity_config  # noqa: E402
from peft import get_peft_model_state_dict  # noqa: E402

from lora_kd_jax.models import hf_names as convert  # noqa: E402
from lora_kd_jax.lora import transform as lora_lib  # noqa: E402
from lora_kd_jax.models.build import build_classifier  # noqa: E402
from lora_kd_jax.models.classifier import Classifier  # noqa: E402
from lora_kd_jax.models.families import GPT2  # noqa: E402
from lora_kd_jax.training.state import combine, partition  # noqa: E402
from lora_kd_jax.training.steps import cross_entropy_objective, loss_and_sums  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")

# Relative to each leaf's largest entry (ref_lib.max_rel_err). Observed ~1e-7 (logits) and <= ~1e-6
# (gradients: fp32 rounding of sums in different orders); 5e-6 keeps a margin under the 1e-5 ceiling.
OUTPUT_RTOL = 5e-6
GRAD_RTOL = 5e-6
RANK, ALPHA = 4, 8.0  # alpha != rank, so a missing alpha/r scale (2) cannot pass the standard-init test
LENGTHS = (20, 9, 1, 14, 5, 17)


def jax_logits_loss_grads(model: Classifier, params: dict, batch: dict):
    """(hidden states, logits, mean CE, grads of mean CE w.r.t. the trainable partition), dropout off."""
    trainable, frozen = partition(params, model.param_labels(params))

    @jax.jit
    def f(tr, frozen, b):
        def loss(t):
            return loss_and_sums(model, combine(t, frozen), {}, b, cross_entropy_objective, deterministic=True,
                                 rng=None)[0]

        full = combine(tr, frozen)
        with lora_lib.lora_context(model.spec, full["lora"]):
            hidden = model.base_outputs(full["gpt2"], b["input_ids"], b["attention_mask"])[0]
        logits = model.logits(full, b["input_ids"], b["attention_mask"], deterministic=True)
        value, grads = jax.value_and_grad(loss)(tr)
        return hidden, logits, value, grads

    out = f(trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
    return jax.tree.map(np.asarray, out)


def torch_logits_loss_grads(ref: torch.nn.Module, batch: dict):
    ref.zero_grad(set_to_none=True)
    ids, mask = ref_lib.tensors(batch)
    with torch.no_grad():
        hidden = ref.hidden(ids, mask).numpy()
        logits = ref(ids, mask).numpy()
    loss = ref_lib.ce_loss(ref, batch)
    loss.backward()
    return hidden, logits, loss.item(), ref_lib.as_flax(ref, grads=True)


def _seed_pair():
    cfg = parity_config("lora.init=seed", "lora.dropout=0.0", f"lora.rank={RANK}")
    model, params = build_classifier(cfg, jax.random.key(0))
    params = ref_lib.randomize_layernorms(params, seed=2)
    ref = ref_lib.build_reference(model.arch, params["gpt2"], params["head"])  # Flax -> torch
    ref_lib.add_seed_lora(ref, RANK, 0.0, factors=params["lora"])
    return model, params, ref


def _peft_pair():
    cfg = parity_config("lora.init=standard", "lora.dropout=0.0", f"lora.rank={RANK}", f"lora.alpha={ALPHA}")
    model, params = build_classifier(cfg, jax.random.key(0))
    params = ref_lib.randomize_layernorms(params, seed=3)
    ref = ref_lib.build_reference(model.arch, params["gpt2"], params["head"])
    peft_model = ref_lib.add_peft_lora(ref, RANK, ALPHA, 0.0)
    torch.manual_seed(0)
    with torch.no_grad():  # PEFT's B starts at zero; random B makes the B path (and its gradient) non-trivial
        for name, p in ref.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.1)
    lora = convert.lora_from_peft(GPT2, get_peft_model_state_dict(peft_model), spec=model.spec)  # torch -> Flax
    convert.check_shapes(lora, params["lora"], "PEFT factors vs JAX init")
    params = {**params, "lora": lora}
    assert model.spec.scale == ALPHA / RANK == peft_model.peft_config["default"].lora_alpha / RANK
    return model, params, ref


@pytest.mark.parametrize("init", ["seed", "standard"])
def test_lora_outputs_and_gradients_match_torch(init):
    """Adapted-model outputs and d(mean CE)/d(every trainable leaf) equal torch autograd's (PEFT for standard)."""
    model, params, ref = _seed_pair() if init == "seed" else _peft_pair()
    batch = make_mixed_length_batch(LENGTHS, 20, seed=4)
    h_j, logits_j, loss_j, grads_j = jax_logits_loss_grads(model, params, batch)
    h_t, logits_t, loss_t, grads_t = torch_logits_loss_grads(ref, batch)
    real = batch["attention_mask"].astype(bool)
    err_h = ref_lib.max_rel_err(h_j[real], h_t[real])
    err_l = ref_lib.max_rel_err(logits_j, logits_t)
    assert err_h <= OUTPUT_RTOL and err_l <= OUTPUT_RTOL, (err_h, err_l)
    assert abs(loss_j - loss_t) <= OUTPUT_RTOL * abs(loss_t), (loss_j, loss_t)
    # the same trainable set on both sides: the trees must have the same leaves (checked in tree_rel_errs)
    errs = ref_lib.tree_rel_errs(grads_j, grads_t)
    n_ln = sum("ln_" in k for k in errs)
    assert n_ln == 2 * (2 * 2 + 1) and sum(k.startswith("lora/") for k in errs) == 2 * 4 * 2 and "head/kernel" in errs
    worst = max(errs, key=errs.get)
    assert errs[worst] <= GRAD_RTOL, f"{worst}: gradient rel err {errs[worst]:.3g} > {GRAD_RTOL}"
    print(f"{init}: hidden {err_h:.2e}, logits {err_l:.2e}, loss {abs(loss_j - loss_t) / loss_t:.2e}, "
          f"worst grad {worst} {errs[worst]:.2e}")


def test_gradient_comparison_bites():
    """Grads taken with one LoRA factor element moved by 1e-3 no longer pass: the gradient tolerance is tight."""
    model, params, ref = _seed_pair()
    batch = make_mixed_length_batch(LENGTHS, 20, seed=4)
    flat = {p: np.array(v) for p, v in convert.flatten(params).items()}
    flat[("lora", "h", "1", "mlp", "c_fc", "a")][3, 1] += 1e-3
    grads_j = jax_logits_loss_grads(model, convert.unflatten(flat), batch)[3]
    errs = ref_lib.tree_rel_errs(grads_j, torch_logits_loss_grads(ref, batch)[3])
    assert max(errs.values()) > GRAD_RTOL, errs


# ------------------------------------------------------------------------------------------ dropout

DROPOUT = 0.1
N_MASKS = 2000
FAMILY_ALPHA = 1e-6  # chance that the fixed-seed test would fail for a correct implementation (union bound)
TARGET = ("h", "0", "attn", "c_attn")  # the first adapted layer: its input (ln_1 of layer 0) has no dropout


def _capture(model: Classifier, params: dict, batch: dict, key, deterministic: bool):
    """(input of TARGET, output of TARGET incl. the LoRA term) through the real model and lora_context."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    def keep(mdl, method):
        return method == "__call__" and mdl.path in (TARGET, TARGET[:2] + ("ln_1",))

    with lora_lib.lora_context(model.spec, params["lora"], rng=key, deterministic=deterministic):
        _, state = model.module.apply({"params": params["gpt2"]}, ids, mask, positions, deterministic=True,
                                      capture_intermediates=keep, mutable=["intermediates"])
    inter = state["intermediates"]["h"]["0"]
    return inter["ln_1"]["__call__"][0], inter["attn"]["c_attn"]["__call__"][0]


def test_adapter_dropout_is_unbiased_with_the_right_variance():
    """Inverted dropout on the adapter input: over many masks, the mean layer output equals the dropout-off
    output (z-test, union bound) and the variance equals p/(1-p) * sum_i x_i^2 W_ij^2 (so p and the 1/(1-p)
    rescaling are right). Tested at the adapted layer, where the output is linear in the mask; the network's
    final output is not (E f(X) != f(E X) through GELU/LayerNorm), so its mean is not expected to match.
    """
    cfg = parity_config("lora.init=seed", f"lora.dropout={DROPOUT}", f"lora.rank={RANK}")
    model, params = build_classifier(cfg, jax.random.key(0))
    batch = make_mixed_length_batch((12, 5), 12, seed=5)
    x, off = _capture(model, params, batch, None, True)
    keys = jax.random.split(jax.random.key(6), N_MASKS)
    samples = jax.jit(jax.vmap(lambda k: _capture(model, params, batch, k, False)[1]))(keys)
    samples, x, off = np.asarray(samples, np.float64), np.asarray(x, np.float64), np.asarray(off, np.float64)
    f = params["lora"]["h"]["0"]["attn"]["c_attn"]
    w = np.asarray(f["a"], np.float64) @ np.asarray(f["b"], np.float64)  # (in, out), seed scale 1
    var = DROPOUT / (1 - DROPOUT) * (x ** 2) @ (w ** 2)  # exact per-element variance of one masked output
    z = (samples.mean(0) - off) / np.sqrt(var / N_MASKS)
    z_bound = NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * z.size))  # Bonferroni over all elements
    assert np.abs(z).max() <= z_bound, f"max |z| {np.abs(z).max():.2f} > {z_bound:.2f}: mean != dropout-off output"
    ratio = samples.var(0, ddof=1).mean() / var.mean()
    # a sample variance from N draws has relative sd ~ sqrt(2 / (N - 1)) = 0.032; 5 sd
    var_tol = 5 * math.sqrt(2 / (N_MASKS - 1))
    assert abs(ratio - 1) <= var_tol, f"variance ratio {ratio:.3f}: dropout rate or rescaling is wrong"
    print(f"dropout: max |z| {np.abs(z).max():.2f} (bound {z_bound:.2f}), variance ratio {ratio:.4f} "
          f"(tol {var_tol:.3f})")


def test_adapter_dropout_is_off_in_eval():
    """deterministic=True gives exactly the dropout-off output (and the torch reference in eval mode)."""
    cfg = parity_config("lora.init=seed", f"lora.dropout={DROPOUT}", f"lora.rank={RANK}")
    model, params = build_classifier(cfg, jax.random.key(0))
    no_dropout = dataclasses.replace(model, spec=dataclasses.replace(model.spec, dropout=0.0))
    batch = make_mixed_length_batch(LENGTHS, 20, seed=7)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    key = jax.random.key(8)
    evaluated = np.asarray(model.logits(params, ids, mask, deterministic=True, rng=key))
    reference = np.asarray(no_dropout.logits(params, ids, mask, deterministic=True))
    trained = np.asarray(model.logits(params, ids, mask, deterministic=False, rng=key))
    np.testing.assert_array_equal(evaluated, reference)
    assert np.abs(trained - reference).max() > 1e-4  # the same call in train mode does drop
    ref = ref_lib.build_reference(model.arch, params["gpt2"], params["head"])
    ref_lib.add_seed_lora(ref, RANK, DROPOUT, factors=params["lora"]).eval()
    with torch.no_grad():
        torch_eval = ref(*ref_lib.tensors(batch)).numpy()
    assert ref_lib.max_rel_err(evaluated, torch_eval) <= OUTPUT_RTOL


# ------------------------------------------------------------------------------------------ init


def _uniform_bound_ok(x: np.ndarray, bound: float) -> bool:
    """Every entry within the bound, and the largest near it (>= 256 uniform draws: max < 0.9 bound has
    probability 0.9^256 ~ 2e-12)."""
    m = np.abs(x).max()
    return m <= bound * (1 + 1e-6) and m >= 0.9 * bound


@pytest.mark.parametrize("init", ["seed", "standard"])
def test_factor_init_matches_torch_initialisers(init):
    """JAX init draws from the same distributions as torch's: xavier_uniform_ U, V (seed); PEFT's
    kaiming_uniform_(a=sqrt 5) A (bound 1/sqrt(in)) and zero B (standard)."""
    overrides = [f"lora.init={init}", f"lora.rank={RANK}", f"lora.alpha={ALPHA}"]
    model, params = build_classifier(parity_config(*overrides), jax.random.key(9))
    ref = ref_lib.build_reference(model.arch, params["gpt2"], params["head"])
    torch.manual_seed(9)
    if init == "seed":
        ref_lib.add_seed_lora(ref, RANK, 0.0)
    else:
        ref_lib.add_peft_lora(ref, RANK, ALPHA, 0.0)
    torch_factors = ref_lib.as_flax(ref)["lora"]
    for path, (d_in, d_out) in zip(model.spec.paths, model.spec.shapes):
        for side, factors in (("jax", params["lora"]), ("torch", torch_factors)):
            f = factors
            for p in path:
                f = f[p]
            a, b = np.asarray(f["a"]), np.asarray(f["b"])
            if init == "seed":
                ok = (_uniform_bound_ok(a, math.sqrt(6 / (d_in + RANK)))
                      and _uniform_bound_ok(b, math.sqrt(6 / (d_out + RANK))))
            else:
                ok = _uniform_bound_ok(a, 1 / math.sqrt(d_in)) and not b.any()
            assert ok, f"{side} {'.'.join(path)}: a max {np.abs(a).max():.4f}, b max {np.abs(b).max():.4f}"


@pytest.mark.parametrize("init", ["seed", "standard"])
def test_merged_export_runs_in_transformers_classifier(init):
    """Classifier.merged -> ref_lib.flax_classifier_to_torch -> transformers' GPT2ForSequenceClassification
    gives the factored adapted model's logits (the teacher export path)."""
    from transformers import GPT2ForSequenceClassification

    model, params, _ = _seed_pair() if init == "seed" else _peft_pair()
    batch = make_mixed_length_batch(LENGTHS, 20, seed=15)
    factored = np.asarray(model.logits(params, batch["input_ids"], batch["attention_mask"]))
    cfg = ref_lib.torch_config(model.arch)
    cfg.pad_token_id, cfg.num_labels = 50256, 2
    hf = GPT2ForSequenceClassification(cfg).eval()
    sd = ref_lib.flax_classifier_to_torch(jax.tree.map(np.asarray, model.merged(params)))
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    ids, mask = ref_lib.tensors(batch)
    with torch.no_grad():
        exported = hf(input_ids=ids, attention_mask=mask).logits.numpy()
    err = ref_lib.max_rel_err(exported, factored)
    assert err <= OUTPUT_RTOL, err
    print(f"merged export {init}: logits rel err {err:.2e}")
