"""A config from a YAML file plus command-line overrides, with where each setting came from (`load`).

Why apart from `parse`: a first user needs to know whether to fix the file or the command line, so each error is
blamed on the source of the keys it names (`command line: unknown config key 'train.learning_rate'; did you mean
'train.lr'?`). And a packaged config carries settings meant for its own run that must not silently bend another:
a student key the chosen student does not read is dropped when the file set it (an error when the command line
did), and the file's data.limit on data named on the command line is announced. Each adjustment is one log line.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml

from lora_kd_jax.core.config.parse import all_keys, apply_overrides, build, numbers_in, show
from lora_kd_jax.core.config.schema import STUDENT_KEYS, Config, StudentConfig
from lora_kd_jax.core.config.validate import ConfigError, validate

log = logging.getLogger(__name__)
COMMAND_LINE = "command line"
DEFAULTS = "defaults"
USER_DATA = ("data.train", "data.dir")  # keys that name the user's own data
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A validated config and where its settings came from."""

    config: Config
    origins: dict[str, str]  # dotted key -> the YAML file's path or COMMAND_LINE, for every key set (not defaults)
    source: str  # the YAML file's path, or DEFAULTS

    def origin(self, key: str) -> str:
        return self.origins.get(key, DEFAULTS)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply overrides, validate. `path=None` starts from the defaults."""
    return load(path, overrides).config


def load(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Loaded:
    """`load_config`, keeping each set key's origin; every error is blamed on the file or the command line."""
    source = DEFAULTS if path is None else str(path)
    file = {} if path is None else read_file(Path(path))
    if path is not None:
        _blamed(source, lambda: build(file, source))
    given = _blamed(COMMAND_LINE, lambda: apply_overrides({}, overrides))
    _blamed(COMMAND_LINE, lambda: build(given, COMMAND_LINE))
    origins = {**_set_keys(file, source), **_set_keys(given, COMMAND_LINE)}
    merged = _drop_unread_student_keys(apply_overrides(file, overrides), origins)
    _note_data_limit(merged, origins)
    cfg = build(merged, source)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{_blame(str(e), origins, source)}: {e}") from None
    return Loaded(cfg, origins, source)


def read_file(p: Path) -> dict[str, Any]:
    """A config file's sections as a nested dict (YAML 1.1 number strings read as numbers); errors name the file."""
    if p.is_dir():
        raise ConfigError(f"{p} is a directory; expected a YAML config file (e.g. configs/smoke.yaml)")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot be read: {e}") from None
    if raw is None:
        raise ConfigError(f"{p} is empty: a run from it would silently use every default; put at least one "
                          "setting in it (see configs/*.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (model:, data:, train:, ...), got a YAML "
                          f"{type(raw).__name__}")
    return numbers_in(raw)


def _blamed(where: str, make: Callable[[], T]) -> T:
    try:
        return make()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _set_keys(raw: dict[str, Any], where: str) -> dict[str, str]:
    return {f"{s}.{k}": where for s, values in raw.items() if isinstance(values, dict) for k in values}


def _blame(message: str, origins: dict[str, str], source: str) -> str:
    """Who set the keys an error names: the command line, the file, or both ('FILE + command line')."""
    known = set(all_keys())
    named = {k for k in re.findall(r"\b[a-z_]+\.[a-z_0-9]+\b", message) if k in known}
    by = {origins[k] for k in named if k in origins}
    if by == {COMMAND_LINE}:
        return COMMAND_LINE
    if COMMAND_LINE in by:
        return f"{source} + {COMMAND_LINE}"
    if by or source != DEFAULTS:
        return source
    return COMMAND_LINE if COMMAND_LINE in origins.values() else DEFAULTS


def _drop_unread_student_keys(merged: dict[str, Any], origins: dict[str, str]) -> dict[str, Any]:
    """A student key that only another student.arch reads (`STUDENT_KEYS`), set by the file (a packaged config
    written for the study's RNN), is dropped for the student the command line chose, with one log line; set on
    the command line, it stays for `validate` to refuse."""
    student = dict(merged.get("student") or {})
    defaults = StudentConfig()
    arch = student.get("arch", defaults.arch)
    for reader, keys in STUDENT_KEYS.items():
        for key in keys:
            where = origins.get(f"student.{key}", COMMAND_LINE)
            if reader == arch or key not in student or where == COMMAND_LINE or student[key] == getattr(defaults, key):
                continue
            log.warning("%s sets student.%s=%s, which only the %s student reads: dropped for student.arch=%s",
                        where, key, show(student.pop(key)), reader, arch)
    return {**merged, "student": student} if "student" in merged else merged


def _note_data_limit(merged: dict[str, Any], origins: dict[str, str]) -> None:
    """A file's data.limit (the smoke config's 256) cuts data the command line named: said in one line, with the
    way to lift it, rather than silently capping the user's own data."""
    data = merged.get("data") or {}
    limit, where = data.get("limit", 0), origins.get("data.limit", COMMAND_LINE)
    named = [f"{k}={data[k.split('.')[1]]}" for k in USER_DATA
             if origins.get(k) == COMMAND_LINE and data.get(k.split(".")[1])]
    if limit and where != COMMAND_LINE and named:
        log.warning("data.limit=%s (set by %s) keeps only the first %s rows of each file of %s; pass data.limit=0 to "
                    "use every row", limit, where, limit, ", ".join(named))
