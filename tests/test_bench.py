"""scripts/bench.py's machinery on the tiny model: every bench runs and writes the documented JSON fields.

Timings themselves are not asserted (they belong to bench.py's output, not to tests); what is checked is that
the benches run the real steps, report what they measured under the documented names, and refuse bad flags; that
they need nothing outside the repository (packaged CoLA and tokenizer, no `datasets`, which the GPU image lacks);
and that benchmarks/peer_torch.py, the PyTorch peer, times the very batch the JAX benches time."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_kd_jax.commands import bench
from lora_kd_jax.assets import COLA_DIR, TOKENIZER_DIR
from lora_kd_jax.commands.cli import main_bench
from tiny import run_python

REPO = Path(__file__).resolve().parents[1]

REQUIRED = {"bench", "variant", "mode", "batch", "seq", "ms_per_step", "seq_per_s", "first_step_s", "device"}


def test_every_bench_reports_the_documented_fields(tmp_path, monkeypatch):
    """Every bench on the tiny model, with `datasets` unimportable (the GPU image has none): the epoch bench reads,
    encodes and runs without it."""
    monkeypatch.setattr(bench, "EPOCH_LAYOUTS", (([], 0), ([16], 4)))  # one bucket: 2 step shapes to compile, not 4
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    out = tmp_path / "bench.jsonl"
    args = bench.BenchArgs(variants=["tiny"], modes=["fp32"], benches=list(bench.BENCHES), batch=8, seq=32, steps=2,
                           warmup=0, peak_tflops=1.0, student_dtypes=["auto", "bfloat16"], data_dir=str(COLA_DIR),
                           tokenizer=str(TOKENIZER_DIR), limit=64, out=str(out))
    records = bench.run(args)
    assert [json.loads(line) for line in out.read_text().splitlines()] == records  # stdout lines == --out lines
    for r in records:
        assert REQUIRED <= r.keys(), (r["bench"], REQUIRED - r.keys())
        assert r["ms_per_step"] > 0 and r["seq_per_s"] > 0 and r["first_step_s"] > 0
        assert (r["variant"], r["mode"], r["batch"]) == ("tiny", "fp32", 8)
    by_bench = {}
    for r in records:
        by_bench.setdefault(r["bench"], []).append(r)
    assert set(by_bench) == set(bench.BENCHES)

    (lora,) = by_bench["lora_train_step"]
    longest = int(bench.peer_batch(8, 32)["attention_mask"].sum(axis=1).max())  # lengths < 32/2 + 8
    assert lora["seq"] == 32 and lora["seq_run"] == -(-longest // 8) * 8 < 32  # all-padding columns trimmed
    assert lora["gflop_per_step"] > 0 and 0 < lora["mfu"]  # XLA's count, against the peak given
    for name in ("distill_step", "distill_step_cached"):  # the student once per requested dtype
        assert [r["student_dtype"] for r in by_bench[name]] == ["float32", "bfloat16"]

    padded, bucketed = by_bench["epoch"]
    assert [(r["buckets"], r["group_window"]) for r in (padded, bucketed)] == list(bench.EPOCH_LAYOUTS)
    for r in (padded, bucketed):
        assert (r["examples"], r["steps"]) == (64, 8)
        assert 0 <= r["input_pipeline_s"] <= r["epoch_s"]
        assert r["input_pipeline_share"] == pytest.approx(r["input_pipeline_s"] / r["epoch_s"], rel=0.05)  # rounded


@pytest.mark.parametrize("flag, value", [("--modes", "compile-bf16"), ("--variants", "gpt3"),
                                         ("--benches", "epochs"), ("--student-dtypes", "fp16"),
                                         ("--lora-variants", "vera")])
def test_unknown_flag_values_are_refused_by_name(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main_bench([flag, value, "--variants" if flag != "--variants" else "--modes",
                    "tiny" if flag != "--variants" else "fp32"])
    assert f"{flag}: unknown value '{value}'" in str(e.value.code)


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--limit", "-1"], ["--student-dtypes", ","]])
def test_out_of_range_counts_are_refused(flags):
    with pytest.raises(SystemExit) as e:
        main_bench(["--variants", "tiny", *flags])
    assert "expected --steps >= 1, --limit >= 0 and at least one student dtype" in str(e.value.code)


def test_lora_variants_bench_times_each_variant_beside_plain_lora():
    """--lora-variants: plain LoRA first (ratio 1), then each variant's real train step, with its ratio."""
    args = bench.BenchArgs(variants=["tiny"], modes=["fp32"], benches=[], batch=4, seq=16, steps=2, warmup=0,
                           lora_variants=["dora"])
    recs = bench.run(args)
    assert [r["lora_variant"] for r in recs] == ["lora", "dora"] and recs[0]["ratio_vs_lora"] == 1.0
    assert all(REQUIRED <= set(r) and r["bench"] == "lora_train_step" and len(r["round_ms"]) == 5 for r in recs)
    assert recs[1]["ratio_vs_lora"] == pytest.approx(recs[1]["ms_per_step"] / recs[0]["ms_per_step"], rel=1e-2)


def test_cached_distillation_alone_builds_no_gpt2(monkeypatch):
    """Only the student runs in distill_step_cached: the (gpt2-size) teacher is not built for it."""
    monkeypatch.setattr(bench, "build_classifier", lambda *a, **k: pytest.fail("GPT-2 built for nothing"))
    args = bench.BenchArgs(variants=["tiny"], modes=["fp32"], benches=["distill_step_cached"], batch=4, seq=16,
                           steps=1, warmup=0)
    assert [r["bench"] for r in bench.run(args)] == ["distill_step_cached"]


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or of shapes (jax.ShapeDtypeStruct)."""
    import jax

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_seeded_benches_report_per_seed_time_and_memory():
    """--seeds 1,2: seeded benches once per seed count; the seed axis costs exactly one more train state
    and batch per seed in the executable's arguments, the frozen base being shared (not stacked)."""
    import jax

    from lora_kd_jax.models.build import build_classifier
    from lora_kd_jax.training.state import seed_states

    benches = ["lora_train_step", "distill_step_cached", "student_step"]
    args = bench.BenchArgs(variants=["tiny"], modes=["fp32"], benches=benches, batch=8, seq=32,
                           steps=1, warmup=0, trim=False, seeds=[1, 2])
    records = bench.run(args)
    assert [(r["bench"], r["seeds"]) for r in records] == [(b, n) for b in benches for n in (1, 2)]
    for r in records:
        assert REQUIRED <= r.keys(), (r["bench"], REQUIRED - r.keys())
        assert (r["variant"], r["mode"], r["batch"], r["seq_run"]) == ("tiny", "fp32", 8, 32)
        assert r["ms_per_step"] > 0 and r["first_step_s"] > 0 and r["compile_s"] > 0
        assert r["ms_per_seed_step"] == pytest.approx(r["ms_per_step"] / r["seeds"], abs=1e-3)  # both rounded
        # all seeds; seq_per_s is rounded to 0.1 (off by up to 0.05), ms_per_step to 0.001 ms (relative 1e-3 at most)
        assert r["seq_per_s"] == pytest.approx(r["seeds"] * 8 / (r["ms_per_step"] / 1e3), rel=1e-3, abs=0.05)
    batches = {n: bench.seeded_batch(args, n) for n in (1, 2)}
    for r in records:
        assert r["real_tokens"] == int(batches[r["seeds"]]["attention_mask"].sum())
    assert (batches[2]["input_ids"][0] == batches[1]["input_ids"][0]).all()  # seed 0's batch is the peer's
    assert (batches[2]["input_ids"][0] != batches[2]["input_ids"][1]).any()  # seed 1 draws its own
    arg = {(r["bench"], r["seeds"]): r["argument_bytes"] for r in records}

    cfg = bench.variant_config("tiny", "fp32")  # shapes only: what the bench built, without building it again
    model, _ = build_classifier(cfg, jax.random.key(0))

    def state_and_frozen():  # seed 0's as the bench builds it (the one state recipe)
        setup = seed_states(model, 1e-3, [0], stacked=False)
        return setup.state, setup.frozen

    state, frozen = jax.eval_shape(state_and_frozen)
    frozen_bytes = tree_bytes(frozen)
    state_bytes = tree_bytes(state)  # trainable + Adam + step + rng
    one = bench.peer_batch(8, 32)
    batch_bytes = tree_bytes({k: v for k, v in one.items() if k != "index"})  # unread by the LoRA step: jit drops it
    extra = arg[("lora_train_step", 2)] - arg[("lora_train_step", 1)]
    assert extra < frozen_bytes  # the base is not stacked
    assert extra == state_bytes + batch_bytes
    assert arg[("lora_train_step", 1)] == frozen_bytes + state_bytes + batch_bytes
    # the cached distillation step reads, per seed, its own teacher's logits for the batch's rows ([B, 2] float32)
    # and the rows' index (int32 [B]); everything else is the RNN baseline's step, seed for seed
    for n in (1, 2):
        assert arg[("distill_step_cached", n)] - arg[("student_step", n)] == n * 8 * (2 * 4 + 4)
    student_extra = arg[("student_step", 2)] - arg[("student_step", 1)]
    assert student_extra == arg[("student_step", 1)]  # a student has no frozen part: every byte is per seed


@pytest.mark.parametrize("value", ["0", "1,1", "two", "1,,2", "-1"])
def test_bad_seed_counts_are_refused(value):
    from lora_kd_jax.commands import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--variants", "tiny", "--modes", "fp32", f"--seeds={value}"])
    assert str(e.value.code) == (f"usage error: --seeds '{value}': expected a comma list of distinct positive seed "
                                 "counts, e.g. --seeds 1,2,4,8")


def test_seeds_flag_selects_the_seeded_benches(monkeypatch):
    from lora_kd_jax.commands import cli

    seen = []
    monkeypatch.setattr(bench, "run", seen.append)
    cli.main(["bench", "--variants", "tiny", "--modes", "fp32", "--seeds", "1,4"])
    cli.main(["bench", "--variants", "tiny", "--modes", "fp32", "--seeds", "2", "--benches", "student_step"])
    cli.main(["bench", "--variants", "tiny", "--modes", "fp32"])
    assert [(a.seeds, a.benches) for a in seen] == [([1, 4], list(bench.SEEDED_BENCHES)), ([2], ["student_step"]),
                                                    ([], list(bench.BENCHES))]
    with pytest.raises(SystemExit) as e:  # a single-seed-only bench with --seeds
        cli.main(["bench", "--variants", "tiny", "--seeds", "2", "--benches", "teacher_forward"])
    assert "--benches (with --seeds): unknown value 'teacher_forward'" in str(e.value.code)


def test_default_paths_are_the_packaged_assets():
    data_dir, tokenizer = bench.default_paths()
    assert (data_dir, tokenizer) == (str(COLA_DIR), str(TOKENIZER_DIR))
    assert Path(data_dir, "in_domain_train.tsv").is_file() and Path(tokenizer, "vocab.json").is_file()
    import lora_kd_jax

    assert Path(data_dir).is_relative_to(Path(lora_kd_jax.__file__).parent)  # inside the package, wherever installed


def test_importing_the_bench_imports_no_datasets():
    code = ("import sys, lora_kd_jax.commands.bench, lora_kd_jax.commands.cli\n"
            "sys.exit('datasets imported' if 'datasets' in sys.modules else None)")
    run_python(code, cwd=REPO)


def test_the_epoch_bench_reads_its_data_without_datasets():
    """The GPU image has no `datasets`: the epoch bench's reader (data.load_splits from local files) must not need
    it. Importing it is made to fail, as it fails there."""
    code = ("import sys; sys.modules['datasets'] = None\n"
            "from lora_kd_jax.commands import bench\n"
            "from lora_kd_jax.assets import COLA_DIR, TOKENIZER_DIR\n"
            "cfg = bench.variant_config('tiny', 'fp32', f'data.dir={COLA_DIR}', f'data.tokenizer={TOKENIZER_DIR}',"
            " 'data.limit=12')\n"
            "print(sorted((k, len(v)) for k, v in bench.epoch_splits(cfg).items()))")
    done = run_python(code, timeout=120)
    assert done.stdout.strip() == "[('out_of_domain', 12), ('train', 12), ('validation', 12)]"


def test_epoch_splits_match_the_training_pipeline():
    """What the bench encodes is what training encodes: the first `limit` rows of the training file, same tokens."""
    from lora_kd_jax import data as data_lib

    cfg = bench.variant_config("tiny", "fp32", f"data.dir={COLA_DIR}", f"data.tokenizer={TOKENIZER_DIR}",
                               "data.limit=12")
    split = bench.epoch_splits(cfg)["train"]
    sentences, labels = data_lib.read_cola_tsv(COLA_DIR / "in_domain_train.tsv")
    expected = data_lib.encode(sentences[:12], labels[:12], data_lib.load_tokenizer(str(TOKENIZER_DIR)),
                               cfg.data.max_length)
    assert len(split) == 12
    for field in ("input_ids", "attention_mask", "labels"):
        np.testing.assert_array_equal(getattr(split, field), getattr(expected, field))


def load_peer():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("peer_torch", REPO / "benchmarks" / "peer_torch.py")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    return peer


def test_peer_times_the_same_batch_as_the_jax_benches():
    import torch

    peer = load_peer()
    ids, mask, labels = peer.peer_batch(16, 32, torch.device("cpu"))
    ours = bench.peer_batch(16, 32)
    np.testing.assert_array_equal(ids.numpy(), ours["input_ids"])
    np.testing.assert_array_equal(mask.numpy(), ours["attention_mask"])
    np.testing.assert_array_equal(labels.numpy(), ours["labels"])


def test_peer_reports_every_step_with_the_documented_fields(tmp_path):
    peer = load_peer()
    out = tmp_path / "peer.jsonl"
    records = peer.run(peer.parse_args(["--tiny", "--modes", "fp32", "--batch", "4", "--seq", "16", "--steps", "1",
                                        "--out", str(out)]))
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    assert [r["bench"] for r in records] == ["lora_train_step", "teacher_forward", "distill_step"]
    for r in records:
        assert REQUIRED - {"first_step_s"} <= r.keys(), (r["bench"], REQUIRED - r.keys())
        assert (r["impl"], r["variant"], r["mode"], r["batch"], r["seq"]) == ("torch+peft", "tiny", "fp32", 4, 16)
        assert r["ms_per_step"] > 0 and r["seq_per_s"] > 0
    lora = records[0]
    assert lora["first_step_s"] >= 0 and 0 < lora["trainable"] < lora["total"]
    assert lora["real_tokens"] == int(bench.peer_batch(4, 16)["attention_mask"].sum())


@pytest.mark.parametrize("flags", [["--modes", "fp16"], ["--variants", "gpt3"], ["--steps", "0"]])
def test_peer_refuses_bad_flags(flags):
    peer = load_peer()
    with pytest.raises(SystemExit) as e:
        peer.parse_args(flags)
    assert e.value.code == 2


def test_family_bench_times_the_lora_step_and_counts_as_the_peer():
    """--family bert: the LoRA train step of a BERT classifier, the documented fields plus family and counts; the
    PyTorch peer's --family bert builds the same classifier (PEFT's trainable count is ours; its total holds the
    head twice, the original and PEFT's trained copy) and times the same ids."""
    args = bench.BenchArgs(variants=["tiny"], modes=["fp32"], benches=["lora_train_step"], batch=4, seq=16, steps=1,
                           warmup=0, family="bert")
    (rec,) = bench.run(args)
    assert REQUIRED <= rec.keys() and (rec["bench"], rec["family"], rec["variant"], rec["batch"]) == (
        "lora_train_step", "bert", "tiny", 4)
    assert rec["ms_per_step"] > 0 and rec["gflop_per_step"] > 0
    peer = load_peer()
    (theirs,) = peer.run(peer.parse_args(["--family", "bert", "--variants", "tiny", "--modes", "fp32", "--batch", "4",
                                          "--seq", "16", "--steps", "1"]))
    assert (theirs["bench"], theirs["family"], theirs["variant"]) == ("lora_train_step", "bert", "tiny")
    head = 64 * 2 + 2  # the classifier's kernel and bias
    assert (rec["trainable"], rec["total"]) == (theirs["trainable"], theirs["total"] - head)
    assert rec["real_tokens"] == theirs["real_tokens"]


def test_peer_times_the_same_family_batch():
    """A family's ids are drawn below its vocabulary, in the same order; the peer pads with the family's pad id, the
    JAX batch with GPT-2's (which the encoders read as their own pad: tests/test_families.py)."""
    import torch

    peer = load_peer()
    for family in bench.FAMILY_VOCAB:
        ids, mask, labels = peer.peer_batch(16, 32, torch.device("cpu"), peer.FAMILY_VOCAB[family],
                                            peer.FAMILY_PAD[family])
        ours = bench.peer_batch(16, 32, vocab=bench.FAMILY_VOCAB[family])
        real = ours["attention_mask"] == 1
        np.testing.assert_array_equal(ids.numpy()[real], ours["input_ids"][real])
        assert (ids.numpy()[~real] == peer.FAMILY_PAD[family]).all() and ids.max() < bench.FAMILY_VOCAB[family]
        np.testing.assert_array_equal(mask.numpy(), ours["attention_mask"])
        np.testing.assert_array_equal(labels.numpy(), ours["labels"])
    assert (peer.FAMILY_SIZES, peer.FAMILY_VOCAB) == (bench.FAMILY_SIZES, bench.FAMILY_VOCAB)


@pytest.mark.parametrize("flags, message", [
    (["--family", "bert", "--benches", "teacher_forward"],
     "--benches (with --family bert): unknown value 'teacher_forward'"),
    (["--family", "llama", "--variants", "gpt2"], "--variants: unknown value 'gpt2'; choose from tiny, base"),
    (["--family", "roberta", "--seeds", "2"], "--family roberta times the LoRA train step alone"),
])
def test_family_flags_are_checked(flags, message):
    from lora_kd_jax.commands import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *flags])
    assert message in str(e.value.code)


def test_family_flag_defaults_to_the_base_size(monkeypatch):
    from lora_kd_jax.commands import cli

    seen = []
    monkeypatch.setattr(bench, "run", seen.append)
    cli.main(["bench", "--family", "llama", "--modes", "fp32"])
    cli.main(["bench", "--modes", "fp32"])
    assert [(a.family, a.variants, a.benches) for a in seen][0] == ("llama", ["base"], ["lora_train_step"])
    assert (seen[1].family, seen[1].variants) == (None, ["gpt2", "gpt2-medium"])


def test_the_load_bench_writes_a_sharded_checkpoint_and_measures_both_loaders(tmp_path):
    """`bench --load` at a tiny size: transformers' sharded layout (index + shards), each loader in its own process,
    their seconds and peak memory reported under the documented names; the shards hold exactly the index's tensors."""
    from safetensors import safe_open

    from lora_kd_jax.commands.bench_load import bench_load

    records = list(bench_load("tiny", sizes=(2, 64, 4), keep=str(tmp_path / "ckpt"), shard_mb=4))
    assert [r["impl"] for r in records] == ["jax", "torch"]
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and all(r["shards"] == len(files) for r in records)
    held = {}
    for f in files:
        with safe_open(str(tmp_path / "ckpt" / f), "np") as st:
            held.update({k: st.get_tensor(k).nbytes for k in st.keys()})
    assert set(held) == set(index["weight_map"]) and sum(held.values()) == index["metadata"]["total_size"]
    for r in records:
        assert r["checkpoint_bytes"] == sum(held.values()) and r["params"] == r["checkpoint_bytes"] // 4
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > 0
        assert r["rss_ratio"] == round(r["peak_rss_bytes"] / r["checkpoint_bytes"], 3)
