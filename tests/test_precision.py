"""dtype "auto": the per-backend choice (precision.py) and that every model builder follows it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from tiny import key, tiny_config

from lora_kd_jax.core import precision
from lora_kd_jax.core.config import ConfigError
from lora_kd_jax.models.build import build_classifier
from lora_kd_jax.models.students.build import make_student
from lora_kd_jax.training.state import cast_frozen, partition


@pytest.mark.parametrize("backend, compute, base, student", [
    ("cpu", "float32", "float32", "float32"),  # bf16 measured slower on XLA:CPU; fp32 is what parity checks
    ("gpu", "bfloat16", "bfloat16", "float32"),  # bf16 GPT-2; the bf16 RNN scan was 8x slower on an H200
    ("cuda", "bfloat16", "bfloat16", "float32"),
    ("tpu", "bfloat16", "bfloat16", "float32"),
    ("some-new-chip", "float32", "float32", "float32"),  # unmeasured: the exact choice, with a warning
])
def test_auto_per_backend(backend, compute, base, student):
    cfg = tiny_config()
    got = [precision.compute_dtype(cfg.model, backend), precision.base_dtype(cfg.model, backend),
           precision.student_dtype(cfg.student, backend)]
    assert got == [compute, base, student]
    resolved = precision.resolved_config(cfg, backend)
    assert (resolved.model.dtype, resolved.model.base_dtype, resolved.student.dtype) == (compute, base, student)


def test_auto_base_follows_an_explicit_compute_dtype():
    """On a GPU, model.dtype=float32 alone gives an fp32 model (parity checks); the base can still be set apart."""
    assert precision.base_dtype(tiny_config("model.dtype=float32").model, "gpu") == "float32"
    assert precision.base_dtype(tiny_config("model.dtype=bfloat16").model, "cpu") == "bfloat16"
    assert precision.base_dtype(tiny_config("model.dtype=float32", "model.base_dtype=bfloat16").model,
                                "cpu") == "bfloat16"


def test_explicit_dtype_wins_and_bad_names_are_refused():
    assert precision.resolve("float32", "compute", "gpu") == "float32"
    assert precision.resolve("bfloat16", "student", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="student.dtype='fp16'"):
        precision.resolve("fp16", "student")
    with pytest.raises(ConfigError, match="model.dtype"):
        tiny_config("model.dtype=half")
    with pytest.raises(ValueError, match="precision.base_dtype"):
        cast_frozen({}, "auto")  # a config's auto must be resolved against the compute dtype first


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="what auto means on a CPU")
def test_defaults_are_auto_and_mean_float32_on_this_cpu():
    cfg = tiny_config()
    assert (cfg.model.dtype, cfg.model.base_dtype, cfg.student.dtype) == ("auto", "auto", "auto")
    model, params = build_classifier(cfg, key())
    assert model.module.dtype == jnp.float32
    _, frozen = partition(params, model.param_labels(params))
    assert cast_frozen(frozen, precision.base_dtype(cfg.model)) is frozen  # float32 storage: not even copied
    assert make_student(cfg).dtype == jnp.float32


def test_auto_on_an_accelerator_builds_bf16_teacher_and_fp32_student(monkeypatch):
    """The builders read the backend through precision.resolve: pretend to be a GPU and look at what they build."""
    cfg = tiny_config()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    model, params = build_classifier(cfg, key(), shapes_only=True)
    assert model.module.dtype == jnp.bfloat16
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    trainable, frozen = partition(zeros, model.param_labels(zeros))
    stored = cast_frozen(frozen, precision.base_dtype(cfg.model))
    assert {x.dtype for x in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}  # adapters, LN, head: fp32
    assert make_student(cfg).dtype == jnp.float32
