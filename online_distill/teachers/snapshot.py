"""Snapshot distillation (Yang et al. 2019): the last snapshot of each LR cycle teaches the next.

The run uses the cyclic schedule (optim.schedule='cyclic', optim.cycles >= 2): cosine cycles
restarted from the base LR. The first cycle trains on labels alone; at the end of every cycle
but the last, a frozen copy of the student is taken, and it is the teacher for the whole of
the following cycle. Between cycle ends the teacher does not change.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..config.schema import Config, ConfigError
from ..core.optim import cycle_index
from .base import PeerSource, TeacherContext


def is_cycle_end(step: int, cfg: Config, steps_per_epoch: int) -> bool:
    """True when global step `step` (0-based) is the last step of a cycle that is not the run's last."""
    total = steps_per_epoch * cfg.train.epochs
    at = lambda s: cycle_index(s, cfg.optim, steps_per_epoch, cfg.train.epochs)  # noqa: E731
    return step + 1 < total and at(step + 1) > at(step)


class SnapshotTeacher(PeerSource):
    waits_for_updates = True  # after_step may copy the updated weights

    def __init__(self, ctx: TeacherContext, peer: int):
        self.cfg, self.steps_per_epoch = ctx.cfg, ctx.steps_per_epoch
        self.model_name = ctx.cfg.models[peer]
        self.model = ctx.build_peer(peer).to(ctx.device).eval().requires_grad_(False)
        self.taken_at_step: int | None = None
        """Global step after which the current snapshot was taken; None in the first cycle."""

    @staticmethod
    def check(cfg: Config, models: Mapping, datasets: Mapping, data=None) -> None:
        why = "when distill.mode='snapshot' (each cycle's last snapshot teaches the next cycle)"
        if cfg.optim.schedule != "cyclic":
            raise ConfigError(f"optim.schedule: got {cfg.optim.schedule!r}; allowed: 'cyclic' {why}")
        if cfg.optim.cycles < 2:
            raise ConfigError(f"optim.cycles: got {cfg.optim.cycles}; allowed: an integer >= 2 {why}")

    @torch.no_grad()
    def logits(self, x: Tensor, student_logits: Tensor, step: int = 0) -> Tensor | None:
        if self.taken_at_step is None:  # first cycle: labels only
            return None
        return self.model(x).float().unsqueeze(0)

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        if is_cycle_end(step, self.cfg, self.steps_per_epoch):
            self.model.load_state_dict(model.state_dict())
            self.taken_at_step = step

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "model_name": self.model_name,
                "taken_at_step": -1 if self.taken_at_step is None else self.taken_at_step}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.taken_at_step = None if state["taken_at_step"] < 0 else int(state["taken_at_step"])
