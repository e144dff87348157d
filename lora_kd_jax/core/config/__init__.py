"""Typed, validated run configuration: YAML files plus `section.key=value` overrides (`parse`), the schema with each
key's type, choices and doc (`schema`), and the checks before any compute (`validate`)."""
from lora_kd_jax.core.config.parse import all_keys, apply_overrides, from_dict, load_config, save_config, to_dict
from lora_kd_jax.core.config.schema import (DEFAULT_LORA_TARGETS, Config, DataConfig, DistillConfig,
                                            DistributedConfig, LoraConfig, MeshConfig, ModelConfig, ModelType,
                                            RunConfig, StudentConfig, TrainConfig)
from lora_kd_jax.core.config.validate import (REGRESSION_METRICS, ConfigError, is_hub_id, n_outputs, select_metric,
                                              validate)

__all__ = ["DEFAULT_LORA_TARGETS", "REGRESSION_METRICS", "Config", "ConfigError", "DataConfig", "DistillConfig",
           "DistributedConfig", "LoraConfig", "MeshConfig", "ModelConfig", "ModelType", "RunConfig", "StudentConfig",
           "TrainConfig", "all_keys", "apply_overrides", "from_dict", "is_hub_id", "load_config", "n_outputs",
           "save_config", "select_metric", "to_dict", "validate"]
