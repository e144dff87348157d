"""The one place that builds the device mesh and decides where batches and parameters live.

Choice: `jax.jit` with `NamedSharding`s over a 2-axis mesh ('data', 'fsdp'), not `pmap`. Batches are split over
both axes (every device sees different rows); the frozen base weights are additionally split over 'fsdp' (each
leaf along its largest divisible dimension, gathered by XLA where used) so large models fit on small cards;
trainable parameters and optimizer state, which are tiny under LoRA, are replicated. The same jitted step
then runs on one CPU, eight GPUs or many hosts without code changes, and checkpoints restore across meshes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lora_kd_jax.core.config import DistributedConfig, MeshConfig
from lora_kd_jax.core.errors import UserError

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


class MeshError(UserError, ValueError):
    """The mesh does not fit the devices, or a batch does not divide over it."""
    label = "mesh error"


_initialized = False


def initialize_distributed(cfg: DistributedConfig) -> None:
    """jax.distributed.initialize from config (explicit values) or the environment (SLURM, TPU: JAX detects)."""
    global _initialized
    if not cfg.enabled or _initialized:
        return
    if cfg.cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address or None,
                               num_processes=cfg.num_processes or None,
                               process_id=cfg.process_id if cfg.process_id >= 0 else None)
    _initialized = True
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
    """Only process 0 writes metrics, plots and logs (Orbax checkpoints are written by all, collectively)."""
    return jax.process_index() == 0


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: all, across hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if cfg.fsdp > n or n % cfg.fsdp:
        raise MeshError(f"mesh.fsdp={cfg.fsdp} does not divide the {n} available device(s)")
    data = n // cfg.fsdp if cfg.data == -1 else cfg.data
    if data * cfg.fsdp > n:
        raise MeshError(f"mesh.data={data} x mesh.fsdp={cfg.fsdp} = {data * cfg.fsdp} devices, but only {n} "
                        f"device(s) are available")
    return Mesh(np.array(devices[:data * cfg.fsdp]).reshape(data, cfg.fsdp), BATCH_AXES)


def batch_parallelism(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(mesh: Mesh, batch_size: int, key: str = "train.batch_size") -> int:
    """Per-device batch; an indivisible global batch is an error naming both numbers."""
    n = batch_parallelism(mesh)
    if batch_size % n:
        raise MeshError(f"{key}={batch_size} is not divisible by the mesh's {n} batch-parallel devices "
                        f"(mesh.data x mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple "
                        f"of {n}")
    return batch_size // n


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (row) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Split the largest dimension that `fsdp` divides; replicate small or indivisible leaves."""
    if fsdp == 1 or not shape or int(np.prod(shape)) < 4096:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return P()


def frozen_shardings(mesh: Mesh, tree: Any) -> Any:
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh.shape["fsdp"])), tree)


def place_replicated(mesh: Mesh, tree: Any) -> Any:
    return jax.device_put(tree, replicated(mesh))


def place_frozen(mesh: Mesh, tree: Any) -> Any:
    return jax.device_put(tree, frozen_shardings(mesh, tree))


def place_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global host batch -> global device arrays; each process transfers only the rows its devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(dict(batch), sharding)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a trainer puts things: built once from config, used by the loop and the steps."""

    mesh: Mesh

    @property
    def batch(self) -> NamedSharding:
        return batch_sharding(self.mesh)

    @property
    def state_sharding(self) -> NamedSharding:
        """Where the train state lives (replicated): the train step keeps it there (`make_train_step`)."""
        return replicated(self.mesh)

    def state(self, tree: Any) -> Any:
        return place_replicated(self.mesh, tree)

    def frozen(self, tree: Any) -> Any:
        return place_frozen(self.mesh, tree)

    def leaf(self, path: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        """Where a frozen base leaf goes as a checkpoint is read: split over fsdp as `place_frozen` splits it."""
        return NamedSharding(self.mesh, fsdp_spec(tuple(shape), self.mesh.shape["fsdp"]))

    def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return place_batch(batch, self.batch)

    def put_seeded_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A batch with a leading seed axis [N, B, ...]: rows split over the mesh as for one seed, seeds not."""
        return place_batch(batch, NamedSharding(self.mesh, P(None, BATCH_AXES)))


def run_placement(cfg: Any) -> Placement:
    """The placement a run's config asks for (its mesh, and both batch sizes checked against it)."""
    return placement_for(cfg.mesh, cfg.distributed, {"train.batch_size": cfg.train.batch_size,
                                                     "train.eval_batch_size": cfg.train.eval_batch})


def placement_for(mesh_cfg: MeshConfig, dist_cfg: DistributedConfig, batch_sizes: Mapping[str, int]) -> Placement:
    """Initialize multi-host if asked, build the mesh, and check every batch size divides over it."""
    initialize_distributed(dist_cfg)
    mesh = make_mesh(mesh_cfg)
    for key, size in batch_sizes.items():
        check_batch_size(mesh, size, key)
    if batch_parallelism(mesh) > 1 or jax.process_count() > 1:
        log.info("mesh %s over %d device(s), %d process(es)", dict(mesh.shape), mesh.size, jax.process_count())
    return Placement(mesh)

