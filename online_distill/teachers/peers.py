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

    def logits(self, x: Tensor, student_logits: list[Tensor]) -> list[Tensor]:
        local = torch.stack([z.detach().float() for z in student_logits])  # (k, B, C)
        if self.group is None:
            cohort = local
        else:  # slot-major ranks: concatenating the slots' stacks gives peers 0..K-1 in order
            gathered = [torch.empty_like(local) for _ in range(self.slots)]
            dist.all_gather(gathered, local, group=self.group)
            cohort = torch.cat(gathered)
            self.comm_bytes_per_step = (self.slots - 1) * local.numel() * local.element_size()
        k = cohort.shape[0]
        return [cohort[[q for q in range(k) if q != p]] for p in self.mine]
