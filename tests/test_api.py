"""The public API (`lora_kd_jax.__all__`) and the README's Python example, run as a user would run it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import lora_kd_jax
from tiny import core_install_env, run_python, user_env

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its <!-- api-example --> block"
    return match.group(1)


def test_every_public_name_resolves_and_importing_the_package_loads_no_jax():
    code = ("import sys, lora_kd_jax; assert 'jax' not in sys.modules, 'jax imported'; "
            "[getattr(lora_kd_jax, n) for n in lora_kd_jax.__all__]; print(len(lora_kd_jax.__all__))")
    done = run_python(code, env=core_install_env())
    assert int(done.stdout) == len(lora_kd_jax.__all__) >= 10
    assert {"load_config", "train_lora", "distill_student", "train_rnn", "Predictor", "export_peft", "merge"} <= set(
        lora_kd_jax.__all__)


def test_public_names_do_not_depend_on_what_was_imported_before():
    """A public name that is also a subpackage (lora_kd_jax.distill) would be replaced by the module once any of its
    modules is imported: every public name resolves to the same object whatever was imported first. Every module
    imports on the core install (PyTorch unimportable: tests/tiny.py core_install_env)."""
    code = ("import importlib, pkgutil, lora_kd_jax as lkj\n"
            "for m in pkgutil.walk_packages(lkj.__path__, 'lora_kd_jax.'):\n"
            "    m.name.endswith('__main__') or importlib.import_module(m.name)\n"
            "import types\n"
            "bad = [n for n in lkj.__all__ if isinstance(getattr(lkj, n), types.ModuleType)]\n"
            "assert not bad, bad\n"
            "assert callable(lkj.distill_student) and lkj.distill_student.__module__ == 'lora_kd_jax.distill.trainer'")
    run_python(code, env=core_install_env())


def test_an_unknown_name_lists_the_public_api():
    try:
        lora_kd_jax.train_and_evaluate  # noqa: B018
    except AttributeError as e:
        assert "the public API is" in str(e) and "train_lora" in str(e)
    else:
        raise AssertionError("no AttributeError")


def test_the_readme_python_example_runs(tmp_path):
    """The example verbatim, from a directory holding only the study's configs (as a clone has them)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    done = run_python(readme_example(), timeout=600, cwd=work, env=user_env(tmp_path / "home"))
    assert (work / "runs" / "smoke" / "metrics.json").is_file()
    assert (work / "exports" / "smoke_adapter" / "adapter_config.json").is_file()
    assert "acceptable" in done.stdout  # the printed prediction carries a label name


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))])
def test_every_test_the_readme_and_docs_name_exists(page):
    """A guarantee in the README or a docs page names the test that proves it: each `tests/test_x.py::test_y` (and
    each bare `::test_y` beside one) must be a test function that exists, whole (not cut at a line end)."""
    text = (REPO / page).read_text()
    sources = {p.name: p.read_text() for p in (REPO / "tests").glob("test_*.py")}
    named = re.findall(r"tests/(test_\w+\.py)::(test_\w+)", text)
    missing = [f"{f}::{n}" for f, n in named if not re.search(rf"def {n}\b", sources.get(f, ""))]
    bare = set(re.findall(r"(?<![\w./])::(test_\w+)", text))
    missing += [f"::{n}" for n in sorted(bare) if not any(re.search(rf"def {n}\b", src) for src in sources.values())]
    assert not missing, f"{page} names tests that do not exist: {missing}"
    if page == "README.md":
        assert len(named) >= 10
