"""Configuration: dataclasses (schema), YAML + overrides (loader), derived batch sizes."""
from vcppo_megatron.config.batch_sizes import BatchSizes, derive_batch_sizes
from vcppo_megatron.config.loader import ConfigError, load_config
from vcppo_megatron.config.schema import (ActorConfig, AlgoConfig, BatchConfig, Config,
                                          CriticConfig, DataConfig, OptimConfig, ParallelConfig,
                                          RewardConfig, RolloutConfig, TinyModelConfig,
                                          TrainerConfig)

__all__ = ["ActorConfig", "AlgoConfig", "BatchConfig", "BatchSizes", "Config", "ConfigError",
           "CriticConfig", "DataConfig", "OptimConfig", "ParallelConfig", "RewardConfig",
           "RolloutConfig", "TinyModelConfig", "TrainerConfig", "derive_batch_sizes",
           "load_config"]
