"""A config checked against what is registered: model and dataset names, and what the chosen
teacher source needs (a teacher checkpoint that loads into its model, a cyclic schedule for
snapshots, ...). These checks live here, where the registries are known, so that config.py
imports none of them and the CLI can refuse a bad field before torch is imported.

    from online_distill import check
    cfg = check(config.load("configs/fmnist_dml.yaml"), models={"my_net": my_net})
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config.schema import Config
from ..data.datasets import resolve_dataset
from ..models.builders import resolve_model
from ..teachers import check_teacher


def check_names(cfg: Config, models: Mapping[str, Any] | None = None, datasets: Mapping[str, Any] | None = None,
                *, teacher: bool = True) -> Config:
    """The checks against the registries (`models` / `datasets` add user builders by name): every
    model and the dataset resolve to a builder (a name, or an import path that imports and names
    a builder taking the spec's arguments: online_distill.config.specs); with `teacher`, what the chosen
    teacher source needs (run.plan makes that check itself, once it has read the data)."""
    for i, spec in enumerate(cfg.models):
        resolve_model(spec, models, field=f"models[{i}]")
    resolve_dataset(cfg.data.dataset, datasets)
    if teacher:
        check_teacher(cfg, models, datasets)  # what only the chosen source needs
    return cfg


def check(cfg: Config, models: Mapping[str, Any] | None = None, datasets: Mapping[str, Any] | None = None) -> Config:
    """Every check a config gets before a run: its fields, then the registries. Returns cfg."""
    return check_names(cfg.check_fields(), models, datasets)
