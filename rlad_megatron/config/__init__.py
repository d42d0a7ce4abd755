"""The one typed config tree of rlad-megatron.

YAML file -> nested dataclasses (schema.py), then ``--section.key=value`` overrides (loader.py).
Unknown keys and invalid values raise :class:`ConfigError` naming the dotted key, the expected and
the actual value. Each component receives only its own sub-config.
"""

from rlad_megatron.config.loader import (
    load_config,
    load_config_or_exit,
    parse_overrides,
    save_config,
    to_dict,
    to_yaml,
)
from rlad_megatron.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    ModelSection,
    OptimizerConfig,
    ParallelConfig,
    RLConfig,
    TrainConfig,
    WandbConfig,
    check_world,
    padded_vocab_size,
    same_layout,
)

__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistillConfig", "LoggingConfig",
           "ModelConfig", "ModelSection", "OptimizerConfig", "ParallelConfig", "RLConfig", "TrainConfig", "WandbConfig",
           "check_world", "load_config", "load_config_or_exit", "padded_vocab_size", "parse_overrides",
           "same_layout", "save_config", "to_dict", "to_yaml"]
