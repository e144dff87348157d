"""Configs from YAML files and `section.key=value` overrides: types checked against the schema (choices are its
`Literal`s), unknown keys named with the closest known one, then `validate`. Also the way back (`save_config`)."""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from lora_kd_jax.core.config.schema import Config
from lora_kd_jax.core.config.suggest import did_you_mean, suggestions
from lora_kd_jax.core.config.validate import ConfigError, validate


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a `Literal` field allows (None for any other type)."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation; ints are accepted for floats. Raise ConfigError naming key."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        options = typing.get_args(annotation)
        if value is None and "" in options:
            value = ""
        if value not in options:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(o) if o == '' else str(o) for o in options)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [a for a in options if a is not type(None)]
        return coerce(key, value, inner)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if isinstance(value, str):  # `lora.targets=attn.c_attn,mlp.c_fc` or `data.buckets=8,16` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
            if inner is int:
                value = [int(v) if v.lstrip("-").isdigit() else v for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and inner is int and value == int(value):
            value = [int(value)]  # `data.buckets=16`: a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {annotation} for {key}")  # a bug in the schema, not user input


def all_keys() -> list[str]:
    """Every dotted key the config accepts (for messages and docs)."""
    return [f"{name}.{f.name}" for name, cls in field_types(Config).items() for f in dataclasses.fields(cls)]


def unknown(key: str, known: Sequence[str]) -> ConfigError:
    """The error for an unknown key: the key it most likely meant (`suggest`), else the keys of its section (or
    the sections)."""
    close = suggestions(key, known)
    if close:
        return ConfigError(f"unknown config key '{key}'; {did_you_mean(close)}")
    section = key.split(".")[0]
    same = [k for k in known if "." in k and k.split(".")[0] == section] if "." in key else []
    listed = same or sorted(k for k in known if "." not in k) or sorted(known)
    what = f"the {section} keys are" if same else "the sections are" if "." not in key else "known keys"
    return ConfigError(f"unknown config key '{key}'; {what}: {', '.join(listed)}")


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config from a nested dict (YAML content)."""
    cfg = build(raw, source)
    validate(cfg)
    return cfg


def build(raw: dict[str, Any] | None, source: str = "config") -> Config:
    """A Config from a nested dict, every key known and every value of its type; not yet `validate`d (the checks
    that relate keys need the whole config, which may come from more than one source)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = field_types(Config)
    known = all_keys()
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise unknown(str(name), [*sections, *known])
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {value!r}")
        cls = sections[name]
        types_ = field_types(cls)
        kwargs = {}
        for k, v in value.items():
            if k not in types_:
                raise unknown(f"{name}.{k}", known)
            kwargs[k] = coerce(f"{name}.{k}", v, types_[k])
        built[name] = cls(**kwargs)
    return Config(**built)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) onto a nested dict."""
    out = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value")
        k, text = item.split("=", 1)
        parts = k.strip().split(".")
        if len(parts) != 2 or not all(parts):
            close = suggestions(k.strip(), all_keys())
            hint = did_you_mean(close, text) if close else "e.g. train.lr=1e-3"
            raise ConfigError(f"override '{item}': key must look like section.key; {hint}")
        value = _yaml_number(yaml.safe_load(text)) if text.strip() else ""
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def _yaml_number(value: Any) -> Any:
    """PyYAML follows YAML 1.1, where `1e-3` is a string; accept it as the number anyone means."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in "e.") and value.strip() else value
        except ValueError:
            return value
    return value


def numbers_in(raw: Any) -> Any:
    """Every YAML 1.1 string that is a number anyone would write (`1e-3`) in a nested structure, as that number."""
    if isinstance(raw, dict):
        return {k: numbers_in(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [numbers_in(v) for v in raw]
    return _yaml_number(raw)


def show(value: Any) -> str:
    """A value as an override writes it (`train.lr=0.001`, `data.report=[a.tsv, b.tsv]`, `data.dir=""`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
