"""Self-distillation from the last mini-batch (DLB, Shen et al. 2022): the cheap per-sample variant.

Each step trains on the fresh batch plus the previous step's fresh samples, so every sample
is seen in two consecutive steps. The second time, its soft target is the student's own
detached prediction from the step before: consistency between consecutive iterations, with no
extra forward pass, no teacher network and no traffic. (With train.batch_size = b this is
DLB's batch of 2b: b new samples and b repeated ones.)

The teacher owns the batch composition (`prepare_batch`) and the memory of the last batch,
so the loop stays the same for every mode. The repeated rows get the logits remembered from
the previous step as targets; the fresh rows get the student's own detached logits, for
which KL(p || p) = 0 and its gradient is 0, so they add nothing to the KD term: only the
repeated rows are distilled, as in the paper. Because the KD term is averaged over all 2b
rows, DLB's CE + alpha * T^2 * KL_repeated corresponds to kd_weight = 2 alpha / (1 + 2 alpha)
(alpha = 1: kd_weight = 2/3), up to the overall factor 1 - kd_weight.

One difference from the paper: with data.augment the repeated samples come back as the same
augmented images (the batch arrives augmented), not as a fresh augmentation of each image.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import PeerSource, TeacherContext


class LastBatchTeacher(PeerSource):
    def __init__(self, ctx: TeacherContext, peer: int):
        self.device = ctx.device
        self.last_x: Tensor | None = None
        self.last_y: Tensor | None = None
        self.last_logits: Tensor | None = None
        """The student's logits for last_x, from the step in which they were fresh."""
        self.fresh: tuple[Tensor, Tensor] | None = None
        self.n_fresh = 0

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This step's batch: the fresh samples first, then last step's fresh samples again."""
        self.fresh, self.n_fresh = (x, y), len(x)
        if self.last_x is None:
            return x, y
        return torch.cat([x, self.last_x]), torch.cat([y, self.last_y])

    @torch.no_grad()
    def logits(self, x: Tensor, student_logits: Tensor, step: int = 0) -> Tensor | None:
        z = student_logits.detach().float()
        targets = None
        if self.last_x is not None:
            # fresh rows target themselves (zero KL, zero gradient); repeated rows target last step
            targets = torch.cat([z[: self.n_fresh], self.last_logits]).unsqueeze(0)
        # remember this step's fresh samples and the predictions made for them now
        self.last_x, self.last_y = self.fresh
        self.last_logits = z[: self.n_fresh].clone()
        return targets

    def reference(self, x: Tensor) -> None:
        return None  # the teacher is the student's own last step: nothing dense to compare apart from it

    def state_dict(self) -> dict:
        if self.last_x is None:
            return {}
        return {"x": self.last_x.cpu(), "y": self.last_y.cpu(), "logits": self.last_logits.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.last_x, self.last_y = state["x"].to(self.device), state["y"].to(self.device)
            self.last_logits = state["logits"].to(self.device)
