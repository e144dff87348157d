"""Weights and PEFT adapters of BERT, RoBERTa and Llama, both ways (numpy in, numpy out).

transformers' Flax and PyTorch encoders name their modules alike, so one rule maps every leaf (the one GPT-2 uses,
`convert.torch_key`): `encoder/layer/0/attention/self/query/kernel` (in, out) <-> `<prefix>.encoder.layer.0.
attention.self.query.weight` (out, in); LayerNorm `scale` <-> `weight`; `embedding` <-> `weight`. The prefix is
the base's attribute in *ForSequenceClassification (`bert.`, `roberta.`, `model.`).

Heads, flax {'head': ...} <-> PyTorch:
    BERT     head/classifier/{kernel,bias}                 classifier.{weight,bias}
    RoBERTa  head/{dense,out_proj}/{kernel,bias}           classifier.{dense,out_proj}.{weight,bias}
    Llama    head/score/kernel                             score.weight
Llama's RMSNorm keeps its one parameter as `weight` in Flax too.

A PEFT adapter (task SEQ_CLS, fan_in_fan_out false: nn.Linear stores (out, in)) holds the factors as
`base_model.model.<prefix>.<module>.lora_{A,B}.weight` and the head (modules_to_save) as
`base_model.model.classifier.*`, plus any base module listed in lora.modules_to_save.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_kd_jax.core.families import Family
from lora_kd_jax.lora import convert
from lora_kd_jax.lora.convert import PEFT_PREFIX, ConversionError

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]
HEAD_PREFIX = "classifier."
SCORE_PREFIX = "score."  # Llama's head
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # registered buffers, not parameters


def torch_key(path: tuple[str, ...]) -> tuple[str, bool]:
    """`convert.torch_key`, plus Llama's RMSNorm, whose one Flax parameter is already named `weight`."""
    if path[-1] == "weight":
        return ".".join(path), False
    return convert.torch_key(path)


def to_torch(tree: Params, prefix: str = "") -> StateDict:
    """Flax params (any subtree that keeps its paths) -> PyTorch keys `<prefix><module>.<weight|bias>`."""
    out: StateDict = {}
    for path, v in convert.flatten(tree).items():
        key, transpose = torch_key(path)
        arr = convert.to_numpy(v)
        out[prefix + key] = np.array(arr.T if transpose else arr, order="C", copy=True)
    return out


def from_torch(state_dict: Mapping[str, Any], like: Params, where: str, *,
               allow_missing: bool = False) -> tuple[Params, list[str]]:
    """PyTorch keys (no prefix) -> flax params shaped like `like`, and the keys that `like` has no place for."""
    expected = {torch_key(p)[0]: p for p in convert.flatten(like)}
    missing = set() if allow_missing else set(expected) - set(state_dict)
    if missing:
        raise ConversionError(f"{where}: missing keys: {', '.join(convert.sorted_keys(missing)[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    flat, skipped = {}, []
    for key, v in state_dict.items():
        if key not in expected:
            skipped.append(key)
            continue
        path = expected[key]
        arr = convert.to_numpy(v)
        flat[path] = np.array(arr.T if torch_key(path)[1] else arr, order="C", copy=True)
    tree = convert.unflatten(flat)
    if allow_missing:
        like = convert.unflatten({p: v for p, v in convert.flatten(like).items() if p in flat})
    convert.check_shapes(tree, like, f"{where} (converted)")
    return tree, skipped


def base_to_torch(base: Params, family: Family) -> StateDict:
    """Flax base params -> `<prefix>.<module>.<weight|bias>` (the *ForSequenceClassification keys)."""
    return to_torch(base, family.prefix + ".")


def base_from_torch(state_dict: Mapping[str, Any], family: Family, like: Params, *,
                    allow_missing: bool = False) -> tuple[Params, list[str]]:
    """A PyTorch state dict (of *Model, or of *ForSequenceClassification with the family prefix) -> flax params
    shaped like `like`, and the parameter keys it skipped (a head, an LM head, a pooler the classifier lacks)."""
    prefix = family.prefix + "."
    if any(k.startswith(prefix) for k in state_dict):
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        outside = [k for k in state_dict if not k.startswith(prefix)]
    else:
        sd, outside = dict(state_dict), []
    tree, skipped = from_torch(sd, like, f"{family.torch_class} state dict", allow_missing=allow_missing)
    return tree, sorted(k for k in [*outside, *skipped] if not k.endswith(_BUFFERS))


def _own_names(head: Params) -> bool:
    """BERT's head is one Dense named `classifier`, Llama's one named `score`; RoBERTa's holds two Denses that
    PyTorch keeps under `classifier.`."""
    return set(head) <= {"classifier", "score"}


def head_to_torch(head: Params, *, prefix: str = "") -> StateDict:
    """The flax head -> its PyTorch keys (`classifier.*`, `score.weight`)."""
    return to_torch(head, prefix if _own_names(head) else prefix + HEAD_PREFIX)


def is_head_key(key: str) -> bool:
    return key.startswith((HEAD_PREFIX, SCORE_PREFIX))


def head_from_torch(state_dict: Mapping[str, Any], like: Params, where: str) -> Params:
    """The head's PyTorch keys -> the flax head shaped like `like`; other keys are an error."""
    sd = dict(state_dict) if _own_names(like) else \
        {k[len(HEAD_PREFIX):]: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIX)}
    tree, extra = from_torch(sd, like, f"{where}: the head")
    extra += [k for k in state_dict if not is_head_key(k)]
    if extra:
        raise ConversionError(f"{where}: unexpected head keys: {', '.join(sorted(set(extra)))}")
    return tree


def lora_to_peft(factors: Params, family: Family) -> StateDict:
    """Flax factors (a (in, r), b (r, out)) -> `base_model.model.<prefix>.<module>.lora_{A,B}.weight`."""
    return convert.flax_lora_to_peft(factors, prefix=PEFT_PREFIX + family.prefix + ".")


def lora_from_peft(state_dict: Mapping[str, Any], family: Family, spec: Any = None) -> Params:
    """PEFT LoRA weights (adapter file keys, or PeftModel.state_dict() keys) -> flax factors."""
    strip = PEFT_PREFIX + family.prefix + "."
    renamed = {(PEFT_PREFIX + k[len(strip):] if k.startswith(strip) else k): v for k, v in state_dict.items()}
    return convert.peft_lora_to_flax(renamed, spec=spec)


def module_names(paths: Any, family: Family) -> list[str]:
    """PyTorch module names (`roberta.encoder.layer.0.attention.self.query`) of flax module paths."""
    return [family.prefix + "." + ".".join(p) for p in paths]
