"""Teacher sources: where a step's teacher logits come from.

A worker trains one or more peers (scale.peers_per_worker) on the same batch. The training
loop asks one question per step, `teacher.logits(x, student_logits)`, with the logits of every
peer it holds, and calls `teacher.after_step(models, step)` after the optimizer steps. It never
branches on the mode: `distill.mode` picks a builder from TEACHERS, and that is the only place
names matter.

Two kinds of source:
- cohort sources (DML, codistillation) see all of the worker's peers at once: packed peers take
  each other's logits (or stale copies) from memory, and only other workers' come over the wire;
- per-peer sources (EMA, snapshots, DLB, a frozen teacher) are written for one peer
  (`PeerSource`) and `per_peer` runs one of them for each peer the worker holds.

A frozen teacher's life on the driver (its copy in the run directory, its disk cache, its service)
is lifecycle.py's, re-exported here: run/ and sweep/ import this package, never its files.
"""
from __future__ import annotations

from collections.abc import Callable

from ..config.schema import Config
from .base import PeerSource, PerPeer, Teacher, TeacherContext, per_peer
from .frozen import with_absolute_checkpoint
from .lifecycle import copy_bytes, copy_members, fill_cache, service_summary, start_service, stop_service, write_copy

__all__ = ["TEACHERS", "PeerSource", "PerPeer", "Teacher", "TeacherContext", "build_teacher", "check_teacher",
           "copy_bytes", "copy_members", "fill_cache", "per_peer", "service_summary", "start_service", "stop_service",
           "with_absolute_checkpoint", "write_copy"]


def _registry() -> dict[str, Callable[[TeacherContext], Teacher]]:
    from .dlb import LastBatchTeacher
    from .ema import EmaTeacher
    from .frozen import BornAgain, FrozenTeacher
    from .peers import PeerTeacher
    from .snapshot import SnapshotTeacher
    from .stale_peers import StalePeerTeacher

    return {
        "independent": Teacher,
        "dml": PeerTeacher,
        "codistill": StalePeerTeacher,
        "ema": per_peer(EmaTeacher),
        "snapshot": per_peer(SnapshotTeacher),
        "dlb": per_peer(LastBatchTeacher),
        "born_again": per_peer(BornAgain),
        "offline": per_peer(FrozenTeacher),
    }


TEACHERS = _registry()


def build_teacher(ctx: TeacherContext) -> Teacher:
    return TEACHERS[ctx.cfg.distill.mode](ctx)


def check_teacher(cfg: Config, models: dict, datasets: dict, data=None):
    """Driver-side checks of the chosen source (a teacher checkpoint that exists and loads into
    its model, a cyclic schedule for snapshots, ...): a builder may carry a
    `check(cfg, models, datasets, data)`; `data` is the dataset as the driver read it (None: read
    here where needed). Returns what the check resolved, for the driver to keep (a frozen
    teacher's source and weights), or None."""
    check = getattr(TEACHERS[cfg.distill.mode], "check", None)
    if check is not None:
        return check(cfg, models, datasets, data)
    return None
