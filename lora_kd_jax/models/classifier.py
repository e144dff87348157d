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
from lora_kd_jax.core.config import Config, n_outputs
from lora_kd_jax.models import gpt2
from lora_kd_jax.core.gpt2_layout import KERNEL_LAYOUT
from lora_kd_jax.models.interface import FROZEN, HEAD, LORA, NORM, Labels, last_token_index

Params = dict[str, Any]


def pool_last_token(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def init_head(key: jax.Array, n_embd: int, n_labels: int = 2) -> Params:
    """Like transformers' init of `score`: normal(0, 0.02), no bias. Stored (in, out) as a Flax Dense kernel."""
    return {"kernel": 0.02 * jax.random.normal(key, (n_embd, n_labels), jnp.float32)}


def label_of(path: tuple[str, ...]) -> str:
    """The group of one leaf of a GPT-2 classifier tree: LoRA factors, the head, LayerNorms (GPT-2 names them
    ln_1, ln_2, ln_f) train; every other leaf is frozen base."""
    if path[0] == "lora":
        return LORA
    if path[0] == "head":
        return HEAD
    return NORM if any(p.startswith("ln_") for p in path) else FROZEN


def param_labels(params: Params) -> Labels:
    """`label_of` at every leaf of a GPT-2 classifier tree (or any subtree that keeps its paths, e.g. {'gpt2': ...})."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: label_of(k) for k in flat})


@dataclasses.dataclass(frozen=True, eq=False)
class GPT2Classifier:
    """A GPT-2 module, an optional LoRA spec and the base weights every seed's adapters are drawn over (None for a
    model built from shapes only); `logits` is the pure apply function."""

    module: Any
    spec: lora_lib.LoraSpec | None = None
    base: Params | None = dataclasses.field(default=None, repr=False)
    name: str = "gpt2"
    n_labels: int = 2  # outputs of the head: the run's classes, 1 for regression (`config.n_outputs`)

    def init(self, key: jax.Array) -> Params:
        """{'gpt2': the held base, 'lora': factors, 'head': ...}, adapters and head drawn from `key`."""
        if self.base is None:
            raise ValueError("this GPT2Classifier holds no base weights (built with shapes_only)")
        return init_adapters(self, self.base, key)

    def param_labels(self, params: Params) -> Labels:
        return param_labels(params)

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
                                  dropout=lc.dropout, init=lc.init, kernel_layout=KERNEL_LAYOUT)
    model = GPT2Classifier(module, spec, None if shapes_only else base, cfg.model.name, n_outputs(cfg))
    return model, init_adapters(model, base, key, shapes_only=shapes_only)


def init_adapters(model: GPT2Classifier, base: Params, key: jax.Array, *, shapes_only: bool = False) -> Params:
    """{'gpt2': base, 'lora': factors, 'head': ...} with the factors and head drawn from `key` (split as
    keys.model_keys: base, lora, head); one base serves every seed's adapters."""
    _, k_lora, k_head = jax.random.split(key, 3)
    n_embd = model.module.config.n_embd
    params: Params = {"gpt2": base}
    if model.spec is not None:
        init = functools.partial(lora_lib.init_lora, model.spec)
        params["lora"] = jax.eval_shape(init, k_lora) if shapes_only else init(k_lora)
    head = functools.partial(init_head, n_embd=n_embd, n_labels=model.n_labels)
    params["head"] = jax.eval_shape(head, k_head) if shapes_only else head(k_head)
    return params
