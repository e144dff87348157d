#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): the JAX benchmarks and the PyTorch peer, same machine, same run.
#
# Prepare here once (nothing can be fetched there; these lie in git-ignored folders that `carry` names):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.0 datasets==5.0.1 dill multiprocess
#   mkdir -p .peer && cp -r ../shared/bench/peer_torch.py ../shared/data/cola ../shared/gpt2-tokenizer .peer/
# (.whl and .peer are git-ignored: the data and tokenizer files are never committed)
# Then: run(command="bash scripts/gpu_check.sh", carry=[".whl", ".peer"], timeout_s=540)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "carry .whl (see the header of this script)"; exit 1; }
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
# our package needs transformers 4.57 (Flax GPT-2): on PYTHONPATH for our process only
PYTHONPATH=/tmp/site:$PWD timeout 330 python3 scripts/bench.py --variants gpt2,gpt2-medium --modes bf16,fp32 \
  --steps 30 --peak-tflops 989 --data-dir .peer/cola --tokenizer .peer/gpt2-tokenizer \
  --out "$OUT/jax.jsonl" 2>"$OUT/jax.err" || echo "bench.py exit $? (see jax.err)"
# the peer with the image's own torch/transformers 5/peft
[ -f .peer/peer_torch.py ] && timeout 150 python3 .peer/peer_torch.py --variants gpt2,gpt2-medium \
  --modes bf16,compile-bf16 --out "$OUT/peer.jsonl" 2>"$OUT/peer.err" || echo "peer exit $?"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("jax.jsonl", "peer.jsonl"):
    p = out / name
    for line in (p.read_text().splitlines() if p.exists() else []):
        r = json.loads(line)
        print(f"{r.get('impl','?'):10} {r['bench']:20} {r['variant']:12} {r['mode']:13} {r['ms_per_step']:9.2f} ms"
              f"  first {r.get('first_step_s')}  mfu {r.get('mfu')}")
PY
