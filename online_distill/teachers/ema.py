"""EMA self-distillation: the teacher is an exponential moving average of the student's weights.

After every optimizer step, teacher <- decay * teacher + (1 - decay) * student, for the
parameters and the floating-point buffers alike (BatchNorm running mean and variance are
averaged the same way, so the teacher's normalisation matches its averaged weights; integer
buffers such as num_batches_tracked are copied). The teacher starts as a copy of the
student's initial weights and runs in eval mode without gradients.

The teacher lives on the worker that trains its peer and needs no traffic. With replicas
(DDP) every replica keeps its own copy: the averaged parameters are identical across
replicas, since DDP keeps the students' parameters identical; the averaged BatchNorm
statistics follow each replica's own batches, as the students' statistics do between DDP's
buffer broadcasts. A checkpoint keeps replica 0's teacher, and every replica resumes with it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import PeerSource, TeacherContext


def ema_decay_at(step: int, decay: float, warmup_steps: int) -> float:
    """Decay used after global step `step` (0-based). During warm-up the average forgets its
    random start faster: min(decay, (1 + step) / (10 + step))."""
    if step < warmup_steps:
        return min(decay, (1.0 + step) / (10.0 + step))
    return decay


def paired_state(teacher: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]]:
    """The teacher's and the student's floating-point state tensors, paired by name, and the
    other pairs (counters such as num_batches_tracked). The tensors share the modules' storage,
    so the lists stay valid while the modules update their tensors in place (optimizer steps,
    BatchNorm statistics, load_state_dict all do)."""
    s_state = student.state_dict()
    floats_t: list[Tensor] = []
    floats_s: list[Tensor] = []
    others: list[tuple[Tensor, Tensor]] = []
    for name, t in teacher.state_dict().items():
        s = s_state[name]
        if t.is_floating_point():
            if s.dtype != t.dtype:
                raise ValueError(f"EMA teacher: {name} is {t.dtype} in the teacher but {s.dtype} in the student")
            floats_t.append(t)
            floats_s.append(s)
        else:  # an average of counts means nothing: copied
            others.append((t, s))
    return floats_t, floats_s, others


@torch.no_grad()
def ema_step_(pairs: tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]], decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student over the pairs of paired_state."""
    floats_t, floats_s, others = pairs
    for t, s in others:
        t.copy_(s)
    if floats_t:
        torch._foreach_lerp_(floats_t, floats_s, 1.0 - decay)  # t += (1 - decay) * (s - t)


def ema_update_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, in place, over the whole state dict."""
    ema_step_(paired_state(teacher, student), decay)


class EmaTeacher(PeerSource):
    waits_for_updates = True  # after_step averages the updated weights in

    def __init__(self, ctx: TeacherContext, peer: int):
        d = ctx.cfg.distill
        self.decay, self.warmup_steps = d.ema_decay, d.ema_warmup_steps
        self.model_name = ctx.cfg.models[peer]
        # build_peer seeds the init exactly as the student's, so the average starts at the student
        self.model = ctx.build_peer(peer).to(ctx.device).eval().requires_grad_(False)
        self.updates = 0
        self._pairs: tuple | None = None  # (student, paired_state): found once, not every step

    @torch.no_grad()
    def logits(self, x: Tensor, student_logits: Tensor, step: int = 0) -> Tensor:
        return self.model(x).float().unsqueeze(0)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self._pairs is None or self._pairs[0] is not model:
            self._pairs = (model, paired_state(self.model, model))
        ema_step_(self._pairs[1], ema_decay_at(step, self.decay, self.warmup_steps))
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "model_name": self.model_name, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
