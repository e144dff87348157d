"""The one converter (lora_kd_jax.models.hf_names) on GPT-2: exact round trips, real transformers / PEFT layouts, and
errors that name the problem."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch_reference as ref_lib  # noqa: E402
from tiny import make_mixed_length_batch, parity_config  # noqa: E402

from lora_kd_jax.models import hf_names as convert  # noqa: E402
from lora_kd_jax.models.hf_names import ConversionError  # noqa: E402
from lora_kd_jax.models.build import build_classifier  # noqa: E402
from lora_kd_jax.models.classifier import base_shapes  # noqa: E402
from lora_kd_jax.models.families import GPT2  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")

# transformers' own GPT2ForSequenceClassification against ours (fp32 rounding, 2 blocks; observed ~1e-7).
HF_CLASSIFIER_ATOL = 5e-6


@pytest.fixture(scope="module")
def tiny():
    model, params = build_classifier(parity_config("lora.init=seed"), jax.random.key(0))
    return model, jax.tree.map(np.asarray, params)


def _bits_equal(a: dict, b: dict) -> None:
    fa, fb = convert.flatten(a, "/"), convert.flatten(b, "/")
    assert set(fa) == set(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x.view(np.uint32), y.view(np.uint32)), k


def test_base_round_trip_is_exact_and_loads_strictly(tiny):
    model, params = tiny
    sd = ref_lib.flax_gpt2_to_torch(params["gpt2"])
    torch_model = ref_lib.GPT2Model(ref_lib.torch_config(model.arch))
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    back = ref_lib.torch_gpt2_to_flax(torch_model.state_dict(), like=base_shapes(GPT2, model.module))
    _bits_equal(back, params["gpt2"])
    assert sd["h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D (in, out)
    with torch.no_grad():  # outputs own their memory: a later in-place update of torch weights does not leak
        torch_model.ln_f.weight.add_(1.0)
        torch_model.wte.weight.add_(1.0)
    _bits_equal(back, params["gpt2"])


def test_hf_sequence_classifier_layout_and_logits(tiny):
    """A GPT2ForSequenceClassification state dict (transformer. prefix, score.weight) both ways; its logits
    (pooled at the last non-pad token) equal ours on right-padded rows whose real ids are not the pad id."""
    from transformers import GPT2ForSequenceClassification

    model, params = tiny
    plain = {"gpt2": params["gpt2"], "head": params["head"]}
    cfg = ref_lib.torch_config(model.arch)
    cfg.pad_token_id, cfg.num_labels = 50256, 2
    hf = GPT2ForSequenceClassification(cfg).eval()
    sd = ref_lib.flax_classifier_to_torch(plain)
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    _bits_equal(ref_lib.torch_classifier_to_flax(hf.state_dict()), plain)
    batch = make_mixed_length_batch((20, 7, 1, 12), 20, seed=3)
    ids, mask = ref_lib.tensors(batch)
    with torch.no_grad():
        hf_logits = hf(input_ids=ids, attention_mask=mask).logits.numpy()
    ours = np.asarray(model.logits(plain, batch["input_ids"], batch["attention_mask"]))
    assert np.abs(ours - hf_logits).max() <= HF_CLASSIFIER_ATOL


def test_buffers_and_head_keys_are_skipped(tiny):
    _, params = tiny
    sd = ref_lib.flax_gpt2_to_torch(params["gpt2"], prefix="transformer.")
    sd["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), bool))
    sd["transformer.h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    sd["lm_head.weight"] = params["gpt2"]["wte"]["embedding"]
    _bits_equal(ref_lib.torch_gpt2_to_flax(sd, like=LIKE(params)), params["gpt2"])


def LIKE(params: dict) -> dict:  # noqa: N802  (the base's shapes: what the converter checks against)
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params["gpt2"])


def test_base_errors_name_the_key(tiny):
    _, params = tiny
    like = LIKE(params)
    sd = ref_lib.flax_gpt2_to_torch(params["gpt2"])
    missing = {k: v for k, v in sd.items() if k != "h.1.mlp.c_fc.bias"}
    with pytest.raises(ConversionError, match=r"missing keys: h\.1\.mlp\.c_fc\.bias"):
        ref_lib.torch_gpt2_to_flax(missing, like=like)
    with pytest.raises(ConversionError, match=r"unexpected keys: h\.0\.attn\.q_attn\.weight"):
        ref_lib.torch_gpt2_to_flax({**sd, "h.0.attn.q_attn.weight": sd["h.0.attn.c_proj.weight"]}, like=like)
    with pytest.raises(ConversionError, match=r"h/0/attn/c_attn/kernel \(torch h\.0\.attn\.c_attn\.weight\): shape"):
        ref_lib.torch_gpt2_to_flax({**sd, "h.0.attn.c_attn.weight": sd["h.0.attn.c_attn.weight"].T}, like=like)
    with pytest.raises(ConversionError, match=r"shape mismatch: h/1/mlp/c_fc/kernel \(torch h\.1\.mlp\.c_fc\.weight\): "
                                              r"shape \(64, 256\) in flax layout, expected \(256, 64\)$"):
        ref_lib.torch_gpt2_to_flax({**sd, "h.1.mlp.c_fc.weight": sd["h.1.mlp.c_fc.weight"].T}, like=like)
    with pytest.raises(ConversionError, match=r"wte/embedding \(torch wte\.weight\): shape \(50257, 64\) in flax "
                                              r"layout, expected \(50257, 32\)"):
        narrow = jax.tree.map(lambda v: np.zeros(v.shape[:-1] + (32,) if v.shape[-1] == 64 else v.shape),
                              params["gpt2"])
        ref_lib.torch_gpt2_to_flax(sd, like=narrow)
    with pytest.raises(ConversionError, match=r"score\.weight: shape"):
        ref_lib.torch_head_to_flax(np.zeros(3))


def test_seed_lora_round_trip_and_errors(tiny):
    model, params = tiny
    sd = ref_lib.seed_lora_to_torch(params["lora"], prefix="transformer.")
    assert sd["transformer.h.1.mlp.c_fc.U"].shape == (64, 4) and sd["transformer.h.1.mlp.c_fc.V"].shape == (256, 4)
    _bits_equal(ref_lib.seed_lora_from_torch(sd, prefix="transformer.", spec=model.spec), params["lora"])
    with pytest.raises(ConversionError, match=r"missing keys: transformer\.h\.0\.mlp\.c_fc\.V"):
        ref_lib.seed_lora_from_torch({k: v for k, v in sd.items() if k != "transformer.h.0.mlp.c_fc.V"},
                                     prefix="transformer.")
    with pytest.raises(ConversionError, match=r"vs spec: missing keys: h\.1\.attn\.c_proj"):
        ref_lib.seed_lora_from_torch({k: v for k, v in sd.items() if ".h.1.attn.c_proj." not in k},
                                     prefix="transformer.", spec=model.spec)
    wrong_rank = dataclasses.replace(model.spec, rank=8)
    with pytest.raises(ConversionError, match=r"h\.0\.attn\.c_attn: U/V give \(in, r, out\) = \(64, 4, 192\)"):
        ref_lib.seed_lora_from_torch(sd, prefix="transformer.", spec=wrong_rank)


def test_peft_round_trip_matches_peft_own_state_dict(tiny):
    """Our PEFT export has exactly the keys and shapes PEFT writes, and loads into a PEFT model that then
    holds our factors (A = a.T, B = b.T)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model, params = tiny
    ref = ref_lib.build_reference(model.arch, params["gpt2"], params["head"])
    peft_model = ref_lib.add_peft_lora(ref, 4, 8.0, 0.0)
    theirs = get_peft_model_state_dict(peft_model)
    ours = convert.lora_to_peft(GPT2, params["lora"])
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    set_peft_model_state_dict(peft_model, {k: torch.from_numpy(v) for k, v in ours.items()})
    _bits_equal(convert.lora_from_peft(GPT2, peft_model.state_dict(), spec=model.spec), params["lora"])
    two = {**convert.lora_to_peft(GPT2, params["lora"], adapter_name="default"),
           **convert.lora_to_peft(GPT2, params["lora"], adapter_name="other")}
    with pytest.raises(ConversionError, match="several adapters"):
        convert.lora_from_peft(GPT2, two)
    _bits_equal(convert.lora_from_peft(GPT2, two, adapter_name="other"), params["lora"])
    with pytest.raises(ConversionError, match="no lora_A / lora_B weights"):
        convert.lora_from_peft(GPT2, {"transformer.wte.weight": np.zeros((2, 2))})


def test_torch_bfloat16_tensor_keeps_its_bits():
    import ml_dtypes

    t = torch.randn(3, 5).to(torch.bfloat16)
    x = convert.to_numpy(t)
    assert x.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(x.astype(np.float32), t.float().numpy())
