"""Run at start-up by the processes the tests start as the core install runs (tests/tiny.py `core_install_env`):
PyTorch, which only the test extra installs, cannot be imported there, as on a machine without it. transformers asks
importlib whether it is installed, which answers no for a module set to None in sys.modules; any import of torch
raises ImportError, so a command that needed PyTorch would fail its test. A test may name more modules its command
must never import in LORA_KD_JAX_TEST_UNIMPORTABLE (comma-separated): matplotlib, for a command that draws nothing."""
import os
import sys

for _name in ["torch", *filter(None, os.environ.get("LORA_KD_JAX_TEST_UNIMPORTABLE", "").split(","))]:
    sys.modules.setdefault(_name, None)
