"""Hugging Face checkpoints in: which family a checkpoint is, the sizes it fixes, and its weights read tensor by
tensor onto the run's devices.

A checkpoint is a directory written by `save_pretrained` (`model.path`), or the hub snapshot of an id in model.name,
found by transformers' own `cached_file` (the hub cache is read first; HF_HUB_OFFLINE=1 keeps it offline). Weights:
`model.safetensors`, a sharded `model.safetensors.index.json` and its shards, `pytorch_model.bin` (needs torch), or
a `flax_model.msgpack` of transformers 4's Flax classes. Names go through the one converter (`hf_names`).

Safetensors are read one tensor at a time into the array that is placed: cast to its leaf's dtype and put with
its sharding (each device receives only its slice of an FSDP-sharded leaf; the whole checkpoint is never on the host
at once). Everything a file promises is checked before any tensor is read, so
a bad checkpoint ends in one `ModelLoadError` naming the file and the tensor, with nothing half-loaded.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from lora_kd_jax.core.errors import UserError, first_line
from lora_kd_jax.models import hf_names
from lora_kd_jax.models.families import FAMILIES, Family

log = logging.getLogger(__name__)
Params = dict[str, Any]

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, FLAX_MSGPACK = "pytorch_model.bin", "flax_model.msgpack"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, FLAX_MSGPACK)  # what the loader reads, in this order
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class ModelLoadError(UserError, OSError):
    """A checkpoint could not be read (no network for a hub id, a missing or damaged file, a tensor that does not
    fit); the message names the file and the tensor."""
    label = "model error"


@contextlib.contextmanager
def quiet_hub():
    """huggingface_hub logs every retry of an unreachable hub; the error raised here says it once."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def hub_snapshot(name: str) -> Path:
    """The local snapshot dir of hub id `name` with its config.json and weights (shards included), found in the hub
    cache or fetched into it. An id that cannot be reached or is not cached is an error naming it and what to do."""
    from transformers.utils import cached_file

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    fetch = lambda f: cached_file(name, f, _raise_exceptions_for_missing_entries=False)  # noqa: E731
    try:
        with quiet_hub():
            config = cached_file(name, "config.json")
            weights = [f for f in WEIGHT_FILES if fetch(f)]
            if weights and weights[0] == SAFETENSORS_INDEX:
                index = json.loads(Path(fetch(SAFETENSORS_INDEX)).read_text())
                for shard in sorted(set(index.get("weight_map", {}).values())):
                    fetch(shard)
    except Exception as e:  # hub errors come in many types (offline, no such repo, gated, network): the user's to fix
        where = "HF_HUB_OFFLINE=1 and it is not in the hub cache" if offline else "no network, or no such repository"
        raise ModelLoadError(
            f"model.name={name}: the checkpoint could not be loaded from the Hugging Face hub ({where}: "
            f"{type(e).__name__}: {first_line(e)}); cache it once with network access (`hf download {name}`, or "
            "HF_HUB_CACHE pointing at a cache that holds it), set model.path=DIR to a save_pretrained checkpoint, "
            "or model.init=random for a pipeline check without pretrained weights") from None
    if config is None or not weights:
        raise ModelLoadError(f"model.name={name}: the hub repository{' (as cached: HF_HUB_OFFLINE=1)' if offline else ''}"
                             f" has {'no config.json' if config is None else 'no weights'} (looked for "
                             f"{', '.join(WEIGHT_FILES)})")
    return Path(config).parent


def read_config(where: Path, source: str) -> dict:
    """config.json of a checkpoint dir as a dict; its model_type must be a family's (the error lists them).
    Read through transformers' config class, which folds old keys into today's (Llama's rope_theta into
    rope_parameters)."""
    path = where / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{source}: no config.json in {where}; expected a directory written by save_pretrained"
                             ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable config.json ({e})") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind not in FAMILIES:
        raise ModelLoadError(f"{path}: model_type {kind!r} is not a family this library fine-tunes (it serves "
                             f"{', '.join(FAMILIES)})")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.fspath(where)).to_dict()
    except Exception as e:  # a config.json transformers cannot read is the user's file to fix
        raise ModelLoadError(f"{path}: transformers cannot read it as a {kind} config ({type(e).__name__}: "
                             f"{first_line(e)})") from None


# ------------------------------------------------------------------------------------------------ weights

DtypeFor = Callable[[tuple[str, ...]], Any]
ShardingFor = Callable[[tuple[str, ...], tuple[int, ...]], Any]
OnHost = Callable[[tuple[str, ...]], bool]


def weight_file(where: Path, family: Family) -> Path:
    """The weights file the loader reads in `where` (the first of WEIGHT_FILES present)."""
    for name in WEIGHT_FILES:
        if (where / name).is_file():
            return where / name
    raise ModelLoadError(f"{where}: no {family.name} weights found (looked for {', '.join(WEIGHT_FILES)}); write them "
                         "with save_pretrained, or set model.init=random")


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16"}


class _Tensors:
    """The safetensors files of a checkpoint, their headers read and checked: key -> (file, dtype, shape, offset).

    The format is read here (an 8-byte header length, a JSON header, the data) rather than memory-mapped, so that
    a tensor's bytes are read once into the array that is placed, and the file's pages never count towards the
    process's memory."""

    def __init__(self, path: Path):
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int]] = {}
        if path.name == SAFETENSORS_INDEX:
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, OSError) as e:
                raise ModelLoadError(f"{path}: not a safetensors index (expected a weight_map: {e})") from None
            shards = {k: path.parent / v for k, v in weight_map.items()}
        else:
            shards = None
        for file in sorted(set(shards.values())) if shards else [path]:
            if not file.is_file():
                named = [k for k, f in shards.items() if f == file]
                raise ModelLoadError(f"{path}: names the shard {file.name}, which is missing (it holds "
                                     f"{hf_names.listing(named, 3)})")
            for key, entry in self._header(file).items():
                self.entries[key] = entry
        for key, file in (shards or {}).items():
            if key not in self.entries or self.entries[key][0] != file:
                raise ModelLoadError(f"{path}: names the tensor {key} in {file.name}, which does not hold it")

    @staticmethod
    def _header(file: Path) -> dict[str, tuple[Path, str, tuple[int, ...], int]]:
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"a header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{file}: not a readable safetensors file ({e}); it may be truncated: write or "
                                 "download it again") from None
        out, end = {}, 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            if end + stop > size:
                raise ModelLoadError(f"{file}: tensor {key} ends at byte {end + stop} of a {size}-byte file: the file "
                                     "is truncated; write or download it again")
            out[key] = (file, info["dtype"], tuple(info["shape"]), end + begin)
        return out

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def check(self, key: str, shape: tuple[int, ...], transpose: bool) -> None:
        file, dtype, got, _ = self.entries[key]
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{file}: tensor {key} has dtype {dtype}, expected a floating-point weight "
                                 f"({', '.join(SAFETENSORS_DTYPES)})")
        want = tuple(reversed(shape)) if transpose else shape
        if got != want:
            raise ModelLoadError(f"{file}: tensor {key} has shape {got}, the model expects {want}")

    def read(self, key: str, transpose: bool, dtype: Any) -> np.ndarray:
        """The whole tensor in the tree's layout and `dtype` (its bytes read once)."""
        import ml_dtypes

        file, kind, shape, offset = self.entries[key]
        stored = ml_dtypes.bfloat16 if kind == "BF16" else SAFETENSORS_DTYPES[kind]
        arr = np.fromfile(file, dtype=stored, count=int(np.prod(shape)), offset=offset).reshape(shape)
        arr = arr.T if transpose else arr
        return arr if arr.dtype == np.dtype(dtype) else arr.astype(dtype)


def read_safetensors(path: Path, family: Family, like: Params, dtype_for: DtypeFor,
                     sharding_for: ShardingFor | None, on_host: OnHost | None = None) -> tuple[Params, list[str]]:
    """A base shaped like `like` from a safetensors file or index; every leaf read into its dtype and placed with
    `sharding_for` (each device receiving its slice), one tensor on the host at a time; a leaf `on_host` names
    stays a host array (QLoRA's kernels: quantized one at a time, never on the device in float32)."""
    tensors = _Tensors(path)
    inside = {k: k for k in tensors.keys()}
    prefix = family.torch_prefix + "."
    prefixed = any(k.startswith(prefix) for k in inside)
    if prefixed:
        inside = {k[len(prefix):]: k for k in tensors.keys() if k.startswith(prefix)}
    inside = {hf_names.renamed(k): v for k, v in inside.items() if not hf_names.BUFFERS.search(k)}
    plan = []
    for leaf_path, leaf in hf_names.flatten(like).items():
        name, transpose = hf_names.torch_key(leaf_path)
        if name not in inside:
            raise ModelLoadError(f"{path}: no tensor {prefix if prefixed else ''}{name} (the {family.name} base's "
                                 f"{'/'.join(leaf_path)})")
        tensors.check(inside[name], tuple(leaf.shape), transpose)
        plan.append((leaf_path, inside[name], transpose, tuple(leaf.shape)))
    used = {key for _, key, _, _ in plan}
    skipped = hf_names.sorted_keys(k for k in tensors.keys() if k not in used and not hf_names.BUFFERS.search(k))
    flat = {}
    for leaf_path, key, transpose, shape in plan:  # nothing is read before every tensor was checked
        host = tensors.read(key, transpose, dtype_for(leaf_path))
        if on_host is not None and on_host(leaf_path):
            flat[leaf_path] = host
        elif sharding_for is None:
            flat[leaf_path] = jax.numpy.asarray(host)
        else:  # every process holds the tensor; each device takes its slice (multi-host too)
            flat[leaf_path] = jax.make_array_from_callback(shape, sharding_for(leaf_path, shape),
                                                           lambda index, h=host: h[index])
        del host
    return hf_names.unflatten(flat), skipped


def read_torch_bin(path: Path, family: Family, like: Params) -> tuple[Params, list[str]]:
    try:
        import torch
    except ImportError:
        raise ModelLoadError(f"{path}: a torch pickle, and torch is not installed; convert the checkpoint to "
                             "safetensors (save_pretrained(safe_serialization=True)) or install torch") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a damaged pickle
        raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None
    try:
        return hf_names.base_from_torch(family, state, like, where=str(path))
    except hf_names.ConversionError as e:
        raise ModelLoadError(str(e)) from None


def read_flax_msgpack(path: Path, family: Family, like: Params) -> tuple[Params, list[str]]:
    """transformers 4's Flax checkpoint (FlaxXModel: the base tree; Flax*ForSequenceClassification: under the
    family prefix)."""
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # a damaged msgpack file
        raise ModelLoadError(f"{path}: not a readable Flax checkpoint ({first_line(e)})") from None
    for key in (family.prefix, family.torch_prefix):
        if isinstance(tree, dict) and key in tree and isinstance(tree[key], dict):
            tree = tree[key]
            break
    flat, want = hf_names.flatten(tree), hf_names.flatten(like)
    missing = [("/".join(p)) for p in want if p not in flat]
    if missing:
        raise ModelLoadError(f"{path}: missing {hf_names.listing(missing, 4)} of the {family.name} base")
    bad = [f"{'/'.join(p)}: {tuple(np.shape(flat[p]))} != expected {tuple(v.shape)}" for p, v in want.items()
           if tuple(np.shape(flat[p])) != tuple(v.shape)]
    if bad:
        raise ModelLoadError(f"{path}: shape mismatch: " + "; ".join(bad[:4]))
    skipped = ["/".join(p) for p in flat if p not in want]
    return hf_names.unflatten({p: np.asarray(flat[p]) for p in want}), skipped


def read_base(where: Path, family: Family, like: Params, *, dtype_for: DtypeFor = lambda path: np.float32,
              sharding_for: ShardingFor | None = None, on_host: OnHost | None = None) -> Params:
    """The base weights of the checkpoint in `where`, shaped like `like` (an abstract tree), each leaf cast by
    `dtype_for` and placed by `sharding_for` (None: jax's default device), the leaves `on_host` names left on the
    host (numpy). Tensors the base has no use for (a head, an LM head) are counted and logged."""
    path = weight_file(where, family)
    if path.name in (SAFETENSORS, SAFETENSORS_INDEX):
        base, skipped = read_safetensors(path, family, like, dtype_for, sharding_for, on_host)
    else:
        reader = read_torch_bin if path.name == TORCH_BIN else read_flax_msgpack
        host, skipped = reader(path, family, like)
        flat = hf_names.flatten(host)
        base = hf_names.unflatten({p: np.asarray(v, dtype_for(p)) if on_host is not None and on_host(p) else
                                   jax.device_put(np.asarray(v, dtype_for(p)), sharding_for(p, v.shape)
                                                  if sharding_for is not None else None)
                                   for p, v in flat.items()})
    if skipped:
        log.info("%s: %d tensors not used by the %s classifier's base (%s)", path, len(skipped), family.name,
                 hf_names.listing(skipped, 6))
    log.info("loaded %s weights from %s", family.name, path)
    return base
