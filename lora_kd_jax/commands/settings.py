"""A command's config as the user names it: a YAML path or a packaged config by name (`smoke`), loaded with where
each setting came from; `lora-kd-jax config` (every key, its default, its resolved value and doc); the version.

Why the packaged names live here and not in the config parser: they are files the package ships (`assets`), and
the parser (core) sits below the assets on the floors; only the command line offers the names.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from lora_kd_jax.assets import CONFIGS_DIR
from lora_kd_jax.core.config import ConfigError, Loaded, load
from lora_kd_jax.core.errors import UserError

PACKAGE = "lora_kd_jax"


def packaged_configs() -> list[str]:
    """The names of the configs the package ships (`smoke`, `lora_gpt2`, ...)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def config_file(name: str | os.PathLike) -> Path:
    """The YAML file CONFIG names: the path itself when it exists, else the packaged config of that name (`smoke`
    or `smoke.yaml`, no directory part); a name that is neither is a ConfigError listing the packaged names."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    text = os.fspath(name)
    if "/" not in text and os.sep not in text:
        packaged = CONFIGS_DIR / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
        if packaged.is_file():
            return packaged
    raise ConfigError(f"config file not found: {path} (from {Path.cwd()}); give a YAML file's path, or a packaged "
                      f"config by name: {', '.join(packaged_configs())}")


def load_named(name: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Loaded:
    """A command's config: CONFIG (a path or a packaged name; None = the defaults) plus its overrides."""
    return load(None if name is None else config_file(name), overrides)


def version() -> str:
    """The installed package's version (importlib.metadata), or say it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown (not installed; pip install -e . gives it one)"


class ConfigUsageError(UserError):
    """`lora-kd-jax config` asked for two things at once."""
    label = "usage error"


def cmd_config(args: argparse.Namespace) -> None:
    """`lora-kd-jax config [CONFIG] [key=value ...] [--json | --markdown]`."""
    from lora_kd_jax.core.config import reference

    overrides = list(args.overrides)
    name = args.config
    if name is not None and "=" in name:  # no CONFIG: the first word is an override
        name, overrides = None, [name, *overrides]
    if args.markdown:
        if name is not None or overrides or args.json:
            raise ConfigUsageError("--markdown prints the reference of every key and its default (docs/"
                                   "configuration.md); drop CONFIG, the overrides and --json")
        print(reference.markdown(), end="")
        return
    loaded = load_named(name, overrides)
    print(reference.as_json(loaded) if args.json else reference.as_text(loaded))
