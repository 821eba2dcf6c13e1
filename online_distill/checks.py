"""A config checked against what is registered: model and dataset names, and what the chosen
teacher source needs (a teacher checkpoint that loads into its model, a cyclic schedule for
snapshots, ...). These checks live here, where the registries are known, so that config.py
imports none of them and the CLI can refuse a bad field before torch is imported.

    from online_distill import check
    cfg = check(config.load("configs/fmnist_dml.yaml"), models={"my_net": my_net})
"""
from __future__ import annotations

from typing import Any, Mapping

from .config import Config, ConfigError
from .data import DATASETS
from .models import MODELS
from .teachers import check_teacher


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name}: got {value!r}; allowed: {allowed}", field_name)


def check_names(cfg: Config, models: Mapping[str, Any] | None = None, datasets: Mapping[str, Any] | None = None) -> Config:
    """The checks against the registries (`models` / `datasets` add user builders by name)."""
    models = {**MODELS, **(models or {})}
    datasets = {**DATASETS, **(datasets or {})}
    for i, name in enumerate(cfg.models):
        if name not in models:
            _fail(f"models[{i}]", name, ", ".join(sorted(models)))
    if cfg.data.dataset not in datasets:
        _fail("data.dataset", cfg.data.dataset, ", ".join(sorted(datasets)))
    check_teacher(cfg, models, datasets)  # what only the chosen source needs
    return cfg


def check(cfg: Config, models: Mapping[str, Any] | None = None, datasets: Mapping[str, Any] | None = None) -> Config:
    """Every check a config gets before a run: its fields, then the registries. Returns cfg."""
    return check_names(cfg.check_fields(), models, datasets)
