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
        """Each local peer's logits in the run's form once (LogitForm.to_wire: dense float32, or
        small ids and 8/16-bit log-probs), each wire tensor all-gathered: what crosses the wire is
        the form's bytes_per_token x positions per peer."""
        form = self.form
        wires = [form.to_wire(form.output(z, x=x, teacher=p)) for z, p in zip(student_logits, self.mine)]
        tensors = {key: torch.stack([w[key] for w in wires]) for key in wires[0] if isinstance(wires[0][key], Tensor)}
        header = {key: v for key, v in wires[0].items() if not isinstance(v, Tensor)}
        if self.group is not None:  # slot-major ranks: concatenating the slots' stacks gives peers 0..K-1 in order
            for key, t in tensors.items():
                gathered = [torch.empty_like(t) for _ in range(self.slots)]
                dist.all_gather(gathered, t, group=self.group)
                tensors[key] = torch.cat(gathered)
            self.comm_bytes_per_step = (self.slots - 1) * sum(form.nbytes(w) for w in wires)
        cohort = [form.from_wire({**header, **{key: t[q] for key, t in tensors.items()}})
                  for q in range(len(next(iter(tensors.values()))))]
        return [form.target([cohort[q] for q in range(len(cohort)) if q != p]) for p in self.mine]

    @torch.no_grad()
    def logits_on(self, xs: list[Tensor], generated: list[Tensor], student_logits: list[Tensor], step: int,
                  score) -> list:
        """On-policy mutual learning: every peer generates (its own batch xs[j]), and the other
        peers score its samples. Workers all-gather the samples' token ids (int32), each local peer
        scores every other peer's samples and puts them in the run's form, and the scores are
        all-gathered back: a worker holding k of the K peers receives, per step,
        (slots - 1) x k x (B L x 4 + K x form bytes of B x L positions), nothing through the driver.
        A peer's scores of its own samples are its logits, which cross too (fixed shapes)."""
        form = self.form
        ids = torch.stack(xs)  # (k, B, L)
        cohort_x = ids
        wire_ids = ids.to(torch.int32)
        if self.group is not None:
            gathered = [torch.empty_like(wire_ids) for _ in range(self.slots)]
            dist.all_gather(gathered, wire_ids, group=self.group)
            cohort_x = torch.cat(gathered).to(ids.dtype)
        wires = []  # per local scorer j, per cohort peer p: the wire of scorer's output on p's samples
        for j, q in enumerate(self.mine):
            for p in range(len(cohort_x)):
                z = student_logits[j].detach().float() if p == q else score(j, cohort_x[p])
                wires.append(form.to_wire(form.output(z, x=cohort_x[p], teacher=q)))
        header = {key: v for key, v in wires[0].items() if not isinstance(v, Tensor)}
        tensors = {key: torch.stack([w[key] for w in wires]) for key in wires[0] if isinstance(wires[0][key], Tensor)}
        if self.group is not None:
            for key, t in tensors.items():
                gathered = [torch.empty_like(t) for _ in range(self.slots)]
                dist.all_gather(gathered, t, group=self.group)
                tensors[key] = torch.cat(gathered)
            self.comm_bytes_per_step = (self.slots - 1) * (wire_ids.numel() * wire_ids.element_size()
                                                           + sum(form.nbytes(w) for w in wires))
        n = len(cohort_x)  # tensors[key][q * n + p]: scorer q's output on peer p's samples

        def output(q: int, p: int):
            return form.from_wire({**header, **{key: t[q * n + p] for key, t in tensors.items()}})

        return [form.target([output(q, p) for q in range(n) if q != p]) for p in self.mine]

    def fidelity(self, x: Tensor, student_logits: list[Tensor]) -> dict[str, float]:
        # a neighbour's logits as the teacher where this worker holds two peers, else its own
        q = 1 if len(student_logits) > 1 else 0
        return self.form.fidelity(student_logits[q].detach().float(), student_logits[0], x=x,
                                  teacher_index=self.mine[q])
