"""The layering docs/architecture.md draws, checked on the code's own imports (function-level ones included): each
wing imports only wings on lower floors, so there are no import circles between wings and nothing runs back up.
Reads source text only (no jax), so it costs well under a second."""
from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_kd_jax"

# floor of each wing (a subpackage, or a top-level module of the package); a wing may import its own floor's
# wings only where ALLOWED_SIDEWAYS says so, and any lower floor's
FLOORS = {
    "core": 1, "assets": 1,
    "data": 2, "runs": 2, "lora": 2,
    "models": 3,
    "training": 4,
    "distill": 5, "interop": 5,
    "commands": 6,
    "__main__": 7, "__init__": 7,  # the package's front: the public API names (imported on first use)
}
ALLOWED_SIDEWAYS: set[tuple[str, str]] = set()
MAX_LINES = 400  # a module longer than this has more than one job


def wing_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) == 2:
        return "lora_kd_jax.__init__"
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of this package in the file, at any depth; `lora_kd_jax.X` strings in the
    public API table count as imports too."""
    out = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_kd_jax"):
            names = [f"lora_kd_jax.{a.name}" for a in node.names] if node.module == "lora_kd_jax" else [node.module]
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("lora_kd_jax.")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.startswith("lora_kd_jax.") and " " not in node.value:
            out.append((node.lineno, node.value))
    return out


def test_every_import_runs_down_the_floors():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = wing_of(module_name(path))
        assert source in FLOORS, f"{path}: wing {source!r} has no floor in FLOORS (and on docs/architecture.md)"
        for line, target in imported_modules(path):
            to = wing_of(target)
            if to == source or (source, to) in ALLOWED_SIDEWAYS:
                continue
            assert to in FLOORS, f"{path}:{line}: imports {target}, a wing with no floor"
            if FLOORS[to] >= FLOORS[source]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} (floor {FLOORS[source]}) "
                             f"imports {target} (floor {FLOORS[to]})")
    assert not wrong, "imports that do not run down the floors:\n" + "\n".join(wrong)


def test_the_checker_sees_an_import_that_runs_back_up(tmp_path):
    """The check above reads function-level imports too: one hidden in a function is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from lora_kd_jax.training import loop\n    return loop\n")
    assert imported_modules(bad) == [(2, "lora_kd_jax.training")]


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_config_choices_are_the_family_table():
    """model.type's Literal choices and the family table are the same list, in the same order."""
    from lora_kd_jax.core.config.schema import ModelType
    from lora_kd_jax.models.families import FAMILIES

    assert typing.get_args(ModelType) == tuple(FAMILIES)


@pytest.mark.parametrize("needle", ['"gpt2"'])
def test_gpt2_is_named_only_in_the_family_table_and_defaults(needle):
    allowed = {"lora_kd_jax/models/families.py", "lora_kd_jax/core/config/schema.py",
               "lora_kd_jax/commands/bench_setup.py"}  # the table; the defaults; the bench's released sizes
    found = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if needle in p.read_text()}
    assert found <= allowed, found - allowed
