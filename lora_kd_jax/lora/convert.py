"""The one weight converter between PyTorch layouts and this project's Flax trees (numpy in, numpy out).

GPT-2 base (transformers' PyTorch `GPT2Model` names <-> the FlaxGPT2Module tree):

    torch key                       flax path                        layout
    wte.weight / wpe.weight         wte/embedding, wpe/embedding     same
    h.{i}.ln_{1,2}.weight / .bias   h/{i}/ln_{1,2}/scale / bias      same
    h.{i}.attn.c_attn.weight        h/{i}/attn/c_attn/kernel         torch Conv1D (in, out) <-> flax (out, in)
    h.{i}.{attn,mlp}.*.bias         .../bias                         same
    ln_f.weight / .bias             ln_f/scale / bias                same

An optional `transformer.` prefix (GPT2ForSequenceClassification / GPT2LMHeadModel state dicts) is accepted;
the non-parameter buffers `h.{i}.attn.bias` / `h.{i}.attn.masked_bias` are ignored.

LoRA factors (flax: {module path: {'a': (in, r), 'b': (r, out)}}, delta = scale * x @ a @ b) <-> PEFT
(fan_in_fan_out=True on GPT-2's Conv1D): lora_A.weight (r, in) = a.T, lora_B.weight (out, r) = b.T, keys
`<prefix><module path>.lora_A[.<adapter>].weight`; the alpha/r scale lives in the spec, not the factors.
Head: torch `score.weight` (n_labels, n_embd) <-> flax head kernel (n_embd, n_labels).
The module names come from `models.gpt2_layout`; the PEFT adapter format around these weights is `peft_format`.

Values may be numpy arrays, jax arrays or torch tensors (torch is never imported here); outputs are fresh
numpy arrays that share no memory with the inputs.
Every function fails with a `ConversionError` that names the missing / unexpected keys or the bad shape.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_kd_jax.core.errors import UserError
from lora_kd_jax.core.gpt2_layout import BLOCK_LAYER_NORMS, CONV1D_MODULES, FINAL_LAYER_NORM, conv1d_in_out

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]
Path = tuple[str, ...]

TRANSFORMER_PREFIX = "transformer."
PEFT_PREFIX = "base_model.model."
SCORE_KEY = "score.weight"  # GPT2ForSequenceClassification's head
# Non-parameter buffers of transformers' GPT2Attention (the causal mask), present in older checkpoints.
_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_LAYER_KEY = re.compile(r"^h\.(\d+)\.")
_CONV_PATHS: tuple[Path, ...] = tuple(tuple(m.split(".")) for m in CONV1D_MODULES)


class ConversionError(UserError, ValueError):
    """Keys or shapes do not fit the layout being converted; the message names them."""
    label = "conversion error"


# ------------------------------------------------------------------------------------------------ helpers


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


def _owned(x: np.ndarray) -> np.ndarray:
    """A fresh, writable, C-contiguous copy: outputs never alias the inputs (a torch parameter updated in
    place later, or a read-only view of a jax buffer)."""
    return np.array(x, order="C", copy=True)


def flatten(tree: Mapping, sep: str | None = None) -> dict:
    """{path tuple (or sep-joined string): leaf} of a nested mapping (dict, FrozenDict)."""
    out: dict = {}

    def walk(node: Any, prefix: Path) -> None:
        if isinstance(node, Mapping):
            if not node and prefix:
                return
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
    def order(k: str) -> tuple:
        return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in k.split("."))

    return sorted(keys, key=order)


def _key_report(missing: Any, unexpected: Any, what: str) -> str:
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(sorted_keys(missing))}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(sorted_keys(unexpected))}")
    return f"{what}: " + "; ".join(parts)


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keys under `prefix` with the prefix removed, if any key has it; else the dict unchanged."""
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


# --------------------------------------------------------------------------------------------- GPT-2 base


def torch_key(path: Path) -> tuple[str, bool]:
    """(torch key, transpose?) for a flax base-tree path."""
    *mod, leaf = path
    if leaf == "embedding":
        return ".".join(mod) + ".weight", False
    if leaf == "scale":
        return ".".join(mod) + ".weight", False
    if leaf == "kernel":
        return ".".join(mod) + ".weight", True
    if leaf == "bias":
        return ".".join(mod) + ".bias", False
    raise ConversionError(f"flax GPT-2 tree: unexpected leaf {'/'.join(path)}")


def gpt2_flax_paths(n_layer: int) -> list[Path]:
    """Every parameter path of a FlaxGPT2Module with n_layer blocks."""
    paths: list[Path] = [("wte", "embedding"), ("wpe", "embedding")]
    for i in range(n_layer):
        h = ("h", str(i))
        for ln in BLOCK_LAYER_NORMS:
            paths += [h + (ln, "scale"), h + (ln, "bias")]
        for conv in _CONV_PATHS:
            paths += [h + conv + ("kernel",), h + conv + ("bias",)]
    paths += [(FINAL_LAYER_NORM, "scale"), (FINAL_LAYER_NORM, "bias")]
    return paths


def _n_layer(keys: Any) -> int:
    layers = {int(m.group(1)) for k in keys if (m := _LAYER_KEY.match(k))}
    return max(layers) + 1 if layers else 0


def _check_gpt2_shapes(flat: Mapping[Path, np.ndarray], where: str) -> None:
    """Internal consistency of a (possibly partial) flax GPT-2 tree: widths agree everywhere."""
    def shape(path: Path) -> tuple[int, ...] | None:
        return tuple(flat[path].shape) if path in flat else None

    emb = shape(("wte", "embedding")) or shape(("wpe", "embedding"))
    n_embd = emb[-1] if emb else None
    if n_embd is None:  # partial tree: take the width from any LayerNorm
        n_embd = next((v.shape[0] for p, v in flat.items() if p[-2].startswith("ln_")), None)
    problems = []

    def expect(path: Path, want: tuple[int | None, ...]) -> None:
        got = shape(path)
        if got is None:
            return
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            problems.append(f"{'/'.join(path)} (torch {torch_key(path)[0]}): shape {got} in flax layout, expected "
                            f"{tuple('?' if w is None else w for w in want)}")

    expect(("wte", "embedding"), (None, n_embd))
    expect(("wpe", "embedding"), (None, n_embd))
    expect((FINAL_LAYER_NORM, "scale"), (n_embd,))
    expect((FINAL_LAYER_NORM, "bias"), (n_embd,))
    for i in range(_n_layer(".".join(p) for p in flat)):
        h = ("h", str(i))
        for ln in BLOCK_LAYER_NORMS:
            expect(h + (ln, "scale"), (n_embd,))
            expect(h + (ln, "bias"), (n_embd,))
        # the MLP width from c_fc's bias (1-D, so a transposed kernel cannot mislead it), else its kernel
        fc_bias, fc_kernel = shape(h + ("mlp", "c_fc", "bias")), shape(h + ("mlp", "c_fc", "kernel"))
        n_inner = (fc_bias[0] if fc_bias and len(fc_bias) == 1
                   else fc_kernel[0] if fc_kernel and len(fc_kernel) == 2 else None)
        in_out = conv1d_in_out(n_embd, n_inner)
        for module, conv in zip(CONV1D_MODULES, _CONV_PATHS):
            d_in, d_out = in_out[module]
            expect(h + conv + ("kernel",), (d_out, d_in))  # flax layout (out, in)
            expect(h + conv + ("bias",), (d_out,))
    if problems:
        raise ConversionError(f"{where}: shape mismatch: " + "; ".join(problems))


def check_shapes(tree: Params, like: Params, what: str = "params") -> None:
    """Raise naming every path whose shape differs from `like` (e.g. `gpt2.param_shapes(module)`), or that
    is missing / unexpected."""
    a, b = flatten(tree, "/"), flatten(like, "/")
    if set(a) != set(b):
        raise ConversionError(_key_report(set(b) - set(a), set(a) - set(b), what))
    bad = [f"{k}: {tuple(a[k].shape)} != expected {tuple(b[k].shape)}" for k in sorted_keys(a)
           if tuple(a[k].shape) != tuple(b[k].shape)]
    if bad:
        raise ConversionError(f"{what}: shape mismatch: " + "; ".join(bad))


def torch_gpt2_to_flax(state_dict: Mapping[str, Any], *, allow_missing: bool = False,
                       like: Params | None = None) -> Params:
    """A PyTorch GPT2Model state dict (optionally `transformer.`-prefixed) -> FlaxGPT2Module params (numpy).

    With a prefix, keys outside it (`score.weight`, `lm_head.weight`) belong to a head and are skipped.
    `allow_missing` converts a partial dict (e.g. gradients of the trainable LayerNorms only); `like`, a
    tree of the target module's shapes, is checked against the result.
    """
    sd = _strip_prefix(state_dict, TRANSFORMER_PREFIX)
    sd = {k: v for k, v in sd.items() if not _BUFFER.match(k)}
    expected = {torch_key(p)[0]: p for p in gpt2_flax_paths(_n_layer(sd))}
    missing = set() if allow_missing else set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    if missing or unexpected or not sd:
        raise ConversionError(_key_report(missing, unexpected, "torch GPT-2 state dict")
                              if (missing or unexpected) else "torch GPT-2 state dict: empty")
    flat = {}
    for key, value in sd.items():
        path = expected[key]
        arr = to_numpy(value)
        if torch_key(path)[1]:
            if arr.ndim != 2:
                raise ConversionError(f"torch GPT-2 state dict: {key} has shape {tuple(arr.shape)}, expected a "
                                      "2-D Conv1D weight (in, out)")
            arr = arr.T
        flat[path] = _owned(arr)
    _check_gpt2_shapes(flat, "torch GPT-2 state dict")
    tree = unflatten(flat)
    if like is not None:
        check_shapes(tree, like, "torch GPT-2 state dict (converted) vs target model")
    return tree


def flax_gpt2_to_torch(base_params: Params, *, prefix: str = "", allow_missing: bool = False) -> StateDict:
    """FlaxGPT2Module params -> a PyTorch GPT2Model state dict of numpy arrays (`prefix="transformer."` for
    GPT2ForSequenceClassification). Load it with `{k: torch.from_numpy(v) for ...}`."""
    flat = {p: to_numpy(v) for p, v in flatten(base_params).items()}
    expected = set(gpt2_flax_paths(_n_layer(".".join(p) for p in flat)))
    missing = set() if allow_missing else expected - set(flat)
    unexpected = set(flat) - expected
    if missing or unexpected or not flat:
        fmt = lambda ps: {"/".join(p) for p in ps}  # noqa: E731
        raise ConversionError(_key_report(fmt(missing), fmt(unexpected), "flax GPT-2 params")
                              if (missing or unexpected) else "flax GPT-2 params: empty")
    _check_gpt2_shapes(flat, "flax GPT-2 params")
    out: StateDict = {}
    for path, arr in flat.items():
        key, transpose = torch_key(path)
        out[prefix + key] = _owned(arr.T if transpose else arr)
    return dict((k, out[k]) for k in sorted_keys(out))


# ------------------------------------------------------------------------------------------------- head


def torch_head_to_flax(score_weight: Any) -> Params:
    """torch `score.weight` (n_labels, n_embd) -> {'kernel': (n_embd, n_labels)}."""
    w = to_numpy(score_weight)
    if w.ndim != 2:
        raise ConversionError(f"score.weight: shape {tuple(w.shape)}, expected (n_labels, n_embd)")
    return {"kernel": _owned(w.T)}


def flax_head_to_torch(head: Params, *, key: str = SCORE_KEY) -> StateDict:
    """{'kernel': (n_embd, n_labels)} -> {'score.weight': (n_labels, n_embd)}."""
    if set(head) != {"kernel"}:
        raise ConversionError(_key_report({"kernel"} - set(head), set(head) - {"kernel"}, "flax head"))
    k = to_numpy(head["kernel"])
    if k.ndim != 2:
        raise ConversionError(f"flax head kernel: shape {tuple(k.shape)}, expected (n_embd, n_labels)")
    return {key: _owned(k.T)}


# ------------------------------------------------------------------------------------------------- LoRA


def _factor_items(factors: Params, what: str) -> list[tuple[Path, np.ndarray, np.ndarray, np.ndarray | None]]:
    """[(module path, a (in, r), b (r, out), DoRA's magnitude m (out,) or None)] of a flax factor tree, validated."""
    flat = flatten(factors)
    modules: dict[Path, dict[str, np.ndarray]] = {}
    for path, v in flat.items():
        if path[-1] not in ("a", "b", "m"):
            raise ConversionError(f"{what}: unexpected leaf {'/'.join(path)} (factor leaves are 'a', 'b' and, for "
                                  "DoRA, 'm')")
        modules.setdefault(path[:-1], {})[path[-1]] = to_numpy(v)
    if not modules:
        raise ConversionError(f"{what}: no LoRA factors")
    items = []
    for mod in sorted(modules, key=".".join):
        f = modules[mod]
        name = "/".join(mod)
        if not {"a", "b"} <= set(f):
            raise ConversionError(f"{what}: missing keys: {name}/{({'a', 'b'} - set(f)).pop()}")
        a, b, m = f["a"], f["b"], f.get("m")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ConversionError(f"{what}: {name}: a {tuple(a.shape)} and b {tuple(b.shape)} are not "
                                  "(in, r) and (r, out)")
        if m is not None and m.shape != (b.shape[1],):
            raise ConversionError(f"{what}: {name}: m {tuple(m.shape)} is not (out,) = ({b.shape[1]},)")
        items.append((mod, a, b, m))
    return items


def check_spec_modules(modules: Any, spec: Any, what: str) -> None:
    """The module paths of converted factors must be exactly the LoraSpec's (nothing to check without a spec)."""
    if spec is None:
        return
    got, want = {".".join(p) for p in modules}, {".".join(p) for p in spec.paths}
    if got != want:
        raise ConversionError(_key_report(want - got, got - want, f"{what} vs spec"))


def check_spec_shapes(path: Path, a: np.ndarray, b: np.ndarray, spec: Any, what: str,
                      names: tuple[str, str]) -> None:
    """Factors a (in, r), b (r, out) of `path` against the LoraSpec's (in, out) and rank; `names` are the two
    factors' names in the source layout, for the message (nothing to check without a spec)."""
    if spec is None or path not in spec.paths:
        return
    d_in, d_out = spec.shapes[spec.paths.index(path)]
    rank = spec.rank
    if a.shape != (d_in, rank) or b.shape != (rank, d_out):
        raise ConversionError(f"{what}: {'.'.join(path)}: {names[0]}/{names[1]} give (in, r, out) = "
                              f"({a.shape[0]}, {a.shape[1]}, {b.shape[1]}), the spec wants ({d_in}, {rank}, {d_out})")


_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# DoRA's magnitude: `<module>.lora_magnitude_vector` as saved, `...lora_magnitude_vector.<adapter>.weight` in a model
PEFT_MAGNITUDE = "lora_magnitude_vector"
_PEFT_MAG_KEY = re.compile(rf"^(?P<module>.+)\.{PEFT_MAGNITUDE}(?:\.(?P<adapter>[^.]+)\.weight)?$")


def flax_lora_to_peft(factors: Params, *, prefix: str = PEFT_PREFIX + TRANSFORMER_PREFIX,
                      adapter_name: str | None = None) -> StateDict:
    """Flax factors -> PEFT keys `<prefix><path>.lora_A[.<adapter>].weight` (r, in) and lora_B (out, r), and
    DoRA's magnitude m as `<prefix><path>.lora_magnitude_vector[.<adapter>.weight]` (out,).

    The default prefix is that of `get_peft_model_state_dict` for a PEFT-wrapped GPT2ForSequenceClassification
    (no adapter name); pass adapter_name="default" for `PeftModel.state_dict()` keys. PEFT's alpha/r scaling is
    not in the factors: the LoraSpec's scale must equal the LoraConfig's lora_alpha / r.
    """
    out: StateDict = {}
    tag = f".{adapter_name}" if adapter_name else ""
    for path, a, b, m in _factor_items(factors, "flax LoRA factors"):
        key = prefix + ".".join(path)
        out[f"{key}.lora_A{tag}.weight"] = _owned(a.T)
        out[f"{key}.lora_B{tag}.weight"] = _owned(b.T)
        if m is not None:
            out[f"{key}.{PEFT_MAGNITUDE}{tag}" + (".weight" if tag else "")] = _owned(m)
    return out


def peft_lora_to_flax(peft_state_dict: Mapping[str, Any], *, spec: Any = None,
                      adapter_name: str | None = None) -> Params:
    """PEFT LoRA weights -> flax factors {'a': lora_A.T (in, r), 'b': lora_B.T (r, out)}.

    Accepts `get_peft_model_state_dict` keys or full `PeftModel.state_dict()` keys (every key that is not a
    lora_A / lora_B weight is skipped there: base weights, LayerNorms, score); the `base_model.model.` and
    `transformer.` prefixes are stripped so module paths match the flax tree (`h.0.attn.c_attn`). If the keys
    carry adapter names, `adapter_name` picks one (required when there are several). With a LoraSpec the
    module set and shapes are checked.
    """
    found: dict[Path, dict[str, np.ndarray]] = {}
    adapters = set()
    entries = []
    for key, v in peft_state_dict.items():
        m = _PEFT_KEY.match(key) or _PEFT_MAG_KEY.match(key)
        if m is None:
            continue
        adapters.add(m.group("adapter"))
        entries.append((m, v))
    if not entries:
        raise ConversionError("PEFT state dict: no lora_A / lora_B weights (keys look like "
                              f"{', '.join(list(peft_state_dict)[:3]) or 'nothing'})")
    if adapter_name is None:
        if len(adapters) > 1:
            raise ConversionError(f"PEFT state dict: several adapters {sorted(map(str, adapters))}; pass adapter_name")
        adapter_name = next(iter(adapters))
    elif adapter_name not in adapters:
        raise ConversionError(f"PEFT state dict: no adapter named {adapter_name!r}; found {sorted(map(str, adapters))}")
    for m, v in entries:
        if m.group("adapter") != adapter_name:
            continue
        module = m.group("module")
        for p in (PEFT_PREFIX, TRANSFORMER_PREFIX):
            module = module[len(p):] if module.startswith(p) else module
        which = m.group("which") if m.re is _PEFT_KEY else "m"
        found.setdefault(tuple(module.split(".")), {})[which] = to_numpy(v)
    missing = [".".join(mod) + f".lora_{w}.weight" for mod, f in found.items() for w in "AB" if w not in f]
    if spec is not None and spec.variant == "dora":
        missing += [".".join(mod) + f".{PEFT_MAGNITUDE}" for mod, f in found.items() if "m" not in f]
    elif spec is not None and any("m" in f for f in found.values()):
        raise ConversionError(f"PEFT state dict: DoRA magnitudes ({PEFT_MAGNITUDE}) for a plain LoRA spec "
                              "(lora.variant=lora); use lora.variant=dora")
    if missing:
        raise ConversionError(_key_report(missing, (), "PEFT state dict"))
    check_spec_modules(found, spec, "PEFT state dict")
    flat = {}
    for mod, f in found.items():
        A, B = f["A"], f["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ConversionError(f"PEFT state dict: {'.'.join(mod)}: lora_A {tuple(A.shape)} and lora_B "
                                  f"{tuple(B.shape)} are not (r, in) and (out, r)")
        check_spec_shapes(mod, A.T, B.T, spec, "PEFT state dict", ("lora_A", "lora_B"))
        flat[mod + ("a",)] = _owned(A.T)
        flat[mod + ("b",)] = _owned(B.T)
        if "m" in f:
            if f["m"].shape != (B.shape[0],):
                raise ConversionError(f"PEFT state dict: {'.'.join(mod)}: {PEFT_MAGNITUDE} {tuple(f['m'].shape)} is not "
                                      f"(out,) = ({B.shape[0]},)")
            flat[mod + ("m",)] = _owned(f["m"])
    return unflatten(flat)
