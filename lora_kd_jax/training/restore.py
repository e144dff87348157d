"""A run directory back as config, model and weights: the model rebuilt from the run's config.yaml with the run's own
keys (a random-init base is the same base), the trained parameters restored onto it from a checkpoint.

Above training: it needs the model (`models.registry`) and the one state recipe (`training.state`), so a checkpoint
always restores into the tree that wrote it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lora_kd_jax.core import metrics as metrics_lib
from lora_kd_jax.core.config import Config, n_outputs
from lora_kd_jax.core.keys import run_keys
from lora_kd_jax.models.registry import build_model
from lora_kd_jax.runs import rundir
from lora_kd_jax.runs.checkpoint import CheckpointError, CheckpointStore
from lora_kd_jax.runs.reader import RunError, RunInfo, inspect_run
from lora_kd_jax.training.state import combine, quantize_frozen, train_state

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Run(RunInfo):
    """A restored run: `model` (behind the one model interface, `models.interface`) and its full parameter tree."""

    which: str = "best"
    model: Any = None
    params: Params = dataclasses.field(default_factory=dict)


def open_run(path: str | Path | RunInfo, *, kind: str | None = None, which: str = "best") -> Run:
    """A run restored from `checkpoints/<which>`: the model is rebuilt from the run's config.yaml with the run's own
    keys (so a random-init base is the same base), then the trained parameters are restored onto it. The frozen
    base comes back in float32, as loaded (model.base_dtype is a storage choice of training), its block kernels
    quantized as the run quantized them when it ran with lora.quantize (they change what the model computes).
    `path` may be the `RunInfo` an earlier `inspect_run(path, kind=kind, which=which)` returned: its checks are not
    repeated."""
    info = path if isinstance(path, RunInfo) else inspect_run(path, kind=kind, which=which)
    model, frozen, state = _rebuild(info.config, kind or info.kind or "lora")
    store = CheckpointStore(info.path / "checkpoints", read_only=True)
    try:
        target = {"state": state, "train_sums": metrics_lib.zeros(n_outputs(info.config))}
        tree, record, _ = store.restore_best(target) if which == "best" else store.restore_latest(target)
    except CheckpointError as e:
        raise RunError(f"{info.path}: the {which} checkpoint does not restore into the model its "
                       f"{rundir.CONFIG_FILE} describes: {e}") from None
    finally:
        store.close()
    found = record.get("kind")
    if info.kind is not None and found != info.kind or kind is not None and found != kind:
        raise RunError(f"{info.path}: the {which} checkpoint is a '{found}' run, not a '{kind or info.kind}' run")
    return Run(path=info.path, config=info.config, kind=found, summary=info.summary, epochs_done=info.epochs_done,
               which=which, model=model, params=combine(tree["state"].trainable, frozen))


def _rebuild(cfg: Config, kind: str) -> tuple[Any, Params, Any]:
    """(model, frozen partition, a train state shaped like the checkpoint's) for a run of `kind`: the run's model
    and the one state recipe, with the run's own keys."""
    keys = run_keys(cfg.train.seed)
    model = build_model(cfg, kind)
    setup = train_state(model, model.init(keys.model), cfg.train, keys.dropout)  # the run's optimizer's tree
    return model, quantize_frozen(setup.frozen, cfg, model), setup.state
