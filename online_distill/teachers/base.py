"""What every teacher source is: the worker-level Teacher the loop talks to, the one-peer
PeerSource that self-distillation and frozen teachers implement, PerPeer that runs one of those
per peer of a worker, and the TeacherContext a source is built from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..config import Config
from ..topology import Topology


class Teacher:
    """A worker's teacher for the peers it holds. This base is no teacher at all (plain CE)."""

    comm_bytes_per_step: float = 0.0
    """Bytes this worker receives from other workers per step (averaged over steps)."""
    waits_for_updates: bool = False
    """after_step reads the students' updated weights (an EMA, a snapshot, a weight swap), so the
    peers' optimizer steps must be done before it; otherwise a peer's update may still run while
    the next step's forwards start (loop.PeerRunner)."""

    def __init__(self, ctx: "TeacherContext"):
        self.n = len(ctx.topo.peers)

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch the students train on this step. Most teachers leave it as it is; one that
        distils from earlier samples (DLB) appends them here, so the loop never asks which."""
        return x, y

    def logits(self, x: Tensor, student_logits: list[Tensor]) -> list[Tensor | None]:
        """Per local peer: teacher logits for this batch, (n_teachers, B, C), detached; None for none."""
        return [None] * self.n

    def after_step(self, models: list[nn.Module], step: int) -> None:
        """Called after every optimizer step with the (unwrapped) students and the global step."""

    def state_dict(self, i: int) -> dict:
        """What is saved with the worker's i-th peer (in its checkpoint file)."""
        return {}

    def load_state_dict(self, i: int, state: dict) -> None:
        pass


class PeerSource:
    """A teacher source for one peer (self-distillation, a frozen teacher)."""

    waits_for_updates: bool = False  # as Teacher.waits_for_updates

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x, y

    def logits(self, x: Tensor, student_logits: Tensor) -> Tensor | None:
        """Teacher logits for this batch, (n_teachers, B, C), detached; None for no teacher."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PerPeer(Teacher):
    """One PeerSource per peer the worker holds; no traffic between them."""

    def __init__(self, ctx: "TeacherContext", source: Callable[["TeacherContext", int], PeerSource]):
        super().__init__(ctx)
        self.sources = [source(ctx, p) for p in ctx.topo.peers]
        self.waits_for_updates = any(s.waits_for_updates for s in self.sources)

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # every peer of a worker sees the same batches, so every source composes the same batch;
        # each is still asked, since a source may remember what it was given (DLB)
        return [s.prepare_batch(x, y) for s in self.sources][0]

    def logits(self, x: Tensor, student_logits: list[Tensor]) -> list[Tensor | None]:
        return [s.logits(x, z) for s, z in zip(self.sources, student_logits)]

    def after_step(self, models: list[nn.Module], step: int) -> None:
        for s, m in zip(self.sources, models):
            s.after_step(m, step)

    def state_dict(self, i: int) -> dict:
        return self.sources[i].state_dict()

    def load_state_dict(self, i: int, state: dict) -> None:
        self.sources[i].load_state_dict(state)


def per_peer(source: type[PeerSource]) -> Callable[["TeacherContext"], Teacher]:
    """The registry entry of a per-peer source; keeps the source's driver-side `check`."""
    def build(ctx: "TeacherContext") -> Teacher:
        return PerPeer(ctx, source)

    build.check = getattr(source, "check", None)
    build.source = source
    return build


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
