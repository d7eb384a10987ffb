"""Typed configuration: the JSON-Schema is the truth, dataclasses are the types."""

from qtlib.config.loader import (
    ConfigError,
    canonical_json,
    config_from_dict,
    deep_merge,
    load_config,
    load_schema,
    to_dict,
    validate,
)
from qtlib.config.types import (
    ComputeConfig,
    Config,
    ConditioningConfig,
    DataConfig,
    DegradeConfig,
    DemoConfig,
    EvaluateConfig,
    GateConfig,
    IQAConfig,
    LabelConfig,
    Member,
    ModelConfig,
    NAFNetConfig,
    PretrainConfig,
    Recipe,
    TrainConfig,
    UNetConfig,
)

__all__ = [
    "ComputeConfig", "Config", "ConditioningConfig", "ConfigError", "DataConfig", "DegradeConfig", "DemoConfig",
    "EvaluateConfig", "GateConfig", "IQAConfig", "LabelConfig", "Member", "ModelConfig",
    "NAFNetConfig", "PretrainConfig", "Recipe", "TrainConfig", "UNetConfig",
    "canonical_json", "config_from_dict", "deep_merge", "load_config", "load_schema", "to_dict", "validate",
]
