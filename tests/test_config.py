"""Config parsing and validation: every bad key or value fails before compute, naming the key."""
from pathlib import Path

import pytest

from lora_kd_jax.core.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.batch_size > 0


def test_reference_hyperparameters():
    cfg = load_config(CONFIGS / "lora_gpt2.yaml")
    assert (cfg.model.name, cfg.lora.rank, cfg.train.batch_size, cfg.train.lr, cfg.train.epochs) == (
        "gpt2", 4, 128, 1e-3, 10)
    assert cfg.data.max_length == 20 and cfg.model.dropout == 0.0 and cfg.lora.init == "seed"
    med = load_config(CONFIGS / "lora_gpt2_medium.yaml")
    assert (med.model.name, med.train.epochs) == ("gpt2-medium", 7)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "train.epochs=3", "lora.targets=attn.c_attn,mlp.c_fc",
                             "data.dir=../x", "run.overwrite=true", "lora.alpha=8"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3
    assert cfg.lora.targets == ["attn.c_attn", "mlp.c_fc"]
    assert cfg.data.dir == "../x" and cfg.run.overwrite is True
    assert cfg.lora.alpha == 8.0 and isinstance(cfg.lora.alpha, float)


def test_yaml_scientific_notation_without_dot(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n")  # YAML 1.1 reads this as a string; we accept the number
    assert load_config(p).train.lr == 1e-3


@pytest.mark.parametrize("override, fragment", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("lora.rnk=2", "did you mean 'lora.rank'"),
    ("modle.name=gpt2", "unknown config key 'modle'"),
    ("train.epochs=three", "train.epochs: expected an integer"),
    ("train.epochs=1.5", "train.epochs: expected an integer"),
    ("train.lr=abc", "train.lr: expected a number"),
    ("run.overwrite=maybe", "run.overwrite: expected true or false"),
    ("lora.rank=0", "lora.rank: must be > 0"),
    ("train.lr=-1e-3", "train.lr: must be > 0"),
    ("train.batch_size=0", "train.batch_size: must be > 0"),
    ("distill.temperature=0", "distill.temperature: must be > 0"),
    ("lora.dropout=1.0", "lora.dropout: must be in [0, 1)"),
    ("lora.init=kaiming", "lora.init: 'kaiming' is not one of seed, standard"),
    ("data.limit=-1", "data.limit: must be >= 0"),
    ("trainlr", "expected section.key=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_an_unknown_model_name_is_refused_naming_the_sizes():
    """model.name is checked against the family table when the model is resolved (the first step of every command,
    before any compute): a word that is no released size is a config error listing them."""
    from lora_kd_jax.models.resolve import resolve

    with pytest.raises(ConfigError, match="model.name: 'gpt3' is not one of gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                                          "distilgpt2, custom"):
        resolve(load_config(None, ["model.name=gpt3"]))
    with pytest.raises(ConfigError, match="model.name: 'a b' is neither a released size"):
        load_config(None, ["model.name=a b"])


def test_contradictions():
    with pytest.raises(ConfigError, match="model.name=custom needs"):
        load_config(None, ["model.name=custom", "model.init=random"])
    with pytest.raises(ConfigError, match="no pretrained weights"):
        load_config(None, ["model.n_layer=2"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["model.name=custom", "model.init=random", "model.n_layer=2", "model.n_embd=64",
                           "model.n_head=5"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(typo)
    assert str(typo) in str(e.value) and "train.batch_size" in str(e.value)


def test_length_grouping_needs_buckets():
    with pytest.raises(ConfigError, match="data.group_window=16 without data.buckets"):
        load_config(None, ["data.group_window=16"])
    assert load_config(None, ["data.group_window=16", "data.buckets=8,12,16"]).data.group_window == 16


def test_list_overrides_from_the_command_line():
    assert load_config(None, ["data.buckets=8,12,16"]).data.buckets == [8, 12, 16]
    assert load_config(None, ["data.buckets=16"]).data.buckets == [16]
    assert load_config(None, ["data.buckets="]).data.buckets == []
    with pytest.raises(ConfigError, match=r"data.buckets\[1\]: expected an integer, got 'x'"):
        load_config(None, ["data.buckets=8,x"])
