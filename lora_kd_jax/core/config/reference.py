"""The configuration reference, generated from the config classes: every key with its type, default, choices and
doc (`markdown`: docs/configuration.md, `lora-kd-jax config --markdown`), and a loaded config's values beside them
(`listing`, `as_text`, `as_json`: `lora-kd-jax config CONFIG [key=value ...]`).

Why generated: a key's doc is written once, in its schema field (`schema.key`); a page written by hand drifts from
the code, and tests/test_front_door.py fails when docs/configuration.md differs from what `markdown` gives now.
"""
from __future__ import annotations

import dataclasses
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from lora_kd_jax.core.config.load import DEFAULTS, Loaded
from lora_kd_jax.core.config.parse import choices, field_types, show
from lora_kd_jax.core.config.schema import Config

REGENERATE = "lora-kd-jax config --markdown > docs/configuration.md"


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One key as the schema declares it."""

    key: str
    type: str
    default: Any
    choices: tuple[Any, ...]
    doc: str


def sections() -> dict[str, type]:
    """Section name -> its dataclass, in the order of `Config`."""
    return dict(field_types(Config))


def section_doc(cls: type) -> str:
    """A section's own docstring ("" when it has none: dataclasses make one from the signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else " ".join(doc.split())


def type_name(annotation: Any) -> str:
    """How the reference names a key's type: str, int, float, bool, `int or null`, `list of int`."""
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0]).__name__
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + " or null"
    if typing.get_origin(annotation) is list:
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    return getattr(annotation, "__name__", str(annotation))


def key_docs() -> list[KeyDoc]:
    """Every key of the config, in schema order."""
    out = []
    for name, cls in sections().items():
        hints, defaults = field_types(cls), cls()
        for f in dataclasses.fields(cls):
            out.append(KeyDoc(f"{name}.{f.name}", type_name(hints[f.name]), getattr(defaults, f.name),
                              choices(hints[f.name]) or (), " ".join(f.metadata.get("doc", "").split())))
    return out


def undocumented() -> list[str]:
    """Keys (and sections) that have no doc: each must say what it does."""
    return ([name for name, cls in sections().items() if not section_doc(cls)]
            + [k.key for k in key_docs() if not k.doc])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(value: Any) -> str:
    return f"`{_cell(show(value))}`"


def markdown() -> str:
    """docs/configuration.md: a header saying how it is made, then per section a table of its keys."""
    lines = ["# Configuration reference", "",
             f"<!-- generated from lora_kd_jax/core/config/schema.py; do not edit: regenerate with `{REGENERATE}` -->",
             "",
             "Generated from the config classes (`lora_kd_jax/core/config/schema.py`, where each key's doc lives). "
             f"Regenerate it with `{REGENERATE}`; `tests/test_front_door.py` fails when this page differs from the "
             "classes.", "",
             "A run is a YAML file of these sections (a packaged config by name, e.g. `smoke`, or a path) plus "
             "`section.key=value` overrides on the command line, which win. `lora-kd-jax config CONFIG "
             "[key=value ...]` prints every key with the value it resolves to and where that came from (`--json` "
             "too).", ""]
    docs = key_docs()
    for name, cls in sections().items():
        lines += [f"## {name}", "", section_doc(cls), "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for k in (d for d in docs if d.key.split(".")[0] == name):
            kind = f"one of {', '.join(_code(c) for c in k.choices)}" if k.choices else k.type
            lines.append(f"| `{k.key}` | {kind} | {_code(k.default)} | {_cell(k.doc)} |")
        lines.append("")
    return "\n".join(lines)


def listing(loaded: Loaded) -> list[dict[str, Any]]:
    """Every key of a loaded config: its value, default, where the value came from, type, choices and doc."""
    rows = []
    for k in key_docs():
        section, name = k.key.split(".")
        rows.append({"key": k.key, "value": getattr(getattr(loaded.config, section), name), "default": k.default,
                     "set_by": loaded.origin(k.key), "type": k.type, "choices": list(k.choices), "doc": k.doc})
    return rows


def as_json(loaded: Loaded) -> str:
    """The listing as JSON: {"source", "keys": {key: {value, default, set_by, type, choices, doc}}}."""
    keys = {r["key"]: {f: v for f, v in r.items() if f != "key"} for r in listing(loaded)}
    return json.dumps({"source": loaded.source, "keys": keys}, indent=2)


def as_text(loaded: Loaded, width: int = 100) -> str:
    """The listing for a terminal: per key `key = value  [where it came from; default ...; one of ...]` and its
    doc, indented, under a header naming the sources."""
    where = [s for s in dict.fromkeys(loaded.origins.values())] or [DEFAULTS]
    out = [f"config: {' + '.join(where)} (every other key: its default)"]
    section = ""
    for r in listing(loaded):
        if r["key"].split(".")[0] != section:
            section = r["key"].split(".")[0]
            out += ["", f"[{section}]"]
        by = r["set_by"]
        notes = ["default" if by == DEFAULTS else f"from {Path(by).name}" if by == loaded.source else f"from the {by}"]
        if by != DEFAULTS:
            notes.append(f"default {show(r['default'])}")
        if r["choices"]:
            notes.append(f"one of {', '.join(show(c) for c in r['choices'])}")
        out.append(f"{r['key']} = {show(r['value'])}  [{'; '.join(notes)}]")
        out += textwrap.wrap(r["doc"], width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(out)
