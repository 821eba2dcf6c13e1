"""Codistillation (Anil et al. 2018): distil from stale copies of the other peers.

Every `sync_every` steps after `burn_in_steps`, peers swap weights over their exchange group
and keep frozen copies that compute teacher logits locally. Between swaps no peer traffic
flows at all, trading freshness of the teacher for far less communication than DML.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import Teacher, TeacherContext


class StalePeerTeacher(Teacher):
    def __init__(self, ctx: TeacherContext):
        self.group, self.me, self.k = ctx.topo.exchange_group, ctx.topo.peer, ctx.topo.num_peers
        self.sync_every, self.burn_in = ctx.cfg.distill.sync_every, ctx.cfg.distill.burn_in_steps
        self.copies = nn.ModuleDict({
            str(p): ctx.build_peer(p).to(ctx.device).eval().requires_grad_(False)
            for p in range(self.k) if p != self.me
        })
        self.synced = False
        sync_bytes = sum(t.numel() * t.element_size() for m in self.copies.values() for t in m.state_dict().values())
        self.comm_bytes_per_step = sync_bytes / self.sync_every

    @torch.no_grad()
    def logits(self, x: Tensor, student_logits: Tensor) -> Tensor | None:
        if not self.synced:  # burn-in: plain CE until the first swap
            return None
        return torch.stack([m(x).float() for m in self.copies.values()])

    def after_step(self, model: nn.Module, step: int) -> None:
        done = step + 1
        if done >= self.burn_in and (done - self.burn_in) % self.sync_every == 0:
            self.sync(model)

    def sync(self, model: nn.Module) -> None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        states: list = [None] * self.k
        dist.all_gather_object(states, state, group=self.group)
        for p, m in self.copies.items():
            m.load_state_dict(states[int(p)])
        self.synced = True

    def state_dict(self) -> dict:
        return {"synced": self.synced, "copies": self.copies.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.synced = bool(state["synced"])
        self.copies.load_state_dict(state["copies"])
