"""Typed, validated run configuration: YAML files plus `section.key=value` overrides (`parse`, `load`: where each
setting came from), the schema with each key's type, choices and doc (`schema`, rendered by `reference`), and the
checks before any compute (`validate`)."""
from lora_kd_jax.core.config.load import COMMAND_LINE, Loaded, load, load_config
from lora_kd_jax.core.config.parse import all_keys, apply_overrides, from_dict, save_config, show, to_dict
from lora_kd_jax.core.config.schema import (DEFAULT_LORA_TARGETS, Config, DataConfig, DistillConfig,
                                            DistributedConfig, LoraConfig, MeshConfig, ModelConfig, ModelType,
                                            RunConfig, StudentConfig, TrainConfig)
from lora_kd_jax.core.config.validate import (REGRESSION_METRICS, ConfigError, is_hub_id, n_outputs, select_metric,
                                              validate)

__all__ = ["COMMAND_LINE", "DEFAULT_LORA_TARGETS", "REGRESSION_METRICS", "Config", "ConfigError", "DataConfig",
           "DistillConfig", "DistributedConfig", "Loaded", "LoraConfig", "MeshConfig", "ModelConfig", "ModelType",
           "RunConfig", "StudentConfig", "TrainConfig", "all_keys", "apply_overrides", "from_dict", "is_hub_id", "load",
           "load_config", "n_outputs", "save_config", "select_metric", "show", "to_dict", "validate"]
