"""The one state recipe: (model, training settings, seeds) -> the train state every trainer, resume, the run reader,
import and the bench use, so a checkpoint always restores into the tree that wrote it.

A model's parameters split by its labels into the trainable partition (in the state: donated, updated in place,
one copy per seed) and the frozen one (held once, shared by every seed, passed to each step as `consts['frozen']`).
The optimizer state is `training.optimizer`'s over the whole tree: frozen leaves hold no optimizer state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lora_kd_jax.core import precision
from lora_kd_jax.core.config import Config, TrainConfig
from lora_kd_jax.core.keys import run_keys
from lora_kd_jax.lora import quantize
from lora_kd_jax.models.classifier import Classifier
from lora_kd_jax.models.interface import FROZEN, ClassifierModel, Labels, lr_scales
from lora_kd_jax.training.optimizer import make_optimizer

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    trainable: Params
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data of the dropout key (checkpointable)


def step_key(state: TrainState) -> jax.Array:
    """A fresh dropout key per step, independent of how the run was split into sessions."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def stack(trees: Sequence[Any]) -> Any:
    """N pytrees of equal structure -> one pytree whose leaves carry a leading (seed) axis of size N."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def take(tree: Any, i: int) -> Any:
    """Seed i's slice of a stacked pytree."""
    return jax.tree.map(lambda x: x[i], tree)


def partition(params: Params, labels: Labels) -> tuple[Params, Params]:
    """(trainable, frozen): two nested dicts holding disjoint leaves of `params`, split by `labels`."""
    flat, flat_labels = traverse_util.flatten_dict(params), traverse_util.flatten_dict(labels)
    train = {k: v for k, v in flat.items() if flat_labels[k] != FROZEN}
    frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def combine(trainable: Params, frozen: Params) -> Params:
    """Inverse of `partition`."""
    flat = dict(traverse_util.flatten_dict(frozen))
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def cast_frozen(frozen: Params, dtype: str) -> Params:
    """Store the frozen base in `dtype`, "float32" or "bfloat16" (halves its memory and bandwidth); a config's
    setting is resolved by `precision.base_dtype(cfg.model)`. Trainable leaves are not touched (they stay fp32), nor
    are quantized kernels (`quantize_frozen`: their codes and scales are kept as they are)."""
    target = precision.dtype(dtype, "base")
    if target == jnp.float32:
        return frozen
    return jax.tree.map(lambda x: x if quantize.is_quantized(x) or not jnp.issubdtype(x.dtype, jnp.floating)
                        else x.astype(target), frozen, is_leaf=quantize.is_quantized)


def quantize_frozen(frozen: Params, cfg: Config, model: Any) -> Params:
    """QLoRA (`lora.quantize`): the frozen partition with every linear kernel of the family's blocks quantized from
    the weights as built (float32), each dequantizing to the run's compute dtype; unchanged without it, and for
    models that are not a family's classifier. Deterministic: a resumed run or a reader rebuilds the same codes
    from the source weights, so the quantized base needs no checkpoint (the frozen base has none)."""
    if cfg.lora.quantize == "none" or not isinstance(model, Classifier) or model.family.prefix not in frozen:
        return frozen  # a student has no family's blocks to quantize
    fam = model.family
    base = quantize.quantize_base(frozen[fam.prefix], cfg.lora.quantize, blocks=fam.blocks, layout=fam.kernel_layout,
                                  double_quant=cfg.lora.double_quant, dtype=precision.compute_dtype(cfg.model))
    return {**frozen, fam.prefix: base}


def stored_frozen(frozen: Params, cfg: Config, model: Any) -> Params:
    """The frozen partition as a run holds it: quantized (`quantize_frozen`), the rest in model.base_dtype."""
    return cast_frozen(quantize_frozen(frozen, cfg, model), precision.base_dtype(cfg.model))


def base_bytes(frozen: Params) -> dict[str, int]:
    """Bytes of a frozen partition (arrays or ShapeDtypeStructs): {'total', 'quantized' (the quantized kernels'
    codes and statistics), 'quantized_as_bf16' (what those kernels would take in bfloat16)}."""
    leaves = jax.tree.leaves(frozen, is_leaf=quantize.is_quantized)
    quant = [x for x in leaves if quantize.is_quantized(x)]
    return {"total": quantize.nbytes(frozen), "quantized": quantize.nbytes(quant),
            "quantized_as_bf16": sum(2 * int(np.prod(x.shape)) for x in quant)}


def describe_bytes(frozen: Params, cfg: Config) -> str:
    """One line for --dry-run, the run log and the bench: the frozen base's bytes, and the quantized kernels'."""
    b = base_bytes(frozen)
    line = f"frozen base: {b['total']:,} bytes ({b['total'] / 2**20:,.1f} MiB, model.base_dtype resolved)"
    if b["quantized"]:
        dq = " + double quant" if cfg.lora.double_quant else ""
        line += (f"; {cfg.lora.quantize}{dq} block kernels {b['quantized']:,} bytes = "
                 f"{b['quantized'] / b['quantized_as_bf16']:.3f}x their bfloat16 size")
    return line


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a trainer needs from the recipe."""

    tx: optax.GradientTransformation
    state: TrainState  # one seed's, or every seed's stacked on a leading axis (`stacked`)
    frozen: Params  # the frozen partition (float32, as built; the trainer casts and places it)
    labels: Labels
    params: Params  # the first seed's full tree (its parameter report; the reader's frozen base)


def train_state(model: ClassifierModel, params: Params, train: TrainConfig | float, dropout_key: jax.Array,
                tx: optax.GradientTransformation | None = None, total_steps: int = 1) -> TrainSetup:
    """The state of one seed from its full parameter tree: step 0, the trainable partition, the optimizer state
    of the whole tree, the dropout key. `train` is the run's TrainConfig (its learning rate schedule spans
    `total_steps`; a reader that only restores may leave it at 1: the state's structure does not depend on it), or
    a learning rate alone (constant-rate Adam)."""
    labels = model.param_labels(params)
    tx = tx or make_optimizer(train, labels, total_steps, lr_scales(model))
    trainable, frozen = partition(params, labels)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(params),
                       rng=jax.random.key_data(dropout_key))
    return TrainSetup(tx=tx, state=state, frozen=frozen, labels=labels, params=params)


def seed_states(model: ClassifierModel, train: TrainConfig | float, seeds: Sequence[int], *, stacked: bool,
                total_steps: int = 1) -> TrainSetup:
    """Every seed's state, each drawn from its own named keys (`run_keys(seed)`: model and dropout), over one
    frozen partition; `stacked` puts them on a leading seed axis (many seeds in one program)."""
    setups = []
    for seed in seeds:
        keys = run_keys(seed)
        tx = setups[0].tx if setups else None
        setups.append(train_state(model, model.init(keys.model), train, keys.dropout, tx, total_steps))
    state = stack([s.state for s in setups]) if stacked else setups[0].state
    return dataclasses.replace(setups[0], state=state)


@dataclasses.dataclass(frozen=True)
class ParamReport:
    total: int
    trainable: int

    @property
    def reduction(self) -> float:
        return 1.0 - self.trainable / self.total

    def __str__(self) -> str:
        return (f"params: total {self.total / 1e6:.2f}M ({self.total:,}), trainable {self.trainable / 1e6:.2f}M "
                f"({self.trainable:,}), reduction {100 * self.reduction:.2f}%")


def param_report(params: Params, labels: Labels) -> ParamReport:
    """Counts from shapes alone, so it works on `jax.eval_shape` trees too."""
    flat, flat_labels = traverse_util.flatten_dict(params), traverse_util.flatten_dict(labels)
    size = lambda v: int(np.prod(v.shape))  # noqa: E731
    return ParamReport(total=sum(size(v) for v in flat.values()),
                       trainable=sum(size(v) for k, v in flat.items() if flat_labels[k] != FROZEN))
