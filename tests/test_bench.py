"""scripts/bench.py's machinery on the tiny model: every bench runs and writes the documented JSON fields.

Timings themselves are not asserted (they belong to bench.py's output, not to tests); what is checked is that
the benches run the real steps, report what they measured under the documented names, and refuse bad flags."""
from __future__ import annotations

import json

import pytest
from tiny import COLA_DIR, TOKENIZER_DIR

from lora_kd_jax import bench
from lora_kd_jax.cli import main_bench

REQUIRED = {"bench", "variant", "mode", "batch", "seq", "ms_per_step", "seq_per_s", "first_step_s", "device"}


def test_every_bench_reports_the_documented_fields(tmp_path):
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
                                         ("--benches", "epochs"), ("--student-dtypes", "fp16")])
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


def test_cached_distillation_alone_builds_no_gpt2(monkeypatch):
    """Only the student runs in distill_step_cached: the (gpt2-size) teacher is not built for it."""
    monkeypatch.setattr(bench, "build_classifier", lambda *a, **k: pytest.fail("GPT-2 built for nothing"))
    args = bench.BenchArgs(variants=["tiny"], modes=["fp32"], benches=["distill_step_cached"], batch=4, seq=16,
                           steps=1, warmup=0)
    assert [r["bench"] for r in bench.run(args)] == ["distill_step_cached"]
