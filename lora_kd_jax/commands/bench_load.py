"""`bench --load`: how long reading a checkpoint takes and how much host memory it needs, beside transformers' own
PyTorch `from_pretrained` of the same files in the same run.

A random checkpoint of GPT-2's layout at a released size (gpt2-large: 774M parameters, 3.1 GB in float32) is written
as sharded safetensors (an index and shards of `shard_mb`), as transformers writes big checkpoints. Each loader then
runs in a fresh process that reports its wall time and its peak resident memory (the kernel's ru_maxrss), so the
imports each needs are counted, as a user pays them; `rss_ratio` is that peak over the checkpoint's bytes.
"""
from __future__ import annotations

import importlib.util

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from lora_kd_jax.commands.bench_timing import device_name

# the child processes: load, then print {"seconds", "peak_rss_bytes"} as one JSON line
JAX_LOAD = """
import json, resource, sys, time
t0 = time.perf_counter()
import jax
from lora_kd_jax.core.config import load_config
from lora_kd_jax.models.build import build_classifier
cfg = load_config(None, ["model.init=pretrained", f"model.path={sys.argv[1]}"])
model, params = build_classifier(cfg, jax.random.key(0), with_lora=False)
jax.block_until_ready(params)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
TORCH_LOAD = """
import json, resource, sys, time
t0 = time.perf_counter()
from transformers import GPT2Model
model = GPT2Model.from_pretrained(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_checkpoint(out_dir: Path, n_layer: int, n_embd: int, n_head: int, *, shard_mb: int = 500,
                     seed: int = 0) -> int:
    """A random GPT-2 of these sizes as transformers writes it (config.json, model.safetensors.index.json and
    shards of at most `shard_mb` MB, PyTorch's names and layouts); returns the tensors' bytes. One shard is in memory
    at a time."""
    from safetensors.numpy import save_file
    from transformers import GPT2Config

    out_dir.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    config.save_pretrained(str(out_dir))
    e, v, p = n_embd, config.vocab_size, config.n_positions
    shapes = {"wte.weight": (v, e), "wpe.weight": (p, e)}
    for i in range(n_layer):
        h = f"h.{i}."
        shapes.update({h + "ln_1.weight": (e,), h + "ln_1.bias": (e,), h + "attn.c_attn.weight": (e, 3 * e),
                       h + "attn.c_attn.bias": (3 * e,), h + "attn.c_proj.weight": (e, e), h + "attn.c_proj.bias": (e,),
                       h + "ln_2.weight": (e,), h + "ln_2.bias": (e,), h + "mlp.c_fc.weight": (e, 4 * e),
                       h + "mlp.c_fc.bias": (4 * e,), h + "mlp.c_proj.weight": (4 * e, e), h + "mlp.c_proj.bias": (e,)})
    shapes.update({"ln_f.weight": (e,), "ln_f.bias": (e,)})
    rng = np.random.default_rng(seed)
    shards: list[dict[str, np.ndarray]] = [{}]
    names: list[str] = []
    total = size = 0
    weight_map = {}

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shards[-1], str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shards[-1]})
        names.append(name)
        shards[-1] = {}

    for key, shape in shapes.items():
        tensor = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        if size and size + tensor.nbytes > shard_mb * 2 ** 20:
            flush()
            size = 0
        shards[-1][key] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    count = len(names)
    for i, name in enumerate(names):  # transformers' names: model-0000i-of-0000n
        final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        os.replace(out_dir / name, out_dir / final)
        weight_map = {k: (final if f == name else f) for k, f in weight_map.items()}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def _child(code: str, ckpt: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, env=env,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the loader failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_load(size: str = "gpt2-large", sizes: tuple[int, int, int] | None = None, keep: str | None = None,
               shard_mb: int = 500, torch_too: bool = True) -> Iterable[dict]:
    """Records of loading the checkpoint of `size` (its layers, width, heads: `sizes`) with this library and, when
    torch is installed and `torch_too`, with transformers' PyTorch GPT2Model.from_pretrained."""
    from lora_kd_jax.models.families import named_size

    n_layer, n_embd, n_head = sizes or named_size(size)[1]
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        ckpt = Path(keep) if keep else Path(tmp) / "ckpt"
        t0 = time.perf_counter()
        total = write_checkpoint(ckpt, n_layer, n_embd, n_head, shard_mb=shard_mb)
        written = time.perf_counter() - t0
        shards = len(list(ckpt.glob("model-*.safetensors")))
        loaders = [("jax", JAX_LOAD)]
        if torch_too and importlib.util.find_spec("torch") is not None:  # the peer needs PyTorch
            loaders.append(("torch", TORCH_LOAD))
        for impl, code in loaders:
            got = _child(code, ckpt)
            yield {"bench": "load", "impl": impl, "variant": size, "n_layer": n_layer, "n_embd": n_embd,
                   "params": total // 4, "checkpoint_bytes": total, "shards": shards,
                   "seconds": round(got["seconds"], 2), "peak_rss_bytes": got["peak_rss_bytes"],
                   "rss_ratio": round(got["peak_rss_bytes"] / total, 3), "write_s": round(written, 1),
                   "device": device_name()}
