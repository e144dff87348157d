"""train.accumulate=K: K micro-batches per optimizer step give the parameters of the whole batch (fp32, no dropout),
for the LoRA classifier and for a seeded distillation step; a partial (padded) batch weighs its rows as the whole
batch does; K must divide the batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_kd_jax.core.config import ConfigError, load_config
from lora_kd_jax.distill.losses import teacher_objective
from lora_kd_jax.models.build import build_classifier
from lora_kd_jax.models.students.build import build_student
from lora_kd_jax.training.state import seed_states, stack, train_state
from lora_kd_jax.training.steps import Seeded, cross_entropy_objective, make_train_step
from tiny import key, random_batch, tiny_config

BATCH, K, STEPS = 32, 4, 3


def batches() -> list[dict]:
    """STEPS batches of 32; the last one partial: 13 padding rows of weight 0 (the loader's last batch)."""
    out = [random_batch(i, batch=BATCH) for i in range(STEPS)]
    out[-1]["weights"][19:] = 0.0
    return out


def run(step, state, consts, data) -> tuple:
    sums = None
    for batch in data:
        state, sums = step(state, consts, batch)
    return jax.device_get(state.trainable), jax.device_get(sums)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


HEADS = {"two classes": (), "three classes": ("model.num_labels=3",), "regression": ("data.problem=regression",)}


@pytest.mark.parametrize("head", HEADS)
def test_four_micro_batches_of_8_give_the_parameters_of_one_batch_of_32(head):
    """Every head's metric sums (tp/fp/tn/fn, a confusion matrix, a regression's moments) accumulate too."""
    cfg = tiny_config("lora.dropout=0.0", "model.dtype=float32", "model.base_dtype=float32", *HEADS[head])
    model, params = build_classifier(cfg, key())
    start = jax.device_get(train_state(model, params, 1e-2, key(1)).state.trainable)
    results = []
    for k in (1, K):
        setup = train_state(model, jax.tree.map(jnp.copy, params), 1e-2, key(1))  # the step donates its state
        step = make_train_step(model, setup.tx, cross_entropy_objective, accumulate=k, lr=1e-2)
        results.append(run(step, setup.state, {"frozen": setup.frozen}, batches()))
    (whole, whole_sums), (micro, micro_sums) = results
    assert_same(whole, micro)
    # the last step's sums: the same loss (mean over its 19 real rows), counts and gradient norm
    assert micro_sums.keys() == whole_sums.keys()
    assert {"two classes": "tp", "three classes": "confusion", "regression": "sum_yp"}[head] in whole_sums
    for name in whole_sums:
        np.testing.assert_allclose(micro_sums[name], whole_sums[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert float(micro_sums["count"]) == 19.0
    # and the parameters did move (a step that did nothing would pass the comparison too)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(micro))) > 1e-4


def test_clipping_with_accumulation_clips_the_whole_batchs_gradient():
    """train.max_grad_norm with accumulate=4: the norm clipped is that of the summed gradient of the batch (so the
    parameters equal one batch of 32 with the same clipping), and the clip is active (plain Adam ends elsewhere)."""
    from lora_kd_jax.core.config import TrainConfig

    cfg = tiny_config("lora.dropout=0.0", "model.dtype=float32", "model.base_dtype=float32")
    model, params = build_classifier(cfg, key())
    results = []
    for k, clip in ((1, 0.05), (K, 0.05), (K, 0.0)):
        train = TrainConfig(lr=1e-2, max_grad_norm=clip)
        setup = train_state(model, jax.tree.map(jnp.copy, params), train, key(1))
        step = make_train_step(model, setup.tx, cross_entropy_objective, accumulate=k, lr=1e-2)
        results.append(run(step, setup.state, {"frozen": setup.frozen}, batches())[0])
    whole, micro, unclipped = results
    assert_same(whole, micro)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(micro), jax.tree.leaves(unclipped))) > 1e-4


def test_a_seeded_distillation_step_accumulates_per_seed():
    """Two seeds, cached teacher logits per seed (vmapped constants): accumulate=4 equals the whole batch."""
    cfg = load_config(None, ["student.embed_dim=16", "student.hidden_dim=16", "student.pooling=last_token"])
    student, _ = build_student(cfg.student, key(0), shapes_only=True)
    teacher_logits = jax.random.normal(key(5), (2, BATCH, 2))
    consts, axes = {"frozen": {}, "teacher_logits": teacher_logits}, {"frozen": None, "teacher_logits": 0}
    results = []
    for k in (1, K):
        setup = seed_states(student, 1e-2, [0, 1], stacked=True)
        step = make_train_step(student, setup.tx, teacher_objective(2.0, 0.5), Seeded(axes), accumulate=k, lr=1e-2)
        data = [stack([b, b]) for b in batches()]
        results.append(run(step, setup.state, consts, data))
    assert_same(results[0][0], results[1][0])
    np.testing.assert_allclose(results[1][1]["loss"], results[0][1]["loss"], rtol=2e-5)


def test_accumulate_must_divide_the_batch():
    with pytest.raises(ConfigError, match=r"train\.accumulate=3 does not divide train\.batch_size=32"):
        load_config(None, ["train.batch_size=32", "train.accumulate=3"])
