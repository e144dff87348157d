"""The LoRA trainer: what trains and what stays frozen, cost, learning, run dir, resume, dry run, loading."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from lora_kd_jax import data as data_lib
from lora_kd_jax.core import metrics
from lora_kd_jax.training import finetune
from lora_kd_jax.commands.cli import main_train_lora
from lora_kd_jax.models.hf_checkpoint import ModelLoadError
from lora_kd_jax.models.build import build_classifier
from lora_kd_jax.training.optimizer import make_optimizer
from lora_kd_jax.training.state import train_state
from lora_kd_jax.training.steps import cross_entropy_objective, loss_and_sums, make_train_step
from tiny import PLOTTED, assert_resumed, key, log_messages, random_batch, tiny_config


def synthetic_split(n: int, seed: int, length: int = 8) -> data_lib.EncodedSplit:
    """Label 1 iff the last real token is one of ten 'positive' ids: learnable through the last-token head."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, length + 1, size=n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(100, 120, size=(n, length)).astype(np.int32)
    ids = np.where(mask == 1, ids, data_lib.PAD_ID).astype(np.int32)
    last = ids[np.arange(n), lengths - 1]
    return data_lib.EncodedSplit(ids, mask, (last < 110).astype(np.int32), 0)


def test_frozen_leaves_bit_identical_and_trainable_leaves_move():
    cfg = tiny_config("lora.dropout=0.1")
    model, params = build_classifier(cfg, key())
    setup = train_state(model, params, 1e-3, key(1))
    state, frozen = setup.state, setup.frozen
    frozen_before = jax.tree.map(np.array, frozen)
    trainable_before = jax.tree.map(np.array, state.trainable)
    step = make_train_step(model, setup.tx, cross_entropy_objective)
    for i in range(3):
        state, _ = step(state, {"frozen": frozen}, random_batch(i))
    for path, before in traverse_util.flatten_dict(frozen_before).items():
        np.testing.assert_array_equal(before, np.asarray(traverse_util.flatten_dict(frozen)[path]))
    after = traverse_util.flatten_dict(state.trainable)
    for path, before in traverse_util.flatten_dict(trainable_before).items():
        assert not np.array_equal(before, np.asarray(after[path])), f"{'/'.join(path)} did not move"
    trained = sorted({p[0] if p[0] != "gpt2" else p[-2] for p in after})
    assert trained == ["head", "ln_1", "ln_2", "ln_f", "lora"]


def test_set_to_zero_guards_frozen_leaves():
    """Even if a frozen leaf reaches the optimizer, multi_transform gives it a zero update."""
    cfg = tiny_config()
    model, params = build_classifier(cfg, key())
    tx = make_optimizer(1e-3, model.param_labels(params))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = traverse_util.flatten_dict(updates)
    assert float(jnp.abs(flat[("gpt2", "wte", "embedding")]).max()) == 0.0
    assert float(jnp.abs(flat[("gpt2", "h", "0", "attn", "c_attn", "kernel")]).max()) == 0.0
    assert float(jnp.abs(flat[("head", "kernel")]).min()) > 0.0


def test_frozen_base_costs_fewer_flops_than_unfrozen():
    cfg = tiny_config("model.n_embd=128")
    model, params = build_classifier(cfg, key())
    batch = random_batch(0, batch=8, length=16)
    setup = train_state(model, params, 1e-3, key(1))
    lora_step = jax.jit(make_train_step(model, setup.tx, cross_entropy_objective).__wrapped__)
    lora_flops = lora_step.lower(setup.state, {"frozen": setup.frozen}, batch).compile().cost_analysis()["flops"]

    full_tx = optax.adam(1e-3)

    def full_step(p, opt_state, b):
        loss = lambda q: loss_and_sums(model, q, {}, b, cross_entropy_objective, deterministic=True,  # noqa: E731
                                       rng=None)[0]
        grads = jax.grad(loss)(p)
        updates, opt_state = full_tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    full_flops = jax.jit(full_step).lower(params, full_tx.init(params), batch).compile().cost_analysis()["flops"]
    assert lora_flops < 0.75 * full_flops, (lora_flops, full_flops)


def test_tiny_model_learns_a_separable_task():
    cfg = tiny_config("train.lr=5e-3", "train.batch_size=32", "lora.dropout=0.0")
    splits = {"train": synthetic_split(256, 0), "validation": synthetic_split(128, 1)}
    task = finetune.build_task(cfg, splits)
    for epoch in range(12):
        for batch in task.train_batches(epoch, 0):
            task.state, _ = task.train_step(task.state, task.consts, batch)
    sums = metrics.zeros()
    for batch in data_lib.batch_iterator(splits["train"], 64, shuffle=False):
        sums = metrics.add(sums, task.eval_step(task.state, task.consts, batch))
    assert metrics.summarize(sums)["accuracy"] > 0.95


def smoke_overrides(run_dir, *extra):
    return ["data.limit=64", "train.batch_size=16", "train.epochs=2", f"run.dir={run_dir}", *extra]


def test_smoke_run_leaves_the_run_directory(tmp_path):
    cfg = tiny_config(*smoke_overrides(tmp_path / "run"), PLOTTED)
    summary = finetune.train_lora(cfg, progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "accuracy.png", "loss.png", "log.txt"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "latest"]
    record = json.loads((run / "metrics.json").read_text())
    assert record["kind"] == "lora" and len(record["epochs"]) == 2
    for e in record["epochs"]:
        assert e["train"]["count"] == 64 and e["val"]["count"] == 64
        assert set(e["val"]) == {"loss", "accuracy", "mcc", "f1", "macro_f1", "count"}
    best = max(record["epochs"], key=lambda e: e["val"]["accuracy"])
    assert summary["best_val_accuracy"] == best["val"]["accuracy"]
    assert summary["train_accuracy_at_best"] == best["train"]["accuracy"]
    assert summary["trainable_params"] < summary["total_params"]


def test_resume_equals_uninterrupted_run(tmp_path):
    full = finetune.train_lora(tiny_config(*smoke_overrides(tmp_path / "a", "lora.dropout=0.1")),
                                    progress=False)
    finetune.train_lora(tiny_config(*smoke_overrides(tmp_path / "b", "lora.dropout=0.1", "train.epochs=1")),
                             progress=False)
    since = (tmp_path / "b" / "log.txt").stat().st_size
    resumed = finetune.train_lora(tiny_config(*smoke_overrides(tmp_path / "b", "lora.dropout=0.1")),
                                       resume=True, progress=False)
    assert_resumed(log_messages(tmp_path / "b", since), from_step=4, to_step=8)  # 64 rows / 16, 2 epochs
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["epochs"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["epochs"]
    assert a == b  # every per-epoch metric, bit for bit (CPU is deterministic)
    assert full["best_val_accuracy"] == resumed["best_val_accuracy"]


def test_run_dir_records_resolved_dtypes_and_reads_older_config_files(tmp_path):
    """config.yaml holds the dtypes "auto" meant here; a file written before a key existed still resumes; a run
    recorded in bf16 (as "auto" gives on a GPU) is not continued in fp32 on this CPU."""
    import yaml

    from lora_kd_jax.runs import rundir

    cfg = tiny_config(f"run.dir={tmp_path / 'r'}")
    path = rundir.prepare(cfg) / rundir.CONFIG_FILE
    stored = yaml.safe_load(path.read_text())
    assert (stored["model"]["dtype"], stored["model"]["base_dtype"], stored["student"]["dtype"]) == ("float32",) * 3
    del stored["data"]["group_window"]  # as written before data.group_window existed
    path.write_text(yaml.safe_dump(stored))
    rundir.prepare(cfg, resume=True)  # accepted: the missing key reads as its default
    stored["model"]["dtype"] = stored["model"]["base_dtype"] = "bfloat16"
    path.write_text(yaml.safe_dump(stored))
    with pytest.raises(rundir.RunDirError, match="model.base_dtype, model.dtype"):
        rundir.prepare(cfg, resume=True)
    rundir.prepare(tiny_config(f"run.dir={tmp_path / 'r'}", "model.dtype=bfloat16"), resume=True)  # said so: fine


def test_run_dir_with_a_different_run_is_not_overwritten(tmp_path):
    finetune.train_lora(tiny_config(*smoke_overrides(tmp_path / "r", "train.epochs=1")), progress=False)
    from lora_kd_jax.runs.rundir import RunDirError
    with pytest.raises(RunDirError, match="different run.*train.lr"):
        finetune.train_lora(tiny_config(*smoke_overrides(tmp_path / "r", "train.epochs=1", "train.lr=0.01")),
                                 progress=False)


def test_dry_run_prints_the_reference_parameter_report(capsys):
    main_train_lora(["configs/lora_gpt2.yaml", "--dry-run"])
    main_train_lora(["configs/lora_gpt2_medium.yaml", "--dry-run"])
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("params:")]  # then the plan
    assert "total 125.03M" in out[0] and "trainable 0.63M" in out[0] and "reduction 99.50%" in out[0]
    assert "total 356.40M" in out[1] and "trainable 1.68M" in out[1] and "reduction 99.53%" in out[1]


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch_bin", "flax_msgpack"])
def test_loading_a_save_pretrained_dir_gives_the_in_memory_model(tmp_path, fmt):
    """A GPT2Model saved by transformers' PyTorch save_pretrained (safetensors, or the torch pickle), or as the
    flax_model.msgpack transformers 4's Flax classes wrote (the same weights, the base tree serialized): loaded
    from model.path, its hidden states are PyTorch's."""
    torch = pytest.importorskip("torch")
    from flax import serialization
    from tiny import save_torch_gpt2

    import torch_reference as ref_lib

    hf_model = save_torch_gpt2(tmp_path / "ckpt", seed=3, safe=fmt == "safetensors")
    if fmt == "flax_msgpack":
        tree = ref_lib.torch_gpt2_to_flax(hf_model.state_dict(), like=ref_lib.gpt2_like(hf_model.config))
        (tmp_path / "ckpt" / "flax_model.msgpack").write_bytes(serialization.to_bytes(tree))
        (tmp_path / "ckpt" / "model.safetensors").unlink()
    loaded_cfg = tiny_config("model.init=pretrained", f"model.path={tmp_path / 'ckpt'}", "model.n_positions=64")
    model, params = build_classifier(loaded_cfg, key(), with_lora=False)
    b = random_batch(4)
    ours = model.base_outputs(params["gpt2"], b["input_ids"], b["attention_mask"])[0]
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(b["input_ids"]).long(),
                       attention_mask=torch.from_numpy(b["attention_mask"]).long()).last_hidden_state.numpy()
    real = b["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=5e-6, rtol=0)  # the parity tests' tolerance
    assert model.arch.num_layers == 2 and model.arch.hidden_size == 64


def test_missing_checkpoint_dir_is_a_clear_error(tmp_path):
    cfg = tiny_config("model.init=pretrained", f"model.path={tmp_path / 'nope'}")
    with pytest.raises(ModelLoadError, match="model.path=.*nope: does not exist"):
        build_classifier(cfg, key())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, '
                                                    '"n_head": 4, "vocab_size": 50257, "n_positions": 1024}')
    cfg = tiny_config("model.init=pretrained", f"model.path={tmp_path / 'empty'}")
    with pytest.raises(ModelLoadError, match="no gpt2 weights found"):
        build_classifier(cfg, key())


def test_length_aware_batching_gives_the_same_run(tmp_path):
    """Cutting each batch to a bucket length (data.buckets) is exact for right-padded GPT-2 with last-token pooling."""
    plain = finetune.train_lora(tiny_config(*smoke_overrides(tmp_path / "plain")), progress=False)
    bucketed = finetune.train_lora(tiny_config(*smoke_overrides(tmp_path / "buckets", "data.buckets=[8,16]")),
                                        progress=False)
    a = json.loads((tmp_path / "plain" / "metrics.json").read_text())["epochs"]
    b = json.loads((tmp_path / "buckets" / "metrics.json").read_text())["epochs"]
    for x, y in zip(a, b):
        for split in ("train", "val"):
            np.testing.assert_allclose(y[split]["loss"], x[split]["loss"], rtol=1e-5)  # fp32: shapes differ only
            assert y[split]["accuracy"] == x[split]["accuracy"]
    assert plain["best_epoch"] == bucketed["best_epoch"]


def test_bucket_lengths_cut_batches():
    short = synthetic_split(40, 3, length=8)  # rows of 3..8 tokens, padded out to 20 columns
    pad = np.full((40, 12), data_lib.PAD_ID, np.int32)
    split = data_lib.EncodedSplit(np.concatenate([short.input_ids, pad], 1),
                                  np.concatenate([short.attention_mask, 0 * pad], 1), short.labels, 0)
    widths = {b["input_ids"].shape[1] for b in data_lib.batch_iterator(split, 8, shuffle=False, lengths=(4, 8, 12))}
    assert widths == {8}  # every batch of 8 holds a row of 7-8 tokens: cut from 20 to the 8 bucket
    assert data_lib.bucket_length(13, (8, 16), 20) == 16 and data_lib.bucket_length(17, (8, 16), 20) == 20
