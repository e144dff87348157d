"""The run directory: resolved config, log file, metrics.json; refuses to mix two different runs."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from lora_kd_jax.core.config import Config, ConfigError, from_dict, save_config, to_dict
from lora_kd_jax.core.errors import UserError
from lora_kd_jax.core.logs import LOG_FORMAT
from lora_kd_jax.core.precision import resolved_config
from lora_kd_jax.runs import seed_dirs

HUB = "hub"  # data.dir's word for the hub copy (data.cola.HUB; data sits beside runs, so it is not imported)

CONFIG_FILE, METRICS_FILE, LOG_FILE = "config.yaml", "metrics.json", "log.txt"
LOCK_FILE = ".lock"
# what a run writes besides config (TensorBoard's event files in tensorboard/, a --profile trace in profile/)
RUN_OUTPUTS = ("checkpoints", METRICS_FILE, LOG_FILE, "accuracy.png", "loss.png", "optimizer.png", "tensorboard",
               "profile")


class RunDirError(UserError, RuntimeError):
    """The run dir holds another run and overwriting was not asked for."""
    label = "run dir error"


def prepare(cfg: Config, *, resume: bool = False) -> Path:
    """Create run.dir, check it does not hold a different run, write config.yaml, attach the log file.

    config.yaml holds the resolved config: "auto" dtypes as this backend resolves them (precision.py), so a run
    started in bf16 on a GPU is refused, naming model.dtype, rather than continued in fp32 on a CPU; and its local
    paths absolute (`absolute_paths`), so evaluate, predict and distillation read the run from any directory. A config.yaml
    written before a key existed reads with that key's default. In a multi-process run only process 0 writes; the
    others just check."""
    import jax

    run_dir = Path(cfg.run.dir)
    if jax.process_index() != 0:
        return run_dir
    make_dir(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    resolved = recorded(cfg)
    if cfg_path.exists() and not cfg.run.overwrite:
        old = stored_config(run_dir)
        differs = _comparable(old) != _comparable(resolved)
        if differs:
            keys = sorted(_diff_keys(_comparable(old), _comparable(resolved)))
            raise RunDirError(f"{run_dir} holds a different run (config differs in {', '.join(keys)}); "
                              "choose another run.dir or pass run.overwrite=true")
        if not resume and (run_dir / METRICS_FILE).exists():
            raise RunDirError(f"{run_dir} already holds this run's results; pass --resume to continue it or "
                              "run.overwrite=true to start again")
    if cfg.run.overwrite and not resume:  # a fresh start: nothing of the previous run may mix with this one
        _remove_outputs(run_dir)
    save_config(recorded_config(cfg), cfg_path)
    _prepare_seed_dirs(cfg, run_dir)
    attach_log(run_dir)
    return run_dir


def _prepare_seed_dirs(cfg: Config, run_dir: Path) -> None:
    """A seeded run's seed_<k>/config.yaml: each seed dir reads as a single run with train.seed=k."""
    for seed in cfg.train.seeds:
        seed_cfg = seed_dirs.seed_config(cfg, seed)
        make_dir(Path(seed_cfg.run.dir))
        save_config(recorded_config(seed_cfg), Path(seed_cfg.run.dir) / CONFIG_FILE)


def make_dir(run_dir: Path) -> None:
    """Create the run dir, saying plainly when the path cannot be one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir={run_dir} is a file; choose a directory path")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"run.dir={run_dir} cannot be created: {e.strerror or e}") from None


def _remove_outputs(run_dir: Path) -> None:
    import shutil

    for seed_dir in seed_dirs.seed_dirs(run_dir):
        shutil.rmtree(seed_dir)
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@contextlib.contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run dir for the life of a run. The OS drops it when the process ends however
    it ends (flock), so a lock left by a killed run is simply taken over; a live holder is named by its pid."""
    import fcntl

    make_dir(run_dir)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirError(f"{run_dir} is in use by another run (pid {holder}); wait for it to finish or choose "
                              "another run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def claim(cfg: Config, *, resume: bool = False) -> Iterator[Path]:
    """Lock the run dir and `prepare` it for the body; if the body fails before the run saved a checkpoint or
    metrics.json, take back what this call wrote (config.yaml, the log), so the corrected command is not refused as
    "a different run" by a start that never trained."""
    import jax

    run_dir = Path(cfg.run.dir)
    existed = run_dir.exists()
    had_config = (run_dir / CONFIG_FILE).exists()
    with lock(run_dir) if jax.process_index() == 0 else contextlib.nullcontext():
        run_dir = prepare(cfg, resume=resume)
        try:
            yield run_dir
        except BaseException:
            if not had_config and not _has_results(run_dir):
                _undo_start(run_dir, remove_dir=not existed)
            raise
        finally:
            detach_log(run_dir)


def _has_results(run_dir: Path) -> bool:
    checkpoints = run_dir / "checkpoints"
    saved = checkpoints.is_dir() and any(holds_step(p) for p in checkpoints.iterdir())
    return saved or (run_dir / METRICS_FILE).exists()


def _undo_start(run_dir: Path, *, remove_dir: bool) -> None:
    import shutil

    detach_log(run_dir)
    for seed_dir in seed_dirs.seed_dirs(run_dir):  # written by this start (it had no config): nothing trained in them
        shutil.rmtree(seed_dir)
    for name in (CONFIG_FILE, LOG_FILE):
        (run_dir / name).unlink(missing_ok=True)
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():  # empty managers' dirs only: _has_results saw no step in them
        for sub in sorted(checkpoints.rglob("*"), reverse=True):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
        if not any(checkpoints.iterdir()):
            checkpoints.rmdir()
    if remove_dir and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)  # ours: the lock is held until the caller returns
        run_dir.rmdir()


def recorded(cfg: Config) -> dict[str, Any]:
    """What config.yaml records for `cfg` (`recorded_config`), as a dict."""
    return to_dict(recorded_config(cfg))


def recorded_config(cfg: Config) -> Config:
    """What config.yaml records for `cfg`: every setting, "auto" dtypes resolved on this backend, and local paths
    absolute (`absolute_paths`)."""
    return absolute_paths(resolved_config(cfg))


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with its local paths absolute (model.path, the data files and dirs, a local tokenizer dir, the teacher
    run, the transfer set's files), so evaluate, predict and a distillation read the run from any directory.
    The packaged data (""), `data.dir=hub` and a tokenizer's hub name stay as they are."""
    absolute = lambda p: os.path.abspath(os.path.expanduser(p)) if p else p  # noqa: E731
    d, t = cfg.data, cfg.data.tokenizer
    local_tokenizer = bool(t) and (Path(t).expanduser().exists() or t.startswith((".", "/", "~")))
    data = dataclasses.replace(d, dir=d.dir if d.dir == HUB else absolute(d.dir), train=absolute(d.train),
                               validation=absolute(d.validation), report=[absolute(r) for r in d.report],
                               tokenizer=absolute(t) if local_tokenizer else t)
    distill = dataclasses.replace(cfg.distill, teacher=absolute(cfg.distill.teacher),
                                  unlabeled=absolute(cfg.distill.unlabeled),
                                  logits_cache=absolute(cfg.distill.logits_cache))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=absolute(cfg.model.path)), data=data,
                               distill=distill)


def stored_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run dir's config.yaml as `recorded` would write it now: keys added since it was written read as their
    defaults. A file this version cannot read comes back raw (comparisons then name the keys that differ)."""
    path = Path(run_dir) / CONFIG_FILE
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return recorded(from_dict(raw, str(path)))
    except ConfigError:
        return raw


def _comparable(d: dict) -> dict:
    """Settings that change results. run.* (where and how to write), mesh.* and distributed.* (where it runs)
    and train.epochs (a resume may extend a run) may differ between a run and its continuation; train.epochs not
    when the learning rate follows a schedule or a fractional warm-up (both span all the run's steps)."""
    out = {k: v for k, v in d.items() if k not in ("run", "mesh", "distributed")}
    train = out.get("train")
    if isinstance(train, dict) and not _schedule_spans_the_run(train):
        out["train"] = {k: v for k, v in train.items() if k != "epochs"}
    return out


def _schedule_spans_the_run(train: dict) -> bool:
    """A decaying schedule or a fractional warm-up is laid out over all the run's steps: more epochs would change
    the learning rate of steps already taken."""
    return train.get("schedule", "constant") != "constant" or 0 < train.get("warmup", 0) < 1


def _diff_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys |= _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.add(f"{prefix}{k}")
    return keys


def attach_log(run_dir: Path) -> None:
    root = logging.getLogger()
    path = str((run_dir / LOG_FILE).absolute())
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in root.handlers):
        handler = _RunLog(path)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


class _RunLog(logging.FileHandler):
    """log.txt of a run. When the file system refuses a write (full, read-only) the failure that stops the run is
    reported once, as one line; the log records that cannot be written then are on the console only, not followed
    by a traceback each."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # flushing the last records onto a full disk
            super().close()


def detach_log(run_dir: Path) -> None:
    root = logging.getLogger()
    path = str((run_dir / LOG_FILE).absolute())
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename == path]:
        root.removeHandler(h)
        h.close()


def write_json(path: str | os.PathLike, record: Any) -> Path:
    """Write `record` as JSON whole or not at all (a temporary file renamed over `path`); a failed write names the
    file and leaves no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # a full disk fails the write without naming the file: name it
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    return path


def write_metrics(run_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Atomically replace metrics.json."""
    return write_json(Path(run_dir) / METRICS_FILE, record)


def holds_step(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint directory (checkpoints/best or checkpoints/latest) holds a saved step."""
    directory = Path(directory)
    return directory.is_dir() and any(c.name.isdigit() for c in directory.iterdir())


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no {CONFIG_FILE})")
    return yaml.safe_load(path.read_text())
