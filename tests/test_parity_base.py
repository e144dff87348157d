"""Parity of the GPT-2 base and the classifier head with transformers' PyTorch GPT2Model (fp32, CPU).

Weights are created on one side and moved with the library's converter (lora_kd_jax.models.hf_names): tiny model Flax -> torch, gpt2-size
torch -> Flax. A perturbation test proves the tolerance bites.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch_reference as ref_lib  # noqa: E402
from tiny import make_mixed_length_batch, parity_config  # noqa: E402

from lora_kd_jax.models import hf_names as convert  # noqa: E402
from lora_kd_jax.core.config import load_config  # noqa: E402
from lora_kd_jax.models.build import arch_of, build_classifier  # noqa: E402
from lora_kd_jax.models.classifier import Classifier, base_shapes  # noqa: E402
from lora_kd_jax.models.families import GPT2  # noqa: E402
from lora_kd_jax.models.resolve import resolve  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")

# fp32 rounding through 2 blocks on unit-scale hidden states: observed 1.3e-6; 5e-6 leaves ~4x margin.
TINY_ATOL = 5e-6
# 12 blocks accumulate more fp32 rounding (different summation orders in XLA and torch): observed 5e-6.
GPT2_ATOL = 3e-5
LENGTHS = (20, 13, 7, 1, 16, 3)  # right-padded rows of mixed length, incl. a 1-token row and a full row


_JITTED: dict[int, tuple] = {}


def jax_outputs(model: Classifier, params: dict, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """(hidden states after ln_f, head logits) from the JAX model, jitted like the training code."""
    if id(model) not in _JITTED:  # one compile per model (the module is a static closure)
        def f(p, ids, mask):
            return (model.base_outputs(p["gpt2"], ids, mask)[0],
                    model.logits(p, ids, mask, deterministic=True))

        _JITTED[id(model)] = (model, jax.jit(f))
    h, logits = _JITTED[id(model)][1](params, batch["input_ids"], batch["attention_mask"])
    return np.asarray(h), np.asarray(logits)


def torch_outputs(ref: ref_lib.ReferenceClassifier, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = ref_lib.tensors(batch)
    with torch.no_grad():
        return ref.hidden(ids, mask).numpy(), ref(ids, mask).numpy()


def base_errors(jax_out: tuple, torch_out: tuple, batch: dict) -> tuple[float, float]:
    """(max |dh| over non-pad positions, max |d logits|)."""
    real = batch["attention_mask"].astype(bool)
    dh = np.abs(jax_out[0] - torch_out[0])[real]
    return float(dh.max()), float(np.abs(jax_out[1] - torch_out[1]).max())


def assert_base_parity(jax_out: tuple, torch_out: tuple, batch: dict, atol: float) -> tuple[float, float]:
    err_h, err_l = base_errors(jax_out, torch_out, batch)
    assert err_h <= atol, f"hidden states differ by {err_h:.3g} > {atol:g} on a non-pad position"
    assert err_l <= atol, f"logits differ by {err_l:.3g} > {atol:g}"
    return err_h, err_l


@pytest.fixture(scope="module")
def tiny_pair():
    """(JAX classifier, its params, torch reference holding the same weights moved Flax -> torch)."""
    model, params = build_classifier(parity_config(), jax.random.key(0), with_lora=False)
    params = ref_lib.randomize_layernorms(params, seed=1)
    ref = ref_lib.build_reference(model.arch, params["gpt2"], params["head"]).eval()
    return model, params, ref


def test_pinned_numerics_agree(tiny_pair):
    """Both sides read gelu_new (tanh approximation) and eps 1e-5 from the one config; Flax's module uses them."""
    model, _, ref = tiny_pair
    cfg = model.arch
    assert cfg.activation == "gelu_new" and cfg.norm_eps == 1e-5
    assert ref.transformer.config.activation_function == "gelu_new"
    assert ref.transformer.h[0].ln_1.eps == 1e-5
    assert ref.transformer.config._attn_implementation == "eager"


def test_tiny_hidden_states_and_logits_match_torch(tiny_pair):
    model, params, ref = tiny_pair
    batch = make_mixed_length_batch(LENGTHS, 20, seed=0)
    err_h, err_l = assert_base_parity(jax_outputs(model, params, batch), torch_outputs(ref, batch), batch, TINY_ATOL)
    print(f"tiny: max |dh| {err_h:.2e}, max |dlogits| {err_l:.2e} (atol {TINY_ATOL})")


def _perturb(params: dict, path: tuple, index: tuple, delta: float = 1e-3) -> dict:
    flat = {p: np.array(v) for p, v in convert.flatten(params).items()}
    flat[path][index] += delta
    return convert.unflatten(flat)


@pytest.mark.parametrize("path,index", [
    (("gpt2", "wte", "embedding"), "first-token"),
    (("gpt2", "wpe", "embedding"), (0, 5)),
    (("gpt2", "h", "0", "attn", "c_attn", "kernel"), (70, 3)),  # a key weight (rows 64..127 of q|k|v)
    (("gpt2", "h", "1", "mlp", "c_proj", "kernel"), (9, 100)),
    (("gpt2", "h", "1", "ln_2", "bias"), (17,)),
    (("gpt2", "ln_f", "scale"), (0,)),
    (("head", "kernel"), (0, 1)),
], ids=["wte", "wpe", "h0.c_attn", "h1.mlp.c_proj", "h1.ln_2.bias", "ln_f.scale", "head"])
def test_perturbed_weight_is_detected(tiny_pair, path, index):
    """One element changed by 1e-3 on the JAX side makes the tiny comparison fail: the tolerance bites."""
    model, params, ref = tiny_pair
    batch = make_mixed_length_batch(LENGTHS, 20, seed=0)
    if index == "first-token":
        index = (int(batch["input_ids"][0, 0]), 0)
    bad = _perturb(params, path, index)
    jax_out, torch_out = jax_outputs(model, bad, batch), torch_outputs(ref, batch)
    with pytest.raises(AssertionError, match="differ by"):
        assert_base_parity(jax_out, torch_out, batch, TINY_ATOL)
    print(f"{'/'.join(path)}{index}: errors {base_errors(jax_out, torch_out, batch)} vs atol {TINY_ATOL}")


def test_gpt2_size_random_weights_torch_to_flax():
    """gpt2 size (12 x 768), weights created by torch's GPT2Model init and moved torch -> Flax."""
    torch.manual_seed(0)
    model = Classifier(GPT2, arch_of(resolve(load_config(None, ["model.name=gpt2", "model.init=random"]))))
    ref = ref_lib.ReferenceClassifier(ref_lib.torch_config(model.arch)).eval()
    with torch.no_grad():  # non-trivial LayerNorms (see ref_lib.randomize_layernorms)
        for name, p in ref.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    params = {"gpt2": ref_lib.torch_gpt2_to_flax(ref.transformer.state_dict(),
                                                  like=base_shapes(GPT2, model.module)),
              "head": ref_lib.torch_head_to_flax(ref.score.weight)}
    batch = make_mixed_length_batch((20, 11, 1, 6), 20, seed=1)
    err_h, err_l = assert_base_parity(jax_outputs(model, params, batch), torch_outputs(ref, batch), batch, GPT2_ATOL)
    print(f"gpt2 size: max |dh| {err_h:.2e}, max |dlogits| {err_l:.2e} (atol {GPT2_ATOL})")


def test_head_init_matches_score_init():
    """The JAX head init (normal 0.02, no bias) has the scale of transformers' `score` init."""
    k = np.asarray(GPT2.head.init(jax.random.key(0), 768, 2, 0.02)["kernel"])
    assert k.shape == (768, 2)
    assert abs(k.std() - 0.02) < 0.002 and abs(k.mean()) < 0.002
