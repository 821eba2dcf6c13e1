"""What every teacher source is: the worker-level Teacher the loop talks to, the one-peer
PeerSource that self-distillation and frozen teachers implement, PerPeer that runs one of those
per peer of a worker, and the TeacherContext a source is built from."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config.schema import Config
from ..core.topology import Topology
from ..distill.form import LogitForm


class Teacher:
    """A worker's teacher for the peers it holds. This base is no teacher at all (plain CE)."""

    comm_bytes_per_step: float = 0.0
    """Bytes this worker receives from other workers per step (averaged over steps)."""
    waits_for_updates: bool = False
    """after_step reads the students' updated weights (an EMA, a snapshot, a weight swap), so the
    peers' optimizer steps must be done before it; otherwise a peer's update may still run while
    the next step's forwards start (loop.PeerRunner)."""

    teacher_forwards: int = 0
    """Examples this worker's frozen teacher has run on (a teacher cache keeps it at 0)."""

    def __init__(self, ctx: TeacherContext):
        self.n = len(ctx.topo.peers)
        self.form = LogitForm.of(ctx.cfg)

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch the students train on this step. Most teachers leave it as it is; one that
        distils from earlier samples (DLB) appends them here, so the loop never asks which."""
        return x, y

    def logits(self, x: Tensor, student_logits: list[Tensor], step: int = 0) -> list:
        """Per local peer: its teachers' target for this batch in the run's form (distill.form:
        a losses.DenseTarget or sparse.SparseTeachers, answering the loss's per_position), or
        None for none. `step`: the global optimizer step."""
        return [None] * self.n

    def logits_on(self, xs: list[Tensor], generated: list[Tensor], student_logits: list[Tensor], step: int,
                  score: Callable[[int, Tensor], Tensor]) -> list:
        """On-policy training (training/onpolicy.py): per local peer, its teachers' target on its own
        batch xs[j], whose rows generated[j] (B,) it wrote itself. score(j, x): the logits of this
        worker's j-th peer on x, without gradients (for peers that score each other's samples)."""
        return [None] * self.n

    def score(self, x: Tensor) -> Tensor | None:
        """The teacher's dense logits (1, B, L, V) on x outside training (validation prompts'
        continuations: the val_gen_* metrics), where this worker holds one dense teacher; else None."""
        return None

    def fidelity(self, x: Tensor, student_logits: list[Tensor]) -> dict[str, float]:
        """What the run's logit form loses on a batch (LogitForm.fidelity: KL(dense ||
        reconstructed) and the KD term's relative error), where this worker holds a dense teacher
        to compare; {} else."""
        return {}

    def prefetch(self, x: Tensor, step: int) -> None:
        """The loop's batch of optimizer step `step` is x: a teacher served by other processes
        (teachers/service.py) starts on it while this step trains. Others ignore it."""

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

    def logits(self, x: Tensor, student_logits: Tensor, step: int = 0) -> Tensor | None:
        """Teacher logits for this batch, (n_teachers, B, C), detached; None for no teacher."""
        return None

    def target(self, x: Tensor, student_logits: Tensor, step: int, form: LogitForm, peer: int,
               generated: Tensor | None = None):
        """This peer's teacher target in the run's form: the dense `logits`, each teacher named by
        the peer it teaches. A source whose output is already in the form (a teacher cache, a
        service) overrides this instead; `generated` marks the rows a student wrote (on-policy),
        which such a source must not look up or keep."""
        return form.target_of(self.logits(x, student_logits, step), x=x, teachers=[peer])

    def prefetch(self, x: Tensor, step: int) -> None:
        """The batch of optimizer step `step` is next: a teacher computed elsewhere may start on it."""

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def reference(self, x: Tensor) -> Tensor | None:
        """The teacher's dense logits for x, (1, B, [L,] C), outside training: what a compression is
        measured against. By default those of `logits`; a source that counts or caches overrides it."""
        return self.logits(x, None)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PerPeer(Teacher):
    """One PeerSource per peer the worker holds; no traffic between them."""

    def __init__(self, ctx: TeacherContext, source: Callable[[TeacherContext, int], PeerSource]):
        super().__init__(ctx)
        self.peers = list(ctx.topo.peers)
        self.sources = [source(ctx, p) for p in ctx.topo.peers]
        self.waits_for_updates = any(s.waits_for_updates for s in self.sources)

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # every peer of a worker sees the same batches, so every source composes the same batch;
        # each is still asked, since a source may remember what it was given (DLB)
        return [s.prepare_batch(x, y) for s in self.sources][0]

    def logits(self, x: Tensor, student_logits: list[Tensor], step: int = 0) -> list:
        return [s.target(x, z, step, self.form, p) for s, z, p in zip(self.sources, student_logits, self.peers)]

    def logits_on(self, xs: list[Tensor], generated: list[Tensor], student_logits: list[Tensor], step: int,
                  score) -> list:
        return [s.target(x, z, step, self.form, p, generated=g)
                for s, x, g, z, p in zip(self.sources, xs, generated, student_logits, self.peers)]

    def score(self, x: Tensor) -> Tensor | None:
        return self.sources[0].reference(x)

    @property
    def teacher_forwards(self) -> int:
        return sum(getattr(s, "forwards", 0) for s in self.sources)

    def prefetch(self, x: Tensor, step: int) -> None:
        for s in self.sources:
            s.prefetch(x, step)

    def fidelity(self, x: Tensor, student_logits: list[Tensor]) -> dict[str, float]:
        if self.form.dense:
            return {}
        z = self.sources[0].reference(x)
        return {} if z is None else self.form.fidelity(z[0], student_logits[0], x=x, teacher_index=self.peers[0])

    def after_step(self, models: list[nn.Module], step: int) -> None:
        for s, m in zip(self.sources, models):
            s.after_step(m, step)

    def state_dict(self, i: int) -> dict:
        return self.sources[i].state_dict()

    def load_state_dict(self, i: int, state: dict) -> None:
        self.sources[i].load_state_dict(state)


def per_peer(source: type[PeerSource]) -> Callable[[TeacherContext], Teacher]:
    """The registry entry of a per-peer source; keeps the source's driver-side `check`."""
    def build(ctx: TeacherContext) -> Teacher:
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
    run_dir: object | None = None
    """The run's rundir.RunDir (None outside a run: tests), e.g. where a frozen teacher's copy is."""
    service: list[str] | None = None
    """The names of the teacher service's actors (distill.teacher_service), started by the driver."""
