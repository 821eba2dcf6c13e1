"""Teacher sources: where a step's teacher logits come from.

The training loop asks one question per step, `teacher.logits(x, student_logits)`, and calls
`teacher.after_step(model, step)` after the optimizer step. It never branches on the mode:
`distill.mode` picks a builder from TEACHERS, and that is the only place names matter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..config import Config
from ..topology import Topology


class Teacher:
    """Base teacher: no teacher at all (plain CE). Subclasses override what they need."""

    comm_bytes_per_step: float = 0.0
    """Bytes this rank receives from other ranks per step (averaged over steps)."""

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch the student trains on this step. Most teachers leave it as it is; one that
        distils from earlier samples (DLB) appends them here, so the loop never asks which."""
        return x, y

    def logits(self, x: Tensor, student_logits: Tensor) -> Tensor | None:
        """Teacher logits for this batch, (n_teachers, B, C), detached; None for no teacher."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step with the (unwrapped) student and the global step."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class TeacherContext:
    cfg: Config
    topo: Topology
    device: torch.device
    build_peer: Callable[[int], nn.Module]
    """Builds a fresh (untrained) model of peer p, on the CPU."""
    steps_per_epoch: int
    build_model: Callable[[str], nn.Module] | None = None
    """Builds a fresh model by name for this dataset, on the CPU (a frozen teacher's architecture)."""


def _independent(ctx: TeacherContext) -> Teacher:
    return Teacher()


def _registry() -> dict[str, Callable[[TeacherContext], Teacher]]:
    from .dlb import LastBatchTeacher
    from .ema import EmaTeacher
    from .frozen import BornAgain, FrozenTeacher
    from .peers import PeerTeacher
    from .snapshot import SnapshotTeacher
    from .stale_peers import StalePeerTeacher

    return {
        "independent": _independent,
        "dml": PeerTeacher,
        "codistill": StalePeerTeacher,
        "ema": EmaTeacher,
        "snapshot": SnapshotTeacher,
        "dlb": LastBatchTeacher,
        "born_again": BornAgain,
        "offline": FrozenTeacher,
    }


TEACHERS = _registry()


def build_teacher(ctx: TeacherContext) -> Teacher:
    return TEACHERS[ctx.cfg.distill.mode](ctx)


def check_teacher(cfg: Config, models: dict, datasets: dict) -> None:
    """Driver-side checks of the chosen source (a teacher checkpoint that exists, a cyclic
    schedule for snapshots, ...): a builder may carry a `check(cfg, models, datasets)`."""
    check = getattr(TEACHERS[cfg.distill.mode], "check", None)
    if check is not None:
        check(cfg, models, datasets)
