"""Configs: the typed schema (schema: frozen dataclasses, one per section, checked in
__post_init__), reading YAML files and `--set` overrides (files), and builder specs (specs: how a
config names a model or dataset builder). Pure Python and PyYAML: nothing here imports torch, so
bad input is refused before anything heavy loads.

    from online_distill import config
    cfg = config.load("configs/fmnist_dml.yaml", {"train.epochs": 2})
"""
from .files import dump, load, load_checked
from .schema import (Config, ConfigError, DataConfig, DistillConfig, LossConfig, OnPolicyConfig, OptimConfig, RunConfig,
                     ScaleConfig, TrainConfig, flatten, from_dict, to_dict, with_overrides)

__all__ = ["Config", "ConfigError", "DataConfig", "DistillConfig", "LossConfig", "OnPolicyConfig", "OptimConfig", "RunConfig",
           "ScaleConfig", "TrainConfig", "dump", "flatten", "from_dict", "load", "load_checked", "to_dict",
           "with_overrides"]
