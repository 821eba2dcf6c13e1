"""Optimizers and learning-rate schedules, stepped once per optimizer step."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config.schema import LossConfig, OptimConfig


def make_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    # no weight decay on biases and normalisation parameters, as is usual
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base LR at an optimizer step (pure; plotted and tested as is)."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    if cfg.schedule == "cyclic":
        cycle_len = total / cfg.cycles
        within = (step % cycle_len) / cycle_len
        return 0.5 * (1.0 + math.cos(math.pi * within))
    raise ValueError(f"optim.schedule: {cfg.schedule!r}")


def cycle_index(step: int, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> int:
    """Which LR cycle a step is in (0 for non-cyclic schedules)."""
    if cfg.schedule != "cyclic":
        return 0
    return int(step // (max(1, steps_per_epoch * epochs) / cfg.cycles))


def make_scheduler(cfg: OptimConfig, opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, steps_per_epoch, epochs))


def kd_weight_at(cfg: LossConfig, epoch_progress: float) -> float:
    """kd_weight, ramped linearly from 0 over kd_warmup_epochs (epoch_progress counts from 0)."""
    if cfg.kd_warmup_epochs <= 0:
        return cfg.kd_weight
    return cfg.kd_weight * min(1.0, epoch_progress / cfg.kd_warmup_epochs)
