"""Deep mutual learning (Zhang et al. 2018): the other peers' current logits are the teachers.

Every step each peer's teachers are the detached logits of all the other peers on the same
batch. Peers packed in one worker read each other's from memory; workers holding other peers
all-gather theirs over the exchange group: (K - k) x B x C floats received per worker that
holds k of the K peers, far less than a gradient all-reduce, and nothing at all when one
worker holds the whole cohort.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .base import Teacher, TeacherContext


class PeerTeacher(Teacher):
    def __init__(self, ctx: TeacherContext):
        super().__init__(ctx)
        self.group = ctx.topo.exchange_group
        self.slots = ctx.topo.num_slots
        self.mine = ctx.topo.peers  # cohort positions of this worker's peers; slots hold consecutive peers

    def logits(self, x: Tensor, student_logits: list[Tensor], step: int = 0) -> list:
        local = torch.stack([z.detach().float() for z in student_logits])  # (k, B, [L,] V)
        if not self.form.dense:
            return self._compressed(local, step)
        if self.group is None:
            cohort = local
        else:  # slot-major ranks: concatenating the slots' stacks gives peers 0..K-1 in order
            gathered = [torch.empty_like(local) for _ in range(self.slots)]
            dist.all_gather(gathered, local, group=self.group)
            cohort = torch.cat(gathered)
            self.comm_bytes_per_step = (self.slots - 1) * local.numel() * local.element_size()
        k = cohort.shape[0]
        return [cohort[[q for q in range(k) if q != p]] for p in self.mine]

    def _compressed(self, local: Tensor, step: int) -> list:
        """Each local peer's logits compressed once (sparse.to_wire: small ids, float16), the wire
        tensors all-gathered: what crosses the wire is bytes_per_token x positions per peer."""
        from ..distill.sparse import from_wire, nbytes, to_wire

        wires = [to_wire(self.form.compress(z, step=step, teacher=p)) for z, p in zip(local, self.mine)]
        tensors = {key: torch.stack([w[key] for w in wires]) for key in wires[0] if isinstance(wires[0][key], Tensor)}
        header = {key: v for key, v in wires[0].items() if not isinstance(v, Tensor)}
        if self.group is not None:
            for key, t in tensors.items():
                gathered = [torch.empty_like(t) for _ in range(self.slots)]
                dist.all_gather(gathered, t, group=self.group)
                tensors[key] = torch.cat(gathered)
            self.comm_bytes_per_step = (self.slots - 1) * sum(nbytes(w) for w in wires)
        cohort = [from_wire({**header, **{key: t[q] for key, t in tensors.items()}}) for q in range(len(tensors["ids"]))]
        return [[cohort[q] for q in range(len(cohort)) if q != p] for p in self.mine]

    def fidelity(self, x: Tensor, student_logits: list[Tensor]) -> dict[str, float]:
        if self.form.dense:
            return {}
        from .base import measure_fidelity

        # a neighbour's logits as the teacher where this worker holds two peers, else its own
        teacher = student_logits[1] if len(student_logits) > 1 else student_logits[0]
        return measure_fidelity(self.form, teacher.float(), student_logits[0], peer=self.mine[0])
