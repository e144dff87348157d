"""The one converter between Hugging Face PyTorch names and this library's parameter trees, for every family.

One rule maps every leaf of a base (`torch_key`): the module path joined by dots, then the leaf's PyTorch name:

    flax leaf          torch                    layout
    embedding          .weight                  same
    scale, weight      .weight                  same (LayerNorm's scale; RMSNorm keeps `weight`)
    kernel             .weight                  transposed: nn.Dense (in, out) <-> nn.Linear (out, in), and GPT-2's
                                                Conv1D kept (out, in) <-> PyTorch's Conv1D (in, out)
    bias               .bias                    same

so `h/0/attn/c_attn/kernel` <-> `h.0.attn.c_attn.weight` and `encoder/layer/0/attention/self/query/kernel` <->
`encoder.layer.0.attention.self.query.weight`; a *ForSequenceClassification state dict puts the family's
`torch_prefix` in front (`transformer.`, `bert.`, `roberta.`, `model.`). The head's layers carry their PyTorch module
names in the family's head (`score`, `classifier`, `classifier.dense`, ModernBERT's `head.dense`, `head.norm`, ...).
LoRA factors (a (in, r), b (r, out), DoRA's m (out,)) <-> PEFT's `lora_A.weight` (r, in) = aᵀ, `lora_B.weight`
(out, r) = bᵀ, `lora_magnitude_vector`.

Loading, merge, export-peft and import-peft all go through here. Values may be numpy, jax or torch arrays (torch
is never imported here); outputs are fresh numpy arrays that share no memory with the inputs. Errors are a
`ConversionError` naming the missing / unexpected keys or the tensor of the wrong shape.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_kd_jax.core.errors import UserError

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]
Path = tuple[str, ...]

PEFT_PREFIX = "base_model.model."
PEFT_MAGNITUDE = "lora_magnitude_vector"  # DoRA's m: `<module>.lora_magnitude_vector` as PEFT saves it
# registered buffers of transformers' PyTorch classes, not parameters: GPT-2's causal mask, BERT's position ids
BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|embeddings\.position_ids|embeddings\.token_type_ids)$")
LEGACY = {"gamma": "weight", "beta": "bias"}  # old checkpoints' LayerNorm names (transformers 5 renames them too)


class ConversionError(UserError, ValueError):
    """Keys or shapes do not fit the tree being converted; the message names them."""
    label = "conversion error"


# ------------------------------------------------------------------------------------------------ trees


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy / jax array or a torch tensor (bfloat16 kept as ml_dtypes.bfloat16)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor; torch is not imported here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16; reinterpret the bits
            import ml_dtypes
            import torch  # already loaded: x is a torch tensor

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def owned(x: Any) -> np.ndarray:
    """A fresh, writable, C-contiguous copy: outputs never alias the inputs."""
    return np.array(to_numpy(x), order="C", copy=True)


def flatten(tree: Mapping, sep: str | None = None) -> dict:
    """{path tuple (or sep-joined string): leaf} of a nested mapping (dict, FrozenDict)."""
    out: dict = {}

    def walk(node: Any, prefix: Path) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, prefix + (str(k),))
        else:
            out[prefix if sep is None else sep.join(prefix)] = node

    walk(tree, ())
    return out


def unflatten(flat: Mapping[Path, Any]) -> Params:
    out: Params = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def sorted_keys(keys: Any) -> list[str]:
    """Dotted keys in model order: layer 2 before layer 10 (numeric parts compare as numbers)."""
    return sorted(keys, key=lambda k: tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in re.split(r"[./]", k)))


def listing(keys: Any, shown: int = 8) -> str:
    keys = sorted_keys(keys)
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def key_report(missing: Any, unexpected: Any, what: str) -> str:
    parts = [f"missing keys: {listing(missing)}"] if missing else []
    parts += [f"unexpected keys: {listing(unexpected)}"] if unexpected else []
    return f"{what}: " + "; ".join(parts)


def check_shapes(tree: Params, like: Params, what: str = "params") -> None:
    """Raise naming every path whose shape differs from `like`'s, or that is missing / unexpected."""
    a, b = flatten(tree, "/"), flatten(like, "/")
    if set(a) != set(b):
        raise ConversionError(key_report(set(b) - set(a), set(a) - set(b), what))
    bad = [f"{k}: {tuple(a[k].shape)} != expected {tuple(b[k].shape)}" for k in sorted_keys(a)
           if tuple(a[k].shape) != tuple(b[k].shape)]
    if bad:
        raise ConversionError(f"{what}: shape mismatch: " + "; ".join(bad))


# ------------------------------------------------------------------------------------------------- base


def torch_key(path: Path) -> tuple[str, bool]:
    """(PyTorch key without the family prefix, transposed?) of a leaf path of a base or head layer."""
    *module, leaf = path
    if leaf in ("embedding", "scale", "weight"):
        return ".".join((*module, "weight")), False
    if leaf in ("kernel", "bias"):
        return ".".join((*module, "weight" if leaf == "kernel" else "bias")), leaf == "kernel"
    raise ConversionError(f"unexpected leaf {'/'.join(path)} (expected embedding, scale, weight, kernel or bias)")


def _torch_layout(arr: np.ndarray, transpose: bool, key: str, what: str) -> np.ndarray:
    if transpose and arr.ndim != 2:
        raise ConversionError(f"{what}: {key}: shape {tuple(arr.shape)}, expected a 2-D weight")
    return arr.T if transpose else arr


def base_to_torch(family: Any, base: Params, *, prefixed: bool = True, prefix: str | None = None) -> StateDict:
    """A base tree -> PyTorch keys (`<torch_prefix>.<module>.<weight|bias>` with `prefixed`, as a
    *ForSequenceClassification holds them; `prefix` overrides it), numpy, model order."""
    lead = prefix if prefix is not None else (family.torch_prefix + "." if prefixed else "")
    out = {}
    for path, v in flatten(base).items():
        key, transpose = torch_key(path)
        out[lead + key] = owned(_torch_layout(to_numpy(v), transpose, key, "base"))
    return {k: out[k] for k in sorted_keys(out)}


def strip_prefix(family: Any, state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the base's keys without the family prefix, the keys outside it), for a state dict of *Model (no prefix) or of
    *ForSequenceClassification / *LMHeadModel (prefixed: their head and LM head stay outside)."""
    prefix = family.torch_prefix + "."
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict), []
    inside = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return inside, [k for k in state_dict if not k.startswith(prefix)]


def renamed(key: str) -> str:
    """`LayerNorm.gamma` / `.beta` of old checkpoints under today's names."""
    head, _, leaf = key.rpartition(".")
    return f"{head}.{LEGACY[leaf]}" if leaf in LEGACY else key


def base_from_torch(family: Any, state_dict: Mapping[str, Any], like: Params, *, where: str = "state dict",
                    strict: bool = False, allow_missing: bool = False) -> tuple[Params, list[str]]:
    """A PyTorch state dict (of *Model, or prefixed) -> a base tree shaped like `like` (numpy), and the parameter
    keys it left out (a head, an LM head, a pooler the classifier lacks); `strict` makes keys inside the base's
    namespace that the tree has no place for an error. Buffers (GPT-2's causal mask, BERT's position ids) are
    ignored. Every tensor is checked against `like`."""
    inside, outside = strip_prefix(family, state_dict)
    inside = {renamed(k): v for k, v in inside.items() if not BUFFERS.search(k)}
    want = flatten(like)
    expected = {torch_key(p)[0]: p for p in want}
    missing = set() if allow_missing else set(expected) - set(inside)
    unexpected = set(inside) - set(expected)
    if missing or (strict and unexpected) or not inside:
        raise ConversionError(key_report(missing, unexpected if strict else (), where) if (missing or unexpected)
                              else f"{where}: no weights of the {family.name} base")
    flat, bad = {}, []
    for key, v in inside.items():
        if key not in expected:
            continue
        path = expected[key]
        arr = _torch_layout(to_numpy(v), torch_key(path)[1], key, where)
        if tuple(arr.shape) != tuple(want[path].shape):
            bad.append(f"{'/'.join(path)} (torch {key}): shape {tuple(arr.shape)} in flax layout, expected "
                       f"{tuple(want[path].shape)}")
            continue
        flat[path] = owned(arr)
    if bad:
        raise ConversionError(f"{where}: shape mismatch: " + "; ".join(bad))
    skipped = sorted_keys(k for k in [*outside, *unexpected] if not BUFFERS.search(k))
    return unflatten(flat), skipped


# ------------------------------------------------------------------------------------------------- head


def head_to_torch(family: Any, head: Params, *, prefix: str = "") -> StateDict:
    """The head tree -> its PyTorch keys (`score.weight`, `classifier.weight`, `classifier.dense.bias`, ...)."""
    out = {}
    for layer in family.head.layers:
        params = head if layer.path == () else head[layer.path[-1]]
        for leaf, v in params.items():
            name, transpose = torch_key((layer.torch, leaf))
            out[prefix + name] = owned(_torch_layout(to_numpy(v), transpose, layer.torch, "head"))
    return out


def is_head_key(family: Any, key: str) -> bool:
    return any(key.startswith(layer.torch + ".") for layer in family.head.layers)


def head_from_torch(family: Any, state_dict: Mapping[str, Any], like: Params, where: str) -> Params:
    """The head's PyTorch keys -> the head tree shaped like `like`; keys that are not the head's are an error."""
    flat, want, seen = {}, flatten(like), set()
    for layer in family.head.layers:
        for leaf in ("kernel", "scale", "bias"):  # `scale`: a LayerNorm of the head (ModernBERT's head.norm)
            path = (*layer.path, leaf)
            if path not in want:
                continue
            key = torch_key((layer.torch, leaf))[0]
            if key not in state_dict:
                raise ConversionError(f"{where}: missing keys: {key} (the classification head)")
            seen.add(key)
            arr = _torch_layout(to_numpy(state_dict[key]), leaf == "kernel", key, where)
            if tuple(arr.shape) != tuple(want[path].shape):
                shown = tuple(reversed(want[path].shape)) if leaf == "kernel" else tuple(want[path].shape)
                raise ConversionError(f"{where}: {key}: shape {tuple(to_numpy(state_dict[key]).shape)}, expected "
                                      f"{shown}" + (" (n_labels, hidden)" if leaf == "kernel" else ""))
            flat[path] = owned(arr)
    extra = set(state_dict) - seen
    if extra:
        raise ConversionError(f"{where}: unexpected head keys: {listing(extra)}")
    return unflatten(flat)


# ------------------------------------------------------------------------------------------------- LoRA

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_MAG_KEY = re.compile(rf"^(?P<module>.+)\.{PEFT_MAGNITUDE}(?:\.(?P<adapter>[^.]+)\.weight)?$")


def peft_module_prefix(family: Any) -> str:
    """Where PEFT keeps a *ForSequenceClassification's base modules: `base_model.model.<torch_prefix>.`."""
    return f"{PEFT_PREFIX}{family.torch_prefix}."


def module_names(family: Any, paths: Any) -> list[str]:
    """PyTorch module names (`transformer.h.0.attn.c_attn`, `roberta.encoder.layer.0.attention.self.query`)."""
    return [f"{family.torch_prefix}.{'.'.join(p)}" for p in paths]


def factor_items(factors: Params, what: str) -> list[tuple[Path, np.ndarray, np.ndarray, np.ndarray | None]]:
    """[(module path, a (in, r), b (r, out), DoRA's m (out,) or None)] of a factor tree, validated."""
    modules: dict[Path, dict[str, np.ndarray]] = {}
    for path, v in flatten(factors).items():
        if path[-1] not in ("a", "b", "m"):
            raise ConversionError(f"{what}: unexpected leaf {'/'.join(path)} (factor leaves are 'a', 'b' and, for "
                                  "DoRA, 'm')")
        modules.setdefault(path[:-1], {})[path[-1]] = to_numpy(v)
    if not modules:
        raise ConversionError(f"{what}: no LoRA factors")
    items = []
    for mod in sorted(modules, key=lambda p: sorted_keys([".".join(p)])[0]):
        f, name = modules[mod], "/".join(mod)
        if not {"a", "b"} <= set(f):
            raise ConversionError(f"{what}: missing keys: {name}/{({'a', 'b'} - set(f)).pop()}")
        a, b, m = f["a"], f["b"], f.get("m")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ConversionError(f"{what}: {name}: a {tuple(a.shape)} and b {tuple(b.shape)} are not (in, r) and "
                                  "(r, out)")
        if m is not None and m.shape != (b.shape[1],):
            raise ConversionError(f"{what}: {name}: m {tuple(m.shape)} is not (out,) = ({b.shape[1]},)")
        items.append((mod, a, b, m))
    return items


def lora_to_peft(family: Any, factors: Params, *, adapter_name: str | None = None) -> StateDict:
    """Factors -> PEFT keys `base_model.model.<torch_prefix>.<module>.lora_A[.<adapter>].weight` (r, in), lora_B
    (out, r) and DoRA's `lora_magnitude_vector` (out,): `get_peft_model_state_dict`'s keys, or with
    `adapter_name` those of `PeftModel.state_dict()`. PEFT's scaling is not in the factors."""
    out: StateDict = {}
    tag = f".{adapter_name}" if adapter_name else ""
    for path, a, b, m in factor_items(factors, "LoRA factors"):
        key = peft_module_prefix(family) + ".".join(path)
        out[f"{key}.lora_A{tag}.weight"] = owned(a.T)
        out[f"{key}.lora_B{tag}.weight"] = owned(b.T)
        if m is not None:
            out[f"{key}.{PEFT_MAGNITUDE}{tag}" + (".weight" if tag else "")] = owned(m)
    return out


def check_spec(found: Mapping[Path, Mapping[str, np.ndarray]], spec: Any, what: str) -> None:
    """Converted factors against a LoraSpec: the same modules, each (in, r, out) as the spec's."""
    got, want = {".".join(p) for p in found}, {".".join(p) for p in spec.paths}
    if got != want:
        raise ConversionError(key_report(want - got, got - want, f"{what} vs spec"))
    for path, f in found.items():
        d_in, d_out = spec.shapes[spec.paths.index(path)]
        if f["a"].shape != (d_in, spec.rank) or f["b"].shape != (spec.rank, d_out):
            raise ConversionError(f"{what}: {'.'.join(path)}: lora_A/lora_B give (in, r, out) = ({f['a'].shape[0]}, "
                                  f"{f['a'].shape[1]}, {f['b'].shape[1]}), the spec wants ({d_in}, {spec.rank}, "
                                  f"{d_out})")


def lora_from_peft(family: Any, state_dict: Mapping[str, Any], *, spec: Any = None,
                   adapter_name: str | None = None) -> Params:
    """PEFT LoRA weights (adapter file keys, or `PeftModel.state_dict()` keys, whose other keys are skipped) ->
    factors {'a': lora_Aᵀ, 'b': lora_Bᵀ, 'm': magnitude}. With several adapters `adapter_name` picks one; with a
    LoraSpec the modules and shapes are checked."""
    entries, adapters = [], set()
    for key, v in state_dict.items():
        m = _LORA_KEY.match(key) or _MAG_KEY.match(key)
        if m is not None:
            adapters.add(m.group("adapter"))
            entries.append((m, v))
    if not entries:
        raise ConversionError("PEFT state dict: no lora_A / lora_B weights (keys look like "
                              f"{', '.join(list(state_dict)[:3]) or 'nothing'})")
    if adapter_name is None:
        if len(adapters) > 1:
            raise ConversionError(f"PEFT state dict: several adapters {sorted(map(str, adapters))}; pass adapter_name")
        adapter_name = next(iter(adapters))
    elif adapter_name not in adapters:
        raise ConversionError(f"PEFT state dict: no adapter named {adapter_name!r}; found {sorted(map(str, adapters))}")
    found: dict[Path, dict[str, np.ndarray]] = {}
    for m, v in entries:
        if m.group("adapter") != adapter_name:
            continue
        module = m.group("module")
        for p in (PEFT_PREFIX, family.torch_prefix + "."):
            module = module[len(p):] if module.startswith(p) else module
        which = m.group("which") if m.re is _LORA_KEY else "m"
        arr = to_numpy(v)
        found.setdefault(tuple(module.split(".")), {})[{"A": "a", "B": "b", "m": "m"}[which]] = \
            arr.T if which in "AB" and arr.ndim == 2 else arr
    missing = [".".join(mod) + f".lora_{w}.weight" for mod, f in found.items() for w in "AB" if w.lower() not in f]
    if spec is not None and spec.variant == "dora":
        missing += [".".join(mod) + f".{PEFT_MAGNITUDE}" for mod, f in found.items() if "m" not in f]
    elif spec is not None and any("m" in f for f in found.values()):
        raise ConversionError(f"PEFT state dict: DoRA magnitudes ({PEFT_MAGNITUDE}) for a plain LoRA spec "
                              "(lora.variant=lora); use lora.variant=dora")
    if missing:
        raise ConversionError(key_report(missing, (), "PEFT state dict"))
    for mod, f in found.items():
        a, b = f["a"], f["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ConversionError(f"PEFT state dict: {'.'.join(mod)}: lora_A {tuple(a.T.shape)} and lora_B "
                                  f"{tuple(b.T.shape)} are not (r, in) and (out, r)")
        if "m" in f and f["m"].shape != (b.shape[1],):
            raise ConversionError(f"PEFT state dict: {'.'.join(mod)}: {PEFT_MAGNITUDE} {tuple(f['m'].shape)} is not "
                                  f"(out,) = ({b.shape[1]},)")
    if spec is not None:
        check_spec(found, spec, "PEFT state dict")
    return unflatten({mod + (k,): owned(v) for mod, f in found.items() for k, v in f.items()})
