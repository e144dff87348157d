"""One seed, named keys: every random choice of a run (weights, adapters, head, student, dropout, data order) is
drawn from a key named here, so builders and restores cannot drift apart."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class ModelKeys:
    """The keys of a GPT-2 classifier's parameters."""

    base: jax.Array  # a random-init GPT-2 (model.init=random)
    lora: jax.Array  # the adapters' factors
    head: jax.Array  # the classification head


def model_keys(key: jax.Array) -> ModelKeys:
    base, lora, head = jax.random.split(key, 3)
    return ModelKeys(base=base, lora=lora, head=head)


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """The named keys of a run with `train.seed = seed`."""

    seed: int
    model: jax.Array  # the classifier's parameters (split by `model_keys`) or the student's
    dropout: jax.Array  # folded with the step number in every train step (steps.step_key)

    @property
    def classifier(self) -> ModelKeys:
        return model_keys(self.model)

    def data_order(self, epoch: int) -> jax.Array:
        """The key of one epoch's row order (data.epoch_order)."""
        return data_order_key(self.seed, epoch)


def run_keys(seed: int) -> RunKeys:
    model, dropout = jax.random.split(jax.random.key(seed))
    return RunKeys(seed=seed, model=model, dropout=dropout)


def data_order_key(seed: int, epoch: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), epoch)


def seed_list(cfg: Any) -> list[int]:
    """The seeds a run trains: train.seeds, or [train.seed] for a single run."""
    return list(cfg.train.seeds) or [cfg.train.seed]


def base_seed(cfg: Any) -> int:
    """The seed whose key draws a random-init GPT-2 base: model.base_seed, else the first seed of the run. All seeds
    of a run share one frozen base, so a single run equal to seed k of a seeded random-init run needs
    `train.seed=k model.base_seed=<this>` (with pretrained weights the base is the same whatever the seed)."""
    return cfg.model.base_seed if cfg.model.base_seed >= 0 else seed_list(cfg)[0]


def classifier_base_key(cfg) -> jax.Array:
    """The key of a random-init GPT-2 base for a run's config: that of `base_seed(cfg)` (train.seed for a
    single run unless model.base_seed is set)."""
    return run_keys(base_seed(cfg)).classifier.base
