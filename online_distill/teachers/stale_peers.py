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

from .base import Teacher, TeacherContext


class StalePeerTeacher(Teacher):
    waits_for_updates = True  # after_step swaps the updated weights in

    def __init__(self, ctx: TeacherContext):
        super().__init__(ctx)
        self.topo = ctx.topo
        self.sync_every, self.burn_in = ctx.cfg.distill.sync_every, ctx.cfg.distill.burn_in_steps
        mine = self.topo.peers
        # a stale copy of every peer that teaches one of this worker's peers: all the others, and
        # with several peers packed here, these too (each teaches its neighbours)
        self.copies = nn.ModuleDict({
            str(q): ctx.build_peer(q).to(ctx.device).eval().requires_grad_(False)
            for q in range(self.topo.num_peers) if any(p != q for p in mine)
        })
        # Stale copies predict under the same precision as the students (the loop's autocast
        # only wraps the students' forward).
        bf16 = ctx.cfg.scale.precision == "bf16"
        self._autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.synced = False
        # Bytes this worker receives per swap (the states of the peers other workers hold), spread
        # over the steps between swaps; DDP's gradient all-reduce inside a peer is not peer traffic.
        self.bytes_per_sync = sum(state_bytes(m) for q, m in self.copies.items() if int(q) not in mine)
        self.comm_bytes_per_step = self.bytes_per_sync / self.sync_every

    @torch.no_grad()
    def logits(self, x: Tensor, student_logits: list[Tensor], step: int = 0) -> list:
        if not self.synced:  # burn-in: plain CE until the first swap
            return [None] * self.n
        with self._autocast():
            z = {q: m(x).float() for q, m in self.copies.items()}  # each copy's forward once, shared
        # each stale copy's logits in the run's form once, as its peer's own would be
        outputs = {q: self.form.output(v, x=x, teacher=int(q)) for q, v in z.items()}
        return [self.form.target([o for q, o in outputs.items() if int(q) != p]) for p in self.topo.peers]

    def after_step(self, models: list[nn.Module], step: int) -> None:
        if is_sync_step(step, self.burn_in, self.sync_every):
            self.sync(models)

    @torch.no_grad()
    def sync(self, models: list[nn.Module]) -> None:
        """Swap states with the other peers. Collective: every rank of the cohort calls it."""
        topo = self.topo
        live = dict(zip(topo.peers, models))
        if topo.slot_group is not None:
            for m in models:
                broadcast_flat(list(m.buffers()), src=topo.slot_root, group=topo.slot_group)
        for q in range(topo.num_peers):
            if topo.exchange_group is not None:  # every worker takes part, in peer order
                source = live[q] if q in live else self.copies[str(q)]
                broadcast_flat(list(source.state_dict().values()), src=topo.holder(q), group=topo.exchange_group)
            if q in live and str(q) in self.copies:  # a packed neighbour's copy: from memory
                self.copies[str(q)].load_state_dict(live[q].state_dict())
        self.synced = True

    def state_dict(self, i: int) -> dict:
        return {"synced": self.synced, "copies": self.copies.state_dict()}

    def load_state_dict(self, i: int, state: dict) -> None:
        self.synced = bool(state["synced"])
        copies = self.copies.state_dict()
        # a checkpoint written by another layout holds copies of the peers its worker needed
        saved = {k: v for k, v in state["copies"].items() if k in copies}
        self.copies.load_state_dict({**copies, **saved})


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
