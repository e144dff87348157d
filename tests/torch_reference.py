"""A PyTorch reference of the original, written from DESIGN.md's semantics (not from the JAX code).

- `ReferenceClassifier`: transformers' PyTorch GPT2Model (dropout 0) + a bias-free `score` Linear(n_embd, 2)
  on the hidden state (after ln_f) at index mask.sum - 1.
- `SeedLoRA`: the original's LoRA layer, a wrapper around a Conv1D: U (in, r), V (out, r),
  output = conv(x) + dropout(x, p) @ U @ V.T, no scaling.
- `add_peft_lora`: the `standard` init through PEFT itself (LoraConfig with fan_in_fan_out=True on Conv1D).
- Trainable set: LoRA factors, every LayerNorm weight and bias, `score`; everything else frozen.
Weights move between the two sides only through the library's one converter (`lora_kd_jax.models.hf_names`), plus two
layouts only tests need, kept here on top of it: the original's U/V factors (`seed_lora_to_torch` / `seed_lora_from_torch`) and a whole
GPT2ForSequenceClassification state dict (`flax_classifier_to_torch` / `torch_classifier_to_flax`).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model
from transformers.pytorch_utils import Conv1D

from lora_kd_jax.models import hf_names as convert
from lora_kd_jax.models.classifier import base_shapes
from lora_kd_jax.models.families import GPT2

torch.set_default_dtype(torch.float32)
# CPU fp32 matmuls are full precision already; pin it so a CUDA run cannot switch to TF32.
torch.set_float32_matmul_precision("highest")

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PEFT_TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]  # c_proj names both attn.c_proj and mlp.c_proj


TRANSFORMER_PREFIX, SCORE_KEY = "transformer.", "score.weight"  # GPT2ForSequenceClassification's names


def torch_config(arch: Any) -> GPT2Config:
    """The GPT2Config of a GPT-2 module's Arch (`model.arch`), with dropout 0 and eager attention.

    Eager attention is the plain softmax(QK^T/sqrt d + mask) V, the same sequence of ops as Flax's
    dot_product_attention; activation (gelu_new, tanh approximation) and layer_norm_epsilon (1e-5) are the ones
    the JAX module computes with.
    """
    cfg = GPT2Config(n_layer=arch.num_layers, n_embd=arch.hidden_size, n_head=arch.num_heads,
                     n_positions=arch.max_positions, vocab_size=arch.vocab_size, n_inner=arch.intermediate_size,
                     activation_function=arch.activation, layer_norm_epsilon=arch.norm_eps,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return cfg


def gpt2_like(config: GPT2Config) -> dict:
    """The JAX GPT-2 base's shapes for a transformers GPT2Config (what the converter checks against)."""
    return base_shapes(GPT2, GPT2.module(GPT2.arch(config.to_dict())))


def torch_gpt2_to_flax(state_dict: Mapping[str, Any], *, like: Any, allow_missing: bool = False) -> dict:
    """A GPT2Model (or `transformer.`-prefixed) state dict -> the JAX base tree, strictly (unexpected keys of the
    base are an error), through the library's converter."""
    return convert.base_from_torch(GPT2, state_dict, like, where="torch GPT-2 state dict", strict=True,
                                   allow_missing=allow_missing)[0]


def flax_gpt2_to_torch(base: Any, *, prefix: str = "") -> dict[str, np.ndarray]:
    return convert.base_to_torch(GPT2, base, prefix=prefix)


def torch_head_to_flax(score_weight: Any) -> dict:
    return convert.head_from_torch(GPT2, {"score.weight": score_weight}, {"kernel": np.zeros(
        np.asarray(convert.to_numpy(score_weight)).shape[::-1])}, "score.weight")


def flax_head_to_torch(head: Any) -> dict[str, np.ndarray]:
    return convert.head_to_torch(GPT2, head)


class ReferenceClassifier(nn.Module):
    def __init__(self, config: GPT2Config, n_labels: int = 2):
        super().__init__()
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, n_labels, bias=False)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.hidden(input_ids, attention_mask)
        last = attention_mask.sum(-1).long() - 1
        return self.score(h[torch.arange(h.shape[0]), last])


class SeedLoRA(nn.Module):
    """The original's adapter: frozen Conv1D plus dropout(x) @ U @ V.T, no scaling."""

    def __init__(self, base: Conv1D, rank: int, dropout: float):
        super().__init__()
        d_in, d_out = base.weight.shape  # Conv1D stores (in, out)
        self.base = base
        self.U = nn.Parameter(torch.empty(d_in, rank))
        self.V = nn.Parameter(torch.empty(d_out, rank))
        nn.init.xavier_uniform_(self.U)
        nn.init.xavier_uniform_(self.V)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.dropout(x) @ self.U @ self.V.T


# ------------------------------------------------------------------------------- layouts only tests need


def seed_lora_to_torch(factors: Any, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax factors -> the original's layout: `<prefix><path>.U` (in, r) = a and `<prefix><path>.V` (out, r) = b.T
    (PEFT's lora_A transposed and lora_B)."""
    out = {}
    for key, v in convert.lora_to_peft(GPT2, factors).items():
        key = prefix + key[len(convert.peft_module_prefix(GPT2)):]
        module, which = key.rsplit(".lora_", 1)  # which: "A.weight" (r, in) | "B.weight" (out, r)
        if which == "A.weight":
            out[module + ".U"] = np.ascontiguousarray(v.T)
        else:
            out[module + ".V"] = v
    return out


def seed_lora_from_torch(state_dict: Mapping[str, Any], *, prefix: str = "", spec: Any = None) -> dict:
    """`<prefix><path>.U` (in, r) / `.V` (out, r) -> flax factors {'a': U, 'b': V.T}.

    Keys outside `prefix` or not ending in .U/.V are unexpected. With a LoraSpec, the module set and every
    shape are checked against it.
    """
    what = "torch seed-LoRA state dict"
    modules: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    unexpected = []
    for key, v in state_dict.items():
        if not key.startswith(prefix) or not key.endswith((".U", ".V")):
            unexpected.append(key)
            continue
        modules.setdefault(tuple(key[len(prefix):-2].split(".")), {})[key[-1]] = convert.to_numpy(v)
    if unexpected:
        raise convert.ConversionError(f"{what}: unexpected keys: {', '.join(convert.sorted_keys(unexpected))}")
    missing = [prefix + ".".join(m) + "." + n for m, f in modules.items() for n in ("U", "V") if n not in f]
    if missing:
        raise convert.ConversionError(f"{what}: missing keys: {', '.join(convert.sorted_keys(missing))}")
    found = {}
    for mod, f in modules.items():
        u, v = f["U"], f["V"]
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
            raise convert.ConversionError(f"{what}: {prefix + '.'.join(mod)}: U {tuple(u.shape)} and V "
                                          f"{tuple(v.shape)} are not (in, r) and (out, r)")
        found[mod] = {"a": np.array(u, order="C", copy=True), "b": np.array(v.T, order="C", copy=True)}
    if spec is not None:
        try:
            convert.check_spec(found, spec, what)
        except convert.ConversionError as e:
            raise convert.ConversionError(str(e).replace("lora_A/lora_B", "U/V")) from None
    return convert.unflatten({mod + (k,): v for mod, f in found.items() for k, v in f.items()})


def torch_classifier_to_flax(state_dict: Mapping[str, Any], *, like: Any = None) -> dict:
    """A GPT2ForSequenceClassification-style dict (`transformer.*` + `score.weight`) -> {'gpt2', 'head'}."""
    what, score, prefix = "torch classifier state dict", SCORE_KEY, TRANSFORMER_PREFIX
    if score not in state_dict:
        raise convert.ConversionError(f"{what}: missing keys: {score}")
    stray = [k for k in state_dict if k != score and not k.startswith(prefix)]
    if stray:
        raise convert.ConversionError(f"{what}: unexpected keys: {', '.join(convert.sorted_keys(stray))}")
    base = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    like = like if like is not None else _like_from(base)
    return {"gpt2": torch_gpt2_to_flax(base, like=like), "head": torch_head_to_flax(state_dict[score])}


def _like_from(state_dict: Mapping[str, Any]) -> dict:
    """The base shapes of a GPT-2 state dict's own sizes (layers, width, vocabulary, positions)."""
    sd = {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state_dict.items()}
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("h.")}
    vocab, width = convert.to_numpy(sd["wte.weight"]).shape
    inner = convert.to_numpy(sd["h.0.mlp.c_fc.weight"]).shape[1]
    return gpt2_like(GPT2Config(n_layer=max(layers) + 1, n_embd=width, n_head=1, vocab_size=vocab, n_inner=inner,
                                n_positions=convert.to_numpy(sd["wpe.weight"]).shape[0]))


def flax_classifier_to_torch(params: dict) -> dict[str, np.ndarray]:
    """{'gpt2', 'head'} (merged, no LoRA) -> GPT2ForSequenceClassification-style state dict."""
    extra = set(params) - {"gpt2", "head"}
    if extra:
        raise convert.ConversionError(f"flax classifier params: unexpected keys: {', '.join(sorted(extra))} "
                                      "(merge LoRA first: Classifier.merged)")
    return {**flax_gpt2_to_torch(params["gpt2"], prefix=TRANSFORMER_PREFIX), **flax_head_to_torch(params["head"])}


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def build_reference(arch: Any, base_params: Any = None, head: Any = None) -> ReferenceClassifier:
    """A ReferenceClassifier of a GPT-2 Arch (`model.arch`); with flax `base_params` / `head` given, their weights
    are loaded (strict)."""
    n_labels = np.asarray(head["kernel"]).shape[1] if head is not None else 2
    model = ReferenceClassifier(torch_config(arch), n_labels)
    if base_params is not None:
        sd = flax_gpt2_to_torch(base_params)
        model.transformer.load_state_dict({k: _t(v) for k, v in sd.items()}, strict=True)
    if head is not None:
        model.score.weight.data.copy_(_t(flax_head_to_torch(head)["score.weight"]))
    return model


def _targets(model: ReferenceClassifier) -> list[tuple[str, nn.Module, str]]:
    """(module path like 'h.0.attn.c_attn', parent module, attribute) of every targeted Conv1D."""
    out = []
    for i, block in enumerate(model.transformer.h):
        for t in TARGETS:
            part, name = t.split(".")
            out.append((f"h.{i}.{t}", getattr(block, part), name))
    return out


def add_seed_lora(model: ReferenceClassifier, rank: int, dropout: float, factors: Any = None) -> ReferenceClassifier:
    """Wrap each target Conv1D in a SeedLoRA; `factors` (flax tree) sets U and V through the converter."""
    sd = seed_lora_to_torch(factors) if factors is not None else None
    for path, parent, name in _targets(model):
        layer = SeedLoRA(getattr(parent, name), rank, dropout)
        if sd is not None:
            layer.U.data.copy_(_t(sd[path + ".U"]))
            layer.V.data.copy_(_t(sd[path + ".V"]))
        setattr(parent, name, layer)
    set_trainable(model)
    return model


def add_peft_lora(model: ReferenceClassifier, rank: int, alpha: float, dropout: float) -> nn.Module:
    """PEFT's LoRA on c_attn, c_proj (attn and mlp), c_fc; returns the PeftModel (modified in place)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGET_MODULES, fan_in_fan_out=True,
                     lora_dropout=dropout, bias="none")
    peft_model = get_peft_model(model, cfg)
    set_trainable(model)
    return peft_model


def is_trainable(name: str) -> bool:
    parts = _plain_name(name).split(".")
    return (parts[-1] in ("U", "V") or "lora_A" in parts or "lora_B" in parts or "lora_magnitude_vector" in parts
            or any(p.startswith("ln_") for p in parts) or parts[0] == "score")


def set_trainable(model: nn.Module) -> None:
    """LoRA factors, every LayerNorm, score: requires_grad; all else frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name))


def _plain_name(name: str) -> str:
    """Parameter name with wrapper segments removed: '.base.' (SeedLoRA), '.base_layer.' (PEFT), PEFT's prefix."""
    name = name.removeprefix(convert.PEFT_PREFIX)
    return name.replace(".base_layer.", ".").replace(".base.", ".")


def as_flax(model: nn.Module, *, grads: bool = False, trainable_only: bool = False) -> dict:
    """The model's parameters (or their .grad) in the flax layout {'gpt2', 'lora', 'head'} (numpy), via the
    converter. Gradients come back for trainable leaves only, so `gpt2` holds only LayerNorms then."""
    named = {}
    for name, p in model.named_parameters():
        if (grads or trainable_only) and not p.requires_grad:
            continue
        v = p.grad if grads else p
        if v is None:
            raise AssertionError(f"{name}: no gradient")
        named[_plain_name(name)] = v.detach().numpy().copy()
    base = {k: v for k, v in named.items() if k.startswith(TRANSFORMER_PREFIX)
            and ".lora_" not in k and not k.endswith((".U", ".V"))}
    seed = {k: v for k, v in named.items() if k.endswith((".U", ".V"))}
    peft = {k: v for k, v in named.items() if ".lora_" in k}
    config = next(m for m in model.modules() if isinstance(m, GPT2Model)).config
    out = {"gpt2": torch_gpt2_to_flax(base, like=gpt2_like(config), allow_missing=grads or trainable_only),
           "head": torch_head_to_flax(named["score.weight"])}
    if seed:
        out["lora"] = seed_lora_from_torch(seed, prefix=TRANSFORMER_PREFIX)
    if peft:
        out["lora"] = convert.lora_from_peft(GPT2, {convert.PEFT_PREFIX + k: v for k, v in peft.items()})
    return out


def randomize_layernorms(params: dict, seed: int = 0) -> dict:
    """LayerNorm scale 1 + 0.1 N(0,1), bias 0.1 N(0,1): unit/zero defaults would hide scale/bias mix-ups."""
    flat = convert.flatten(params)
    out = {}
    for i, (path, v) in enumerate(sorted(flat.items())):
        if any(p.startswith("ln_") for p in path):
            noise = 0.1 * np.asarray(np.random.default_rng(seed + i).standard_normal(v.shape))
            v = (1.0 + noise if path[-1] == "scale" else noise).astype(np.float32)
        out[path] = np.asarray(v)
    return convert.unflatten(out)


def ce_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the real rows (weights 1) of a numpy batch."""
    keep = np.asarray(batch["weights"]) > 0
    ids = torch.from_numpy(np.asarray(batch["input_ids"])[keep].astype(np.int64))
    mask = torch.from_numpy(np.asarray(batch["attention_mask"])[keep].astype(np.int64))
    labels = torch.from_numpy(np.asarray(batch["labels"])[keep].astype(np.int64))
    return nn.functional.cross_entropy(model(ids, mask), labels)


def tensors(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.asarray(batch["input_ids"]).astype(np.int64)),
            torch.from_numpy(np.asarray(batch["attention_mask"]).astype(np.int64)))


# ------------------------------------------------------------------------------------ comparison helpers


def max_rel_err(got: Any, want: Any) -> float:
    """max |got - want| / max |want|: error relative to the leaf's scale (elementwise relative error is
    meaningless for entries that are ~0)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _same_leaves(got: dict, want: dict) -> tuple[dict, dict]:
    g, w = convert.flatten(got, "/"), convert.flatten(want, "/")
    assert set(g) == set(w), (f"different leaves: only in got {sorted(set(g) - set(w))}, "
                              f"only in want {sorted(set(w) - set(g))}")
    return g, w


def tree_rel_errs(got: dict, want: dict) -> dict[str, float]:
    """{'/'-joined path: max_rel_err} over two trees that must have the same paths."""
    g, w = _same_leaves(got, want)
    return {k: max_rel_err(g[k], w[k]) for k in sorted(w)}


def tree_abs_errs(got: dict, want: dict) -> dict[str, float]:
    g, w = _same_leaves(got, want)
    return {k: float(np.max(np.abs(np.asarray(g[k], np.float64) - np.asarray(w[k], np.float64)))) for k in sorted(w)}
