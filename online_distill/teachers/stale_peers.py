"""Codistillation (Anil et al. 2018): distil from stale copies of the other peers.

Every `sync_every` steps after `burn_in_steps`, the peers swap weights over their exchange
group and keep frozen copies that compute teacher logits locally. Between swaps no peer
traffic flows at all, trading the teacher's freshness for far less communication than DML,
and peers need not see the same batches (`distill.peer_data: disjoint`).

What a swap sends is a peer's whole state dict (parameters *and* buffers: a copy in eval
mode predicts with BatchNorm's running statistics, so stale statistics would make a
different teacher). With replicas, DDP keeps a peer's parameters identical across its
replicas, but each replica has since moved its BatchNorm statistics with its own batch;
DDP overwrites them with replica 0's at the next forward anyway, so we take replica 0's
buffers first, and every replica of a peer then holds bit-identical stale copies.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import Teacher, TeacherContext


class StalePeerTeacher(Teacher):
    def __init__(self, ctx: TeacherContext):
        self.topo = ctx.topo
        self.sync_every, self.burn_in = ctx.cfg.distill.sync_every, ctx.cfg.distill.burn_in_steps
        self.copies = nn.ModuleDict({
            str(p): ctx.build_peer(p).to(ctx.device).eval().requires_grad_(False)
            for p in range(self.topo.num_peers) if p != self.topo.peer
        })
        # Stale copies predict under the same precision as the student (the loop's autocast
        # only wraps the student's forward).
        bf16 = ctx.cfg.scale.precision == "bf16"
        self._autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.synced = False
        # Bytes this rank receives per swap (the other peers' states), spread over the steps
        # between swaps; DDP's gradient all-reduce inside a peer is not peer traffic.
        self.bytes_per_sync = sum(state_bytes(m) for m in self.copies.values())
        self.comm_bytes_per_step = self.bytes_per_sync / self.sync_every

    @torch.no_grad()
    def logits(self, x: Tensor, student_logits: Tensor) -> Tensor | None:
        if not self.synced:  # burn-in: plain CE until the first swap
            return None
        with self._autocast():
            return torch.stack([m(x).float() for m in self.copies.values()])

    def after_step(self, model: nn.Module, step: int) -> None:
        if is_sync_step(step, self.burn_in, self.sync_every):
            self.sync(model)

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        """Swap states with the other peers. Collective: every rank of the cohort calls it."""
        topo = self.topo
        if topo.peer_group is not None:
            broadcast_flat(list(model.buffers()), src=topo.peer_root, group=topo.peer_group)
        for p, src in enumerate(topo.exchange_ranks):
            source = model if p == topo.peer else self.copies[str(p)]
            broadcast_flat(list(source.state_dict().values()), src=src, group=topo.exchange_group)
        self.synced = True

    def state_dict(self) -> dict:
        return {"synced": self.synced, "copies": self.copies.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.synced = bool(state["synced"])
        self.copies.load_state_dict(state["copies"])


def is_sync_step(step: int, burn_in: int, sync_every: int) -> bool:
    """Swap after optimizer step `step` (counted from 0)? The first swap follows the burn-in
    (or the first sync_every steps when there is none), then one every sync_every steps."""
    done = step + 1
    first = burn_in if burn_in > 0 else sync_every
    return done >= first and (done - first) % sync_every == 0


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def broadcast_flat(tensors: list[Tensor], *, src: int, group) -> None:
    """Broadcast tensors from global rank `src`, in place: one flat buffer per dtype rather
    than a collective per tensor (a ResNet has ~100 of them; latency, not bytes, would
    dominate). Works on gloo and NCCL, with no pickling."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group_tensors in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group_tensors])
        dist.broadcast(flat, src=src, group=group)
        if dist.get_rank() != src:
            offset = 0
            for t in group_tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
