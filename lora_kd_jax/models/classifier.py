"""One sequence classifier for every family: the family's base (`models.families`), optional LoRA, the family's head.

The tree is {family.prefix: base, 'lora': factors (optional), 'head': ...} — 'gpt2', 'bert', 'roberta', 'model' —
so that run dirs, PEFT name maps and the transformers 4 Flax checkpoints keep their trees. It stands behind the one
model interface (`models.interface`): `init(key)` draws adapters and head over the base it holds, `param_labels` says
what trains, `logits` is the pure apply function, `merged` folds the adapters into plain weights.

What trains (PEFT's SEQ_CLS defaults): the LoRA factors, the head, the family's `trained_modules` (GPT-2's
LayerNorms, the study's choice) and every base module `lora.modules_to_save` names; the rest of the base is frozen and
held once (`training.state`). Padding: positions outside the attention mask read the family's pad id before the
base runs, so a batch padded with another id computes what PyTorch computes on the tokenizer's own padding.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_kd_jax.lora import dora, quantize
from lora_kd_jax.lora import transform as lora_lib
from lora_kd_jax.lora.decompose import decompose
from lora_kd_jax.models.families import Family
from lora_kd_jax.models.interface import FROZEN, HEAD, LORA, LORA_B, NORM, Labels
from lora_kd_jax.models.modules.arch import Arch

Params = dict[str, Any]
DECOMPOSED = ("pissa", "olora")  # the inits that factorise the frozen weight (`lora.decompose`)


def matches_module(module: str, names: tuple[str, ...]) -> bool:
    """PEFT's modules_to_save rule: the module's dotted name is one of the names or ends with `.name`."""
    return any(module == n or module.endswith("." + n) for n in names)


def norm_modules(flat: dict[tuple[str, ...], Any]) -> set[tuple[str, ...]]:
    """The normalisation layers of a flattened tree: modules holding LayerNorm's `scale` or RMSNorm's `weight`."""
    return {path[:-1] for path in flat if path[-1] in ("scale", "weight")}


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A family's base module, its head, an optional LoRA spec and the base weights every seed's adapters are drawn
    over (None when built from shapes only, and in the jitted steps, which take the frozen base as an argument).
    Two classifiers are equal when they compute the same function of their parameters: the weights they hold for
    `init` and the name logs give them do not count (so equal runs share their compiled steps)."""

    family: Family
    arch: Arch
    dtype: Any = jnp.float32  # compute dtype of the base
    spec: lora_lib.LoraSpec | None = None
    base: Params | None = dataclasses.field(default=None, repr=False, compare=False)
    n_labels: int = 2  # outputs of the head: the run's classes, 1 for regression (`config.n_outputs`)
    to_save: tuple[str, ...] = ()  # base modules trained in full: the family's trained_modules + lora.modules_to_save
    # pissa/olora: the factors of the base
    start: Params | None = dataclasses.field(default=None, repr=False, compare=False)
    plus_ratio: float = 1.0  # LoRA+ (lora.plus_ratio): the rate of B, magnitudes and trained 1-D leaves / A's
    name: str = dataclasses.field(default="", compare=False)  # how logs name it (model.path, the hub id, the size)
    quantize: str = "none"  # QLoRA (lora.quantize): how the frozen block kernels are stored
    double_quant: bool = False  # lora.double_quant

    @functools.cached_property
    def module(self) -> nn.Module:
        return self.family.module(self.arch, self.dtype)

    @property
    def pad_id(self) -> int:
        return self.arch.pad_token_id

    def quantized_kernel(self, path: tuple[str, ...], kernel: Any) -> bool:
        """Does a QLoRA run store this base leaf (path within the base) quantized? A frozen linear kernel of the
        family's blocks, not of a module trained in full."""
        return (self.quantize != "none" and quantize.block_kernel(path, kernel, self.family.blocks)
                and not matches_module(".".join(path[:-1]), self.to_save))

    def as_computed(self, path: tuple[str, ...], kernel: Any) -> Any:
        """A base kernel as the run computes with it: a QLoRA kernel quantized and dequantized (in the compute
        dtype), any other as it is. DoRA's magnitudes and PiSSA/OLoRA's factors start from these, as PEFT's start
        from the dequantized weight of a bitsandbytes layer."""
        if quantize.is_quantized(kernel):
            return kernel.dequantize()
        if not self.quantized_kernel(path, kernel):
            return kernel
        return quantize.quantizer(self.quantize, layout=self.family.kernel_layout, double_quant=self.double_quant,
                                  dtype=self.dtype)(kernel).dequantize()

    @property
    def lr_scales(self) -> dict[str, float]:
        """LoRA+ (training.optimizer): B, the DoRA magnitudes and every trained 1-D leaf at plus_ratio x the rate,
        PEFT's create_loraplus_optimizer groups (its groupB: lora_B and ndim == 1)."""
        return {LORA_B: self.plus_ratio, NORM: self.plus_ratio} if self.plus_ratio != 1.0 else {}

    def init(self, key: jax.Array) -> Params:
        """{prefix: the held base, 'lora': factors, 'head': ...}, adapters and head drawn from `key`."""
        if self.base is None:
            raise ValueError("this classifier holds no base weights (built with shapes_only)")
        return init_params(self, self.base, key)

    def param_labels(self, params: Params) -> Labels:
        """The optimizer group of every leaf (any subtree that keeps its paths): LoRA factors (LoRA+: B and the
        magnitudes apart), the head, the modules trained in full (their norms apart), the frozen rest."""
        plus = self.plus_ratio != 1.0
        flat = traverse_util.flatten_dict(params)
        norms = norm_modules(flat)

        def label(path: tuple[str, ...], leaf: Any) -> str:
            one_d = len(getattr(leaf, "shape", ())) == 1
            if path[0] == "lora":
                return LORA_B if plus and path[-1] in ("b", "m") else LORA
            if path[0] == "head":
                return LORA_B if plus and one_d else HEAD
            if self.to_save and matches_module(".".join(path[1:-1]), self.to_save):
                if path[:-1] in norms:
                    return NORM
                return LORA_B if plus and one_d else HEAD
            return FROZEN

        return traverse_util.unflatten_dict({k: label(k, v) for k, v in flat.items()})

    def describe(self) -> str:
        rank = f", LoRA rank {self.spec.rank}" if self.spec is not None else ""
        return f"{self.name or self.family.name}{rank}"

    def logits(self, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool = True, rng: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
        """float32 logits [B, n_labels]. `token_type_ids`: BERT's segment ids of a sentence pair (None: all 0)."""
        base_rng = lora_rng = head_rng = None
        if rng is not None and not deterministic:  # one key for each part that draws dropout
            keys = jax.random.split(rng, 3 if self.family.head.dropout else 2)
            base_rng, lora_rng = keys[0], keys[1]
            head_rng = keys[2] if self.family.head.dropout else None
        def run() -> tuple[jax.Array, jax.Array | None]:
            return self.base_outputs(params[self.family.prefix], input_ids, attention_mask, deterministic=deterministic,
                                     rng=base_rng, token_type_ids=token_type_ids)

        if self.spec is not None and "lora" in params:
            with lora_lib.lora_context(self.spec, params["lora"], rng=lora_rng, deterministic=deterministic):
                hidden, pooled = run()
        else:
            hidden, pooled = run()
        a = self.arch
        rate = a.classifier_dropout if a.classifier_dropout is not None else a.hidden_dropout
        return self.family.head.apply(params["head"], hidden, pooled, attention_mask, head_rng, rate)

    def base_outputs(self, base: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
                     deterministic: bool = True, rng: jax.Array | None = None,
                     token_type_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """The base alone: (last hidden states [B, L, hidden], BERT's pooler output or None)."""
        ids = jnp.where(attention_mask > 0, input_ids, self.pad_id)
        return self.module.apply({"params": base}, ids, attention_mask, self.family.positions(ids, self.pad_id),
                                 token_type_ids, deterministic=deterministic,
                                 rngs={"dropout": rng} if rng is not None else None)

    def merged(self, params: Params) -> Params:
        """The same function with LoRA folded into the kernels: {prefix: plain base, 'head': ...}."""
        if self.spec is None or "lora" not in params:
            return params
        base = lora_lib.merge(params[self.family.prefix], self.spec, params["lora"], self.family.kernel_layout)
        return {self.family.prefix: base, "head": params["head"]}


def example_inputs(family: Family, length: int = 4) -> tuple[jax.Array, ...]:
    ids = jnp.zeros((1, length), jnp.int32)
    return ids, jnp.ones_like(ids), family.positions(ids + 3, 1)


@functools.partial(jax.jit, static_argnums=0)
def _init_base(module: nn.Module, key: jax.Array, *inputs: jax.Array) -> Params:
    """The module's parameters from `key`: one compiled program per module (linen modules of equal
    configuration are equal), however many models a process builds."""
    return module.init(key, *inputs)["params"]


def base_shapes(family: Family, module: nn.Module) -> Params:
    """The base's ShapeDtypeStructs (no memory, no weights): --dry-run, restore targets, the loader's map."""
    return jax.eval_shape(functools.partial(_init_base, module), jax.random.key(0), *example_inputs(family))


# The last random bases drawn (module, key data -> base), each at most RECENT_BASE_BYTES: a process that builds the
# same random model again (a sweep's runs, a run and then its evaluation, the tests' tiny GPT-2s) copies it instead of
# drawing it anew; drawing runs threefry over every weight, a copy moves the bytes once.
RECENT_BASES, RECENT_BASE_BYTES = 2, 64 * 2**20
_recent_bases: collections.OrderedDict = collections.OrderedDict()


def random_base(family: Family, module: nn.Module, key: jax.Array) -> Params:
    """The family's own initialisers (normal(initializer_range) weights, zero biases, unit norms) at the module's
    size: the values transformers' Flax classes drew from the same key. A fresh copy each call (a run may donate
    the leaves it trains, the norms), equal to a new draw bit for bit."""
    if isinstance(key, jax.core.Tracer):  # inside a trace: the enclosing program draws
        return _init_base(module, key, *example_inputs(family))
    seen = (module, np.asarray(jax.random.key_data(key)).tobytes())
    if seen not in _recent_bases:
        base = _init_base(module, key, *example_inputs(family))
        if sum(x.nbytes for x in jax.tree.leaves(base)) > RECENT_BASE_BYTES:
            return base
        _recent_bases[seen] = base
        while len(_recent_bases) > RECENT_BASES:
            _recent_bases.popitem(last=False)
    _recent_bases.move_to_end(seen)
    return jax.tree.map(jnp.copy, _recent_bases[seen])


def init_factors(model: Any, base: Params, key: jax.Array) -> Params:
    """The LoRA tree of one seed: factors drawn from `key` (or the base's own, pissa/olora) and, for DoRA, the
    magnitudes that make the adapted layers start as the frozen ones."""
    spec = model.spec
    factors = jax.tree.map(jnp.asarray, model.start) if model.start is not None else lora_lib.init_lora(spec, key)
    return dora.add_magnitudes(base, spec, factors, model.as_computed) if spec.variant == "dora" else factors


def init_params(model: Classifier, base: Params, key: jax.Array, *, shapes_only: bool = False) -> Params:
    """{prefix: base, 'lora': factors, 'head': ...}, the factors and head drawn from `key` (split as
    `keys.model_keys`: base, lora, head); one base serves every seed's adapters."""
    _, k_lora, k_head = jax.random.split(key, 3)
    params: Params = {model.family.prefix: base}
    if model.spec is not None:
        init = functools.partial(init_factors, model)
        params["lora"] = jax.eval_shape(init, base, k_lora) if shapes_only else init(base, k_lora)
    head = functools.partial(model.family.head.init, hidden=model.arch.hidden_size, n_labels=model.n_labels,
                             std=model.arch.initializer_range)
    params["head"] = jax.eval_shape(head, k_head) if shapes_only else head(k_head)
    return params


def decompose_base(base: Params, spec: lora_lib.LoraSpec | None, *, shapes_only: bool = False,
                   value: Callable[[tuple[str, ...], Any], Any] | None = None) -> tuple[Params, Params | None]:
    """(the base the run trains on, the factors at init) for pissa / olora (`lora.decompose`) of each kernel's
    `value(path, kernel)` (`Classifier.as_computed`: QLoRA decomposes the dequantized weight); (base, None) for the
    other inits."""
    from lora_kd_jax.core.config import ConfigError

    if spec is None or spec.init not in DECOMPOSED:
        return base, None
    small = min(min(s) for s in spec.shapes)
    if spec.rank > small:
        raise ConfigError(f"lora.rank={spec.rank} with lora.init={spec.init}: the rank cannot exceed the smallest "
                          f"adapted layer's width ({small})")
    return (base, None) if shapes_only else decompose(base, spec, value)
