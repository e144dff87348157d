"""GPT-2 sequence classifier: base hidden states -> last real token -> bias-free Dense(n_embd -> n_labels).

The parameter tree is {'gpt2': base, 'lora': factors (optional), 'head': {'kernel': (n_embd, n_labels)}}. It stands
behind the one model interface (`models.interface`): `init(key)` draws adapters and head over the base it holds,
`param_labels` says what trains (LoRA factors, every LayerNorm, the head; the rest of the base is frozen).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_kd_jax.lora import transform as lora_lib
from lora_kd_jax.lora.targets import select as select_targets
from lora_kd_jax.core.config import Config, ConfigError, n_outputs
from lora_kd_jax.lora import dora
from lora_kd_jax.lora.decompose import decompose
from lora_kd_jax.models import gpt2
from lora_kd_jax.core.gpt2_layout import KERNEL_LAYOUT
from lora_kd_jax.models.interface import FROZEN, HEAD, LORA, LORA_B, NORM, Labels, last_token_index

Params = dict[str, Any]
DECOMPOSED = ("pissa", "olora")  # the inits that factorise the frozen weight (`lora.decompose`)


def pool_last_token(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def init_head(key: jax.Array, n_embd: int, n_labels: int = 2) -> Params:
    """Like transformers' init of `score`: normal(0, 0.02), no bias. Stored (in, out) as a Flax Dense kernel."""
    return {"kernel": 0.02 * jax.random.normal(key, (n_embd, n_labels), jnp.float32)}


def label_of(path: tuple[str, ...], plus: bool = False) -> str:
    """The group of one leaf of a GPT-2 classifier tree: LoRA factors (and DoRA magnitudes), the head, LayerNorms
    (GPT-2 names them ln_1, ln_2, ln_f) train; every other leaf is frozen base. With LoRA+ (`plus`), B and the
    magnitudes form their own group (PEFT's create_loraplus_optimizer: lora_B and every 1-D leaf)."""
    if path[0] == "lora":
        return LORA_B if plus and path[-1] in ("b", "m") else LORA
    if path[0] == "head":
        return HEAD
    return NORM if any(p.startswith("ln_") for p in path) else FROZEN


def param_labels(params: Params, plus: bool = False) -> Labels:
    """`label_of` at every leaf of a GPT-2 classifier tree (or any subtree that keeps its paths, e.g. {'gpt2': ...})."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: label_of(k, plus) for k in flat})


@dataclasses.dataclass(frozen=True, eq=False)
class GPT2Classifier:
    """A GPT-2 module, an optional LoRA spec and the base weights every seed's adapters are drawn over (None for a
    model built from shapes only); `logits` is the pure apply function."""

    module: Any
    spec: lora_lib.LoraSpec | None = None
    base: Params | None = dataclasses.field(default=None, repr=False)
    name: str = "gpt2"
    n_labels: int = 2  # outputs of the head: the run's classes, 1 for regression (`config.n_outputs`)
    start: Params | None = dataclasses.field(default=None, repr=False)  # pissa/olora: the factors of the base
    plus_ratio: float = 1.0  # LoRA+ (lora.plus_ratio): the learning rate of B, magnitudes and LayerNorms / A's

    @property
    def lr_scales(self) -> dict[str, float]:
        """Learning rate multipliers by group (training.optimizer): LoRA+ scales B and PEFT's 1-D leaves."""
        return {LORA_B: self.plus_ratio, NORM: self.plus_ratio} if self.plus_ratio != 1.0 else {}

    def init(self, key: jax.Array) -> Params:
        """{'gpt2': the held base, 'lora': factors, 'head': ...}, adapters and head drawn from `key`."""
        if self.base is None:
            raise ValueError("this GPT2Classifier holds no base weights (built with shapes_only)")
        return init_adapters(self, self.base, key)

    def param_labels(self, params: Params) -> Labels:
        return param_labels(params, plus=self.plus_ratio != 1.0)

    def describe(self) -> str:
        rank = f", LoRA rank {self.spec.rank}" if self.spec is not None else ""
        return f"{self.name}{rank}"

    def logits(self, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
        base_rng = lora_rng = None
        if rng is not None:
            base_rng, lora_rng = jax.random.split(rng)

        def run() -> jax.Array:
            return gpt2.hidden_states(self.module, params["gpt2"], input_ids, attention_mask,
                                      deterministic=deterministic, rng=base_rng)

        if self.spec is not None and "lora" in params:
            with lora_lib.lora_context(self.spec, params["lora"], rng=lora_rng, deterministic=deterministic):
                hidden = run()
        else:
            hidden = run()
        pooled = pool_last_token(hidden, attention_mask).astype(jnp.float32)
        return pooled @ params["head"]["kernel"].astype(jnp.float32)

    def merged(self, params: Params) -> Params:
        """The same function with LoRA folded into the kernels (plain GPT-2 weights + head)."""
        if self.spec is None or "lora" not in params:
            return params
        base = lora_lib.merge(params["gpt2"], self.spec, params["lora"], KERNEL_LAYOUT)
        return {"gpt2": base, "head": params["head"]}


def build_classifier(cfg: Config, key: jax.Array, *, base_key: jax.Array | None = None, with_lora: bool = True,
                     shapes_only: bool = False) -> tuple[GPT2Classifier, Params]:
    """Model and full parameter tree from config. `key` draws the adapters and head (and a random-init base, unless
    `base_key` is given: the seeds of a seeded run share one base). `shapes_only` builds ShapeDtypeStructs (no
    weights, no I/O)."""
    k_base = jax.random.split(key, 3)[0] if base_key is None else base_key
    if shapes_only:
        module = gpt2.build_module(cfg.model)
        base = gpt2.param_shapes(module)
    else:
        module, base = gpt2.load_base(cfg.model, k_base)
    spec = None
    if with_lora:
        lc = cfg.lora
        spec = lora_lib.make_spec(base, select_targets(lc.targets, "gpt2", base), rank=lc.rank, alpha=lc.alpha,
                                  dropout=lc.dropout, init=lc.init, kernel_layout=KERNEL_LAYOUT, scaling=lc.scaling,
                                  variant=lc.variant)
    base, start = decompose_base(base, spec, shapes_only=shapes_only)
    model = GPT2Classifier(module, spec, None if shapes_only else base, cfg.model.name, n_outputs(cfg), start,
                           cfg.lora.plus_ratio if with_lora else 1.0)
    return model, init_adapters(model, base, key, shapes_only=shapes_only)


def decompose_base(base: Params, spec: lora_lib.LoraSpec | None, *, shapes_only: bool = False
                   ) -> tuple[Params, Params | None]:
    """(the base the run trains on, the factors at init) for pissa / olora (`lora.decompose`, in the spec's kernel
    layout: every family's builder calls this); (base, None) for the other inits."""
    if spec is None or spec.init not in DECOMPOSED:
        return base, None
    small = min(min(s) for s in spec.shapes)
    if spec.rank > small:
        raise ConfigError(f"lora.rank={spec.rank} with lora.init={spec.init}: the rank cannot exceed the smallest "
                          f"adapted layer's width ({small})")
    return (base, None) if shapes_only else decompose(base, spec)


def init_factors(model: Any, base: Params, key: jax.Array) -> Params:
    """The LoRA tree of one seed of any LoRA classifier (its `spec`, its `start`): factors drawn from `key` (or the
    base's own, pissa/olora) and, for DoRA, the magnitudes that make the adapted layers start as the frozen ones."""
    spec = model.spec
    factors = jax.tree.map(jnp.asarray, model.start) if model.start is not None else lora_lib.init_lora(spec, key)
    return dora.add_magnitudes(base, spec, factors) if spec.variant == "dora" else factors


def init_adapters(model: GPT2Classifier, base: Params, key: jax.Array, *, shapes_only: bool = False) -> Params:
    """{'gpt2': base, 'lora': factors, 'head': ...} with the factors and head drawn from `key` (split as
    keys.model_keys: base, lora, head); one base serves every seed's adapters."""
    _, k_lora, k_head = jax.random.split(key, 3)
    n_embd = model.module.config.n_embd
    params: Params = {"gpt2": base}
    if model.spec is not None:
        init = functools.partial(init_factors, model)
        params["lora"] = jax.eval_shape(init, base, k_lora) if shapes_only else init(base, k_lora)
    head = functools.partial(init_head, n_embd=n_embd, n_labels=model.n_labels)
    params["head"] = jax.eval_shape(head, k_head) if shapes_only else head(k_head)
    return params
