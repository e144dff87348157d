"""The training kit inside the one optimizer: learning rate schedules with warm-up, decoupled weight decay that
spares LayerNorms and biases, clipping of the trainable gradients' global norm; the defaults are the original Adam.
Equal settings give one optimizer, so equal runs in a process share one compiled step, and no other setting does."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_kd_jax.core.config import ConfigError, TrainConfig, load_config
from lora_kd_jax.training.optimizer import clip_trainable, learning_rate, make_optimizer, warmup_steps

LR, TOTAL = 1e-3, 10
# a tree with every group the LoRA classifier has, a bias among the trained leaves, and a frozen leaf
PARAMS = {"lora": {"a": jnp.full((2, 3), 0.5)}, "head": {"kernel": jnp.full((3, 2), 0.5), "bias": jnp.full((2,), 0.5)},
          "gpt2": {"ln_f": {"scale": jnp.full((3,), 0.5)}, "wte": {"embedding": jnp.full((4, 3), 0.5)}}}
LABELS = {"lora": {"a": "lora"}, "head": {"kernel": "head", "bias": "head"},
          "gpt2": {"ln_f": {"scale": "norm"}, "wte": {"embedding": "frozen"}}}


def rates(train: TrainConfig, steps: int = TOTAL + 1) -> np.ndarray:
    """The learning rate each of `steps` optimizer updates used, read off Adam's update for a constant gradient
    (Adam's first moments over its second's root are then exactly 1: the update is -lr * 1/(1 + eps))."""
    tx = make_optimizer(train, LABELS, TOTAL)
    state, out = tx.init(PARAMS), []
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    for _ in range(steps):
        updates, state = tx.update(grads, state, PARAMS)
        out.append(-float(updates["lora"]["a"][0, 0]) * (1 + 1e-8))
    return np.array(out)


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, [LR] * 11),
    ("constant", 2, [0, LR / 2] + [LR] * 9),
    ("linear", 2, [0, LR / 2, LR] + [LR * (1 - k / 8) for k in range(1, 9)]),
    ("linear", 0.2, [0, LR / 2, LR] + [LR * (1 - k / 8) for k in range(1, 9)]),  # 0.2 of 10 steps = 2
    ("cosine", 0, [LR * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(11)]),
    ("cosine", 4, [0, LR / 4, LR / 2, 3 * LR / 4] + [LR * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)]),
])
def test_the_schedule_gives_the_hand_computed_rate_at_every_step(schedule, warmup, expected):
    train = TrainConfig(lr=LR, schedule=schedule, warmup=warmup)
    rate = learning_rate(train, TOTAL)
    np.testing.assert_allclose([rate(k) if callable(rate) else rate for k in range(TOTAL + 1)], expected, rtol=1e-6,
                               atol=1e-12)
    # and the optimizer applies it: Adam's normalised update in float32 is 1 to within ~1e-5 (its bias corrections)
    np.testing.assert_allclose(rates(train), expected, rtol=1e-4, atol=1e-12)
    assert warmup_steps(train, TOTAL) == (round(warmup * TOTAL) if warmup < 1 else warmup)


def test_defaults_are_the_original_adam():
    """Constant rate, no warm-up, no decay, no clipping: a plain float rate, the same state tree and the same
    updates as `make_optimizer(lr)` (what every run used before the kit existed)."""
    assert learning_rate(TrainConfig(lr=LR), TOTAL) == LR
    new, old = make_optimizer(TrainConfig(lr=LR), LABELS, TOTAL), make_optimizer(LR, LABELS)
    assert jax.tree.structure(new.init(PARAMS)) == jax.tree.structure(old.init(PARAMS))
    grads = jax.tree.map(lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), PARAMS)
    a, _ = new.update(grads, new.init(PARAMS), PARAMS)
    b, _ = old.update(grads, old.init(PARAMS), PARAMS)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_weight_decay_spares_layer_norms_biases_and_the_frozen_base():
    """With zero gradients AdamW's update is -lr * wd * param: on the LoRA factors and the head's kernel only."""
    tx = make_optimizer(TrainConfig(lr=LR, weight_decay=0.1), LABELS, TOTAL)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["lora"]["a"], -LR * 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -LR * 0.1 * 0.5, rtol=1e-6)
    for masked in (updates["head"]["bias"], updates["gpt2"]["ln_f"]["scale"], updates["gpt2"]["wte"]["embedding"]):
        assert float(jnp.abs(masked).max()) == 0.0


@pytest.mark.parametrize("plus_ratio", [1.0, 4.0])
def test_weight_decay_spares_the_dora_magnitude_in_either_group(plus_ratio):
    """A DoRA layer's magnitude m keeps its value under weight decay, with or without LoRA+ (which moves it to
    the lora_b group); the factors beside it decay."""
    params = {"lora": {"a": jnp.full((2, 3), 0.5), "b": jnp.full((3, 2), 0.5), "m": jnp.full((2,), 0.5)}}
    b_group = "lora_b" if plus_ratio != 1.0 else "lora"
    labels = {"lora": {"a": "lora", "b": b_group, "m": b_group}}
    tx = make_optimizer(TrainConfig(lr=LR, weight_decay=0.1), labels, TOTAL, {"lora_b": plus_ratio})
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["lora"]["a"], -LR * 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["lora"]["b"], -LR * plus_ratio * 0.1 * 0.5, rtol=1e-6)
    assert float(jnp.abs(updates["lora"]["m"]).max()) == 0.0


def test_clipping_bounds_the_global_norm_of_the_trainable_gradients_only():
    """Huge frozen gradients neither count in the norm nor come out: the trainable ones (norm 8) are scaled to 2."""
    grads = jax.tree.map(jnp.zeros_like, PARAMS)
    grads["lora"]["a"] = jnp.full((2, 3), 8 / math.sqrt(6))  # global norm 8
    grads["gpt2"]["wte"]["embedding"] = jnp.full((4, 3), 1e6)
    clip = clip_trainable(2.0, LABELS)
    out, _ = clip.update(grads, clip.init(PARAMS), PARAMS)
    assert float(optax.global_norm(out)) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(out["lora"]["a"], grads["lora"]["a"] / 4, rtol=1e-6)
    assert float(jnp.abs(out["gpt2"]["wte"]["embedding"]).max()) == 0.0
    small, _ = clip.update(jax.tree.map(lambda g: g / 8, grads), clip.init(PARAMS), PARAMS)  # norm 1: untouched
    np.testing.assert_allclose(small["lora"]["a"], grads["lora"]["a"] / 8, rtol=1e-6)


def test_the_optimizer_clips_before_adam_when_max_grad_norm_is_set():
    """make_optimizer with train.max_grad_norm is clip-then-Adam on the trainable leaves: two steps (a gradient of
    norm 80, then one of norm 1) give optax's chain(clip_by_global_norm, adam) updates, and not plain Adam's."""
    trained = {"lora": PARAMS["lora"], "head": PARAMS["head"], "ln_f": PARAMS["gpt2"]["ln_f"]}

    def grads(scale):
        g = jax.tree.map(lambda x: scale * jnp.arange(1.0, x.size + 1).reshape(x.shape) / x.size, PARAMS)
        g["gpt2"]["wte"]["embedding"] = jnp.full((4, 3), 1e6)  # frozen: counts nowhere
        return g

    def trainable(tree):
        return {"lora": tree["lora"], "head": tree["head"], "ln_f": tree["gpt2"]["ln_f"]}

    steps = [grads(80.0 / float(optax.global_norm(trainable(grads(1.0))))), grads(1.0)]
    ours, plain = make_optimizer(TrainConfig(lr=LR, max_grad_norm=1.0), LABELS), make_optimizer(LR, LABELS)
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR))
    state, plain_state, ref_state = ours.init(PARAMS), plain.init(PARAMS), ref.init(trained)
    for g in steps:
        got, state = ours.update(g, state, PARAMS)
        unclipped, plain_state = plain.update(g, plain_state, PARAMS)
        want, ref_state = ref.update(trainable(g), ref_state, trained)
        for a, b in zip(jax.tree.leaves(trainable(got)), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
        assert float(jnp.abs(got["gpt2"]["wte"]["embedding"]).max()) == 0.0
    # the second step tells clipped from unclipped (Adam's first step is the gradient's sign either way)
    assert float(jnp.abs(got["lora"]["a"] - unclipped["lora"]["a"]).max()) > 1e-5


def test_the_kit_trains_a_tiny_run_end_to_end(tmp_path):
    """Schedule, warm-up, decay and clipping together through the real trainer: it runs, the loss is finite, and
    the run dir records the settings."""
    from lora_kd_jax.training import finetune
    from tiny import tiny_config

    cfg = tiny_config("data.limit=64", "train.batch_size=16", "train.epochs=2", "train.schedule=cosine",
                      "train.warmup=0.25", "train.weight_decay=0.01", "train.max_grad_norm=1.0",
                      f"run.dir={tmp_path / 'r'}")
    summary = finetune.train_lora(cfg, progress=False)
    assert math.isfinite(summary["val_loss_at_best"])
    assert "schedule: cosine" in (tmp_path / "r" / "config.yaml").read_text()


@pytest.mark.parametrize("override, message", [
    ("train.schedule=step", "train.schedule: 'step' is not one of constant, linear, cosine"),
    ("train.warmup=2.5", "train.warmup=2.5: give whole steps"),
    ("train.weight_decay=-1", "train.weight_decay: must be >= 0"),
    ("train.max_grad_norm=-0.5", "train.max_grad_norm: must be >= 0"),
])
def test_bad_kit_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 0.1, 0.4, 2])
def test_the_optimizer_state_tree_does_not_depend_on_the_number_of_steps(schedule, warmup):
    """A reader rebuilds the restore target without knowing the run's steps (total_steps=1): the state tree must be
    the one training wrote whatever its length (a fractional warm-up rounds to 0 steps of 1)."""
    train = TrainConfig(lr=LR, schedule=schedule, warmup=warmup)
    short, long = (make_optimizer(train, LABELS, n).init(PARAMS) for n in (1, 1000))
    assert jax.tree.structure(short) == jax.tree.structure(long)


@pytest.mark.parametrize("kit, refused", [([], False), (["train.warmup=10"], False),
                                          (["train.schedule=cosine"], True), (["train.warmup=0.1"], True)])
def test_resume_may_add_epochs_only_when_no_schedule_spans_the_run(kit, refused, tmp_path):
    """More epochs on --resume is allowed for a constant rate (whole-step warm-up included); a decay or a fractional
    warm-up is laid over all the steps, so it would change the rate of steps already taken: refused by name."""
    from lora_kd_jax.runs import rundir

    rundir.prepare(load_config(None, [*kit, "train.epochs=2", f"run.dir={tmp_path}"]))
    rundir.detach_log(tmp_path)
    longer = load_config(None, [*kit, "train.epochs=4", f"run.dir={tmp_path}"])
    if refused:
        with pytest.raises(rundir.RunDirError, match=r"config differs in train\.epochs"):
            rundir.prepare(longer, resume=True)
    else:
        rundir.prepare(longer, resume=True)
        rundir.detach_log(tmp_path)


# what a LoRA step's program depends on, one setting at a time: each must give another train step than the default's
OTHER_OPTIMIZER = ["train.lr=2e-3", "train.weight_decay=0.01", "train.max_grad_norm=1.0", "train.schedule=linear",
                   "train.warmup=1", "train.accumulate=2"]
OTHER_MODEL = ["lora.rank=2", "lora.dropout=0.1", "lora.variant=dora", "lora.targets=[attn.c_attn]",
               "model.dtype=bfloat16", "lora.plus_ratio=4"]


def test_equal_runs_in_a_process_share_one_compiled_step_and_no_other_setting_does(tmp_path):
    """Two runs of one configuration get the same jitted train and eval steps (models compare by value, equal
    settings give one optimizer and one schedule), so the second run traces, lowers and compiles nothing: after a
    run, the steps a new equal task gets hold that run's programs and serve its batches without compiling. The
    seed and the number of epochs (under a constant rate) do not change the program; each setting of
    OTHER_OPTIMIZER and OTHER_MODEL, seeds at once, and another distillation objective do: their own step."""
    import jax

    from lora_kd_jax import data as data_lib
    from lora_kd_jax.distill.losses import teacher_objective
    from lora_kd_jax.models.build import build_classifier
    from lora_kd_jax.models.tokenizers import tokenizer_for
    from lora_kd_jax.training import finetune
    from lora_kd_jax.training.steps import Seeded, cross_entropy_objective, make_eval_step, make_train_step
    from tiny import tiny_config

    base = ("data.limit=32", "train.batch_size=16", "train.epochs=1")

    def task(*overrides: str):
        cfg = finetune.lora_config(tiny_config(*base, *overrides))
        return finetune.build_task(cfg, data_lib.load_splits(cfg, tokenizer_for(cfg)).encoded)

    finetune.train_lora(tiny_config(*base, f"run.dir={tmp_path}"), progress=False)
    first = task()
    held = first.train_step._cache_size(), first.eval_step._cache_size()  # the run's programs (and any before it)
    assert min(held) >= 1
    first.eval_step(first.state, first.consts, first.put_eval_batch(next(iter(first.eval_batches()))))
    first.train_step(first.state, first.consts, first.put_batch(next(iter(first.train_batches(0, 0)))))
    assert (first.train_step._cache_size(), first.eval_step._cache_size()) == held  # served by them: no compile
    again = task("train.seed=5", "train.epochs=3")
    assert again.train_step is first.train_step and again.eval_step is first.eval_step
    for setting in OTHER_OPTIMIZER:
        assert task(setting).train_step is not first.train_step, setting
    assert task("train.schedule=linear", "train.epochs=2").train_step is not task("train.schedule=linear").train_step

    def model(*overrides: str):  # from shapes alone: nothing is drawn or compiled
        return build_classifier(finetune.lora_config(tiny_config(*overrides)), jax.random.key(0), shapes_only=True)[0]

    default, tx = model(), optax.adam(1e-3)
    assert model("train.seed=5") == default and hash(model("train.seed=5")) == hash(default)
    assert make_train_step(default, optax.adam(1e-3), cross_entropy_objective) is not \
        make_train_step(default, tx, cross_entropy_objective)  # a transform of the caller's own: its own step
    step = make_train_step(default, tx, cross_entropy_objective)
    assert make_train_step(model("train.seed=5"), tx, cross_entropy_objective) is step
    for setting in OTHER_MODEL:
        other = model(setting)
        assert other != default, setting
        assert make_train_step(other, tx, cross_entropy_objective) is not step, setting
        assert make_eval_step(other) is not make_eval_step(default), setting
    assert make_train_step(default, tx, cross_entropy_objective, Seeded()) is not step
    assert make_train_step(default, tx, teacher_objective(2.0, 0.5)) is not step
    assert teacher_objective(2.0, 0.5) == teacher_objective(2.0, 0.5) != teacher_objective(2.0, 0.4)
