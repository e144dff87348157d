"""The one run reader: what a run directory (LoRA, distilled student, student baseline) says about itself, read
without building any weights: its config, its kind, its summary, its seeds and which checkpoint it holds.

Distillation's teacher, export, merge and evaluation check runs here (`inspect_run`) before restoring one
(`training.restore.open_run`, which takes the RunInfo), so a directory that is not a usable run fails the same way
everywhere: one `RunError` saying what is wrong with it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


from lora_kd_jax.runs import rundir
from lora_kd_jax.runs.seed_dirs import seed_dir
from lora_kd_jax.core.config import Config, ConfigError, from_dict
from lora_kd_jax.core.errors import UserError, read_json_object

Params = dict[str, Any]
KINDS = ("lora", "distill", "rnn")
WHICH = ("best", "latest")
WRITERS = {"lora": "train-lora", "distill": "distill", "rnn": "train-rnn"}


class RunError(UserError, ValueError):
    """A directory is not a run that can be read as asked; the message says what is wrong with it."""
    label = "run error"


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a run dir says about itself, read without building any weights."""

    path: Path
    config: Config
    kind: str | None  # lora | distill | rnn, from metrics.json; None for a run that has not finished an epoch
    summary: dict  # metrics.json's summary ({} before the first epoch)
    epochs_done: int


def find_run_dir(path: str | Path) -> Path:
    """The run dir that `path` names: the run dir itself, its checkpoints/ dir, or checkpoints/best|latest."""
    if not str(path):
        raise RunError("no run directory given (expected the directory a training command wrote)")
    p = Path(path).expanduser()
    if not p.exists():
        raise RunError(f"{p} does not exist (expected a run directory or its checkpoints/ dir)")
    candidates = [p]
    if p.name == "checkpoints":
        candidates.append(p.parent)
    if p.parent.name == "checkpoints" and p.name in WHICH:
        candidates.append(p.parent.parent)
    for c in candidates:
        if (c / rundir.CONFIG_FILE).is_file():
            return c
    raise RunError(f"{p} is not a run directory: no {rundir.CONFIG_FILE} there (expected the directory a training "
                   "command wrote, or its checkpoints/ dir)")


def has_checkpoint(run_dir: Path, which: str) -> bool:
    return rundir.holds_step(run_dir / "checkpoints" / which)


def inspect_run(path: str | Path, *, kind: str | None = None, which: str = "best") -> RunInfo:
    """Cheap checks that fail before any data is read or weights are built: a config that parses, a metrics.json of
    the expected kind (when it exists), a `which` checkpoint holding a step."""
    if which not in WHICH:
        raise RunError(f"which={which!r}: expected one of {', '.join(WHICH)}")
    run_dir = find_run_dir(path)
    cfg = read_run_config(run_dir)
    if cfg.train.seeds:
        raise RunError(f"{run_dir} holds {len(cfg.train.seeds)} seeds (train.seeds={cfg.train.seeds}), each a run of "
                       f"its own: name one, e.g. {seed_dir(run_dir, cfg.train.seeds[0])} (or pass --seed "
                       f"{cfg.train.seeds[0]})")
    record: dict = {}
    metrics_path = run_dir / rundir.METRICS_FILE
    if metrics_path.is_file():
        record = read_json_object(metrics_path, RunError)
    found = record.get("kind")
    if kind is not None and found is not None and found != kind:
        raise RunError(f"{run_dir} is a '{found}' run, not a '{kind}' run (its {rundir.METRICS_FILE} says so); "
                       f"a {kind} run is written by `lora-kd-jax {WRITERS.get(kind, kind)}`")
    if not has_checkpoint(run_dir, which):
        never = "" if record else f": it never finished an epoch (no {rundir.METRICS_FILE})"
        raise RunError(f"{run_dir} has no {which} checkpoint ({run_dir / 'checkpoints' / which} holds no step){never}")
    return RunInfo(path=run_dir, config=cfg, kind=found, summary=record.get("summary", {}),
                   epochs_done=len(record.get("epochs", [])))


def run_seeds(path: str | Path) -> list[int]:
    """The seed list of the run at `path` (its config's train.seeds; [] for a single-seed run), read cheaply."""
    return list(read_run_config(find_run_dir(path)).train.seeds)


def read_run_config(run_dir: Path) -> Config:
    """A run dir's config.yaml, validated; a RunError naming the file when it is not a valid config."""
    try:
        return from_dict(rundir.read_config(run_dir), str(run_dir / rundir.CONFIG_FILE))
    except ConfigError as e:
        raise RunError(f"{run_dir / rundir.CONFIG_FILE} is not a valid run config: {e}") from None


def seed_run_dirs(path: str | Path, seed: int | None = None) -> dict[int, Path]:
    """{seed: run dir} that `path` (and `--seed`) name: a seeded run's seed dirs (all, or the one asked for), or
    the single run itself. Asking a single run for a seed it was not trained with is an error."""
    run_dir = find_run_dir(path)
    cfg = read_run_config(run_dir)
    seeds = list(cfg.train.seeds)
    if not seeds:
        own = cfg.train.seed
        if seed is not None and seed != own:
            raise RunError(f"--seed {seed}: {run_dir} is a single run with train.seed={own}")
        return {own: run_dir}
    if seed is None:
        return {k: seed_dir(run_dir, k) for k in seeds}
    if seed not in seeds:
        raise RunError(f"--seed {seed}: {run_dir} trained seeds {seeds}; pick one of them")
    return {seed: seed_dir(run_dir, seed)}


def one_run_dir(path: str | Path, seed: int | None = None) -> tuple[Path, str]:
    """The one run a command that reads one run (predict, export-peft, merge) uses, and a note saying which: the
    run itself, seed `seed` of a seeded run, or by default the seed with the best validation accuracy (ties: the
    first seed)."""
    dirs = seed_run_dirs(path, seed)
    if len(dirs) == 1:
        (k, run_dir), = dirs.items()
        return run_dir, (f"seed {k} of {find_run_dir(path)}" if run_dir != find_run_dir(path) else "")
    scores = {}
    for k, run_dir in dirs.items():
        metrics = run_dir / rundir.METRICS_FILE
        if metrics.is_file():
            scores[k] = read_json_object(metrics, RunError).get("summary", {}).get("best_val_accuracy")
    scored = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    if not scored:
        raise RunError(f"{find_run_dir(path)}: no seed has finished an epoch (no seed_<k>/{rundir.METRICS_FILE}); "
                       "nothing to choose from")
    best = max(scored, key=lambda k: (scored[k], -k))
    return dirs[best], (f"seed {best} of {find_run_dir(path)}: the best validation accuracy ({scored[best]:.4f}) of "
                        f"seeds {sorted(dirs)}; --seed K picks another")
