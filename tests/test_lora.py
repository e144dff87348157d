"""LoRA as a tree transform: targets, inits, factored path vs merged weights."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lora_kd_jax.lora import transform as lora
from lora_kd_jax.core.config import load_config
from lora_kd_jax.models.build import build_classifier
from tiny import key, random_batch, tiny_config


def perturbed(factors, seed=1, scale=0.05):
    """Non-zero factors everywhere (standard init starts with b = 0, which would make comparisons trivial)."""
    leaves, tree = jax.tree.flatten(factors)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_gpt2_spec_counts_match_the_reference():
    cfg = load_config(None, ["model.name=gpt2"])
    _, shapes = build_classifier(cfg, key(), shapes_only=True)
    spec = lora.make_spec(shapes["gpt2"], cfg.lora.targets, rank=4)
    assert len(spec.paths) == 12 * 4
    assert lora.count(spec) == 589_824
    assert spec.paths[:4] == (("h", "0", "attn", "c_attn"), ("h", "0", "attn", "c_proj"),
                              ("h", "0", "mlp", "c_fc"), ("h", "0", "mlp", "c_proj"))
    assert spec.shapes[0] == (768, 2304)  # (in, out) of c_attn


def test_target_that_matches_nothing_is_an_error():
    cfg = tiny_config()
    _, params = build_classifier(cfg, key(), with_lora=False, shapes_only=True)
    with pytest.raises(lora.LoraTargetError, match="'attn.q_proj' matches no kernel"):
        lora.make_spec(params["gpt2"], ["attn.q_proj"], rank=4)


def test_factor_shapes_and_init_bounds():
    cfg = tiny_config()
    _, params = build_classifier(cfg, key(), with_lora=False)
    seed_spec = lora.make_spec(params["gpt2"], cfg.lora.targets, rank=4, init="seed")
    f = lora.init_lora(seed_spec, key(3))["h"]["0"]["attn"]["c_attn"]
    chex.assert_shape(f["a"], (64, 4))
    chex.assert_shape(f["b"], (4, 192))
    assert float(jnp.abs(f["a"]).max()) <= np.sqrt(6 / (64 + 4))
    assert float(jnp.abs(f["b"]).max()) <= np.sqrt(6 / (192 + 4))
    assert float(jnp.abs(f["b"]).max()) > 0.5 * np.sqrt(6 / (192 + 4))  # Xavier, not zeros
    std_spec = lora.make_spec(params["gpt2"], cfg.lora.targets, rank=4, alpha=8.0, init="standard")
    g = lora.init_lora(std_spec, key(3))["h"]["0"]["mlp"]["c_proj"]
    assert std_spec.scale == 2.0
    assert float(jnp.abs(g["a"]).max()) <= 1 / np.sqrt(256)
    assert float(jnp.abs(g["b"]).max()) == 0.0


def test_standard_init_gives_exactly_the_base_model():
    cfg = tiny_config("lora.init=standard")
    model, params = build_classifier(cfg, key())
    batch = random_batch(0)
    with_lora = model.logits(params, batch["input_ids"], batch["attention_mask"])
    base_only = model.logits({"gpt2": params["gpt2"], "head": params["head"]}, batch["input_ids"],
                             batch["attention_mask"])
    np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(base_only))


@pytest.mark.parametrize("init", ["seed", "standard"])
def test_merged_and_factored_paths_agree(init):
    cfg = tiny_config(f"lora.init={init}", "lora.alpha=8")
    model, params = build_classifier(cfg, key())
    params = {**params, "lora": perturbed(params["lora"])}
    batch = random_batch(1)
    factored = model.logits(params, batch["input_ids"], batch["attention_mask"])
    merged = model.logits(model.merged(params), batch["input_ids"], batch["attention_mask"])
    base = model.logits({"gpt2": params["gpt2"], "head": params["head"]}, batch["input_ids"],
                        batch["attention_mask"])
    assert float(jnp.abs(factored - base).max()) > 1e-3  # the adapters do change the function
    np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), atol=2e-6, rtol=1e-5)


def test_merge_touches_only_targeted_kernels():
    cfg = tiny_config("lora.targets=attn.c_attn")
    model, params = build_classifier(cfg, key())
    params = {**params, "lora": perturbed(params["lora"])}
    merged = traverse_util.flatten_dict(model.merged(params)["gpt2"])
    base = traverse_util.flatten_dict(params["gpt2"])
    changed = sorted(".".join(k) for k in base if not np.array_equal(base[k], merged[k]))
    assert changed == ["h.0.attn.c_attn.kernel", "h.1.attn.c_attn.kernel"]


def test_dropout_needs_a_key_and_is_off_when_deterministic():
    cfg = tiny_config("lora.dropout=0.5")
    model, params = build_classifier(cfg, key())
    params = {**params, "lora": perturbed(params["lora"])}
    b = random_batch(2)
    det = model.logits(params, b["input_ids"], b["attention_mask"], deterministic=True)
    cfg0 = tiny_config("lora.dropout=0.0")
    model0, _ = build_classifier(cfg0, key())
    np.testing.assert_array_equal(np.asarray(det), np.asarray(model0.logits(params, b["input_ids"],
                                                                            b["attention_mask"])))
    noisy1 = model.logits(params, b["input_ids"], b["attention_mask"], deterministic=False, rng=key(5))
    noisy2 = model.logits(params, b["input_ids"], b["attention_mask"], deterministic=False, rng=key(6))
    assert float(jnp.abs(noisy1 - noisy2).max()) > 1e-4


def test_dropout_keep_mask_rate_and_exact_keep_probability():
    keep, keep_prob = lora.dropout_keep_mask(key(7), 0.1, (1000, 1001))  # odd size: the last 32-bit word is split
    assert keep.shape == (1000, 1001) and keep.dtype == jnp.bool_
    assert keep_prob == 58982 / 65536 and abs(keep_prob - 0.9) < 7.7e-6
    n = keep.size
    frac = float(jnp.mean(keep))
    sd = np.sqrt(keep_prob * (1 - keep_prob) / n)
    assert abs(frac - keep_prob) < 6 * sd  # 6 sigma: a false failure has probability ~1e-9
    other, _ = lora.dropout_keep_mask(key(8), 0.1, (1000, 1001))
    assert 0.15 < float(jnp.mean(keep != other)) < 0.21  # independent masks for different keys (2pq = 0.18)


def test_bfloat16_compute_stays_within_its_documented_tolerance():
    """model.dtype=bfloat16 with the frozen base stored in bf16 (the accelerator setting): logits within
    BF16_TOL of fp32 (bf16 keeps 8 mantissa bits, ~4e-3 relative per rounding, over 2 layers)."""
    BF16_TOL = 2e-2  # relative to the largest fp32 logit (observed 8.9e-3 on CPU)
    from lora_kd_jax.training.state import cast_frozen, combine, partition
    cfg32 = tiny_config()
    model32, params = build_classifier(cfg32, key())
    params = {**params, "lora": perturbed(params["lora"])}
    model16, _ = build_classifier(tiny_config("model.dtype=bfloat16"), key(), shapes_only=True)
    trainable, frozen = partition(params, model32.param_labels(params))
    params16 = combine(trainable, cast_frozen(frozen, "bfloat16"))
    b = random_batch(3)
    ref = np.asarray(model32.logits(params, b["input_ids"], b["attention_mask"]))
    low = model16.logits(params16, b["input_ids"], b["attention_mask"])
    assert low.dtype == jnp.float32  # the head and the loss stay fp32
    err = float(np.abs(np.asarray(low) - ref).max() / np.abs(ref).max())
    assert 0 < err < BF16_TOL, err  # not bit-identical (bf16 really ran), but close
