#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): the JAX benchmarks and the PyTorch peer, same machine, same run.
#
# Everything else it needs is in the repository: benchmarks/peer_torch.py, and the CoLA files and GPT-2 tokenizer the
# package ships (scripts/bench.py's defaults). Since the move to transformers 5 and this project's own modules, the
# device image holds every package the benches import (JAX, Flax, Optax, Orbax, transformers 5, safetensors,
# tokenizers; torch and PEFT for the peer; the epoch bench reads CoLA without `datasets`), so nothing is carried:
#   run(command="bash scripts/gpu_check.sh", timeout_s=420)
#
# Stages run in order of what the performance issue needs most, each capped by its own limit and by what is left of
# BUDGET seconds (a stage with under 30 s left is skipped and says so), each appending JSON lines to $OUT/jax.jsonl
# as it goes: whatever a stage finishes survives a later stage's cut. The compilation cache starts empty, so
# first_step_s and compile_s are cold compiles.
# Rehearse it here on the CPU (tiny model, a few steps, same stages and flags): GPU_CHECK_REHEARSAL=1 bash $0
set -uo pipefail
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXX)}; mkdir -p "$OUT"; echo "results in $OUT"
BUDGET=${BUDGET:-330}
if [ "${GPU_CHECK_REHEARSAL:-0}" = 1 ]; then
  PY=${PY:-.venv/bin/python}; SMALL=tiny; MEDIUM=tiny; STEPS=3; LIMIT="--limit 256"; LOAD=distilgpt2
  PEER_FLAGS="--tiny --modes fp32"
else
  PY=python3; SMALL=gpt2; MEDIUM=gpt2-medium; STEPS=30; LIMIT=""; LOAD=gpt2-large
  PEER_FLAGS="--modes bf16,compile-bf16"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  "$PY" -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|orbax-checkpoint|transformers|peft|torch) " \
    | tee "$OUT/packages.txt"
fi
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$(mktemp -d /tmp/jaxcache.XXXX)
DEADLINE=$((SECONDS + BUDGET))
limit_for() {  # limit_for WANT: seconds this stage may use, 0 when it should be skipped
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
bench() {  # bench WANT FLAGS...: one stage of scripts/bench.py (this checkout's package on PYTHONPATH)
  local limit; limit=$(limit_for "$1"); shift
  if [ "$limit" = 0 ]; then echo "== skipped, out of time: bench.py $*"; return; fi
  echo "== bench.py $* (limit ${limit}s, $((DEADLINE - SECONDS))s left)"
  PYTHONPATH="$PWD" timeout "$limit" "$PY" scripts/bench.py --steps "$STEPS" --peak-tflops 989 $LIMIT \
    --out "$OUT/jax.jsonl" "$@" 2>>"$OUT/jax.err" >/dev/null || echo "   exit $? (see jax.err)"
}
peer() {  # the PyTorch peer with the image's own torch/transformers 5/peft, same machine, same call
  local limit; limit=$(limit_for "$1"); shift
  if [ "$limit" = 0 ]; then echo "== skipped, out of time: peer_torch.py $*"; return; fi
  echo "== peer_torch.py $* (limit ${limit}s)"
  timeout "$limit" "$PY" benchmarks/peer_torch.py "$@" --steps "$STEPS" --out "$OUT/peer.jsonl" 2>"$OUT/peer.err" \
    >/dev/null || echo "   exit $? (see peer.err)"
}
# 1. the goals: gpt2 bf16 LoRA step, teacher forward, distillation step (teacher inside), first step
bench 120 --variants $SMALL --modes bf16 --benches lora_train_step,teacher_forward,distill_step
# 2. the peer on the same card, for the ratios
peer 100 --variants $SMALL $PEER_FLAGS
# 3. the student's dtype: measured, not assumed (precision.py picks float32 for it on GPUs)
bench 60 --variants $SMALL --modes bf16 --benches distill_step_cached --student-dtypes float32,bfloat16
# 4. a full CoLA epoch, padded to 20 and length-aware, data pipeline included
bench 90 --variants $SMALL --modes bf16 --benches epoch
# 5. many seeds at once (train.seeds): ms per step and per seed-step at 1 and 5 seeds (the goal: 5 seeds of the
#    study in at most twice one seed's time)
bench 60 --variants $SMALL --modes bf16 --seeds 1,5
# 6. gpt2-medium
bench 90 --variants $MEDIUM --modes bf16 --benches lora_train_step,teacher_forward
# 7. QLoRA: the NF4 and int8 bases' step beside plain LoRA's (records carry base_bytes and ratio_vs_lora)
bench 60 --variants $SMALL --modes bf16 --lora-variants qlora_nf4,qlora_int8
# 8. reading a sharded safetensors checkpoint (gpt2-large shaped) onto the device, beside transformers' own
bench 60 --load $LOAD
# 9. fp32 for reference
bench 60 --variants $SMALL --modes fp32 --benches lora_train_step,teacher_forward
echo "== stages took $((SECONDS - DEADLINE + BUDGET)) s of $BUDGET"
"$PY" - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("jax.jsonl", "peer.jsonl"):
    p = out / name
    for line in (p.read_text().splitlines() if p.exists() else []):
        r = json.loads(line)
        if r["bench"] == "load":  # seconds and peak host memory, not a step time
            print(f"{r['impl']:6} load {r['variant']:12} {r['seconds']} s  peak RSS {r['rss_ratio']}x the checkpoint")
            continue
        extra = {k: r[k] for k in ("seeds", "ms_per_seed_step", "student_dtype", "buckets", "group_window", "epoch_s",
                                   "input_pipeline_share", "compile_s", "lora_variant", "base_bytes") if k in r}
        print(f"{r.get('impl', 'torch'):6} {r['bench']:20} {r['variant']:12} {r['mode']:13} {r['ms_per_step']:9.2f} ms"
              f"  first {r.get('first_step_s')} s  mfu {r.get('mfu')}  {extra}")
PY
