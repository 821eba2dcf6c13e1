"""The distillation loss (Hinton, Vinyals, Dean 2015), as pure functions.

    loss = ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

with ce_weight = 1 - kd_weight by default (Hinton's convex mix). The online-distillation papers
(DML, ONE, MCL-OKD) keep the CE weight at 1: ce_weight = 1, kd_weight = 1 gives CE + T^2 KL. Set
apart, the two weights keep "how much to learn from the teachers" apart from "how fast to learn
from the labels": the convex mix at kd_weight 0.5 halves the label gradient, which acts like
halving the learning rate for the label term.

The T^2 factor keeps the size of the soft-target gradient constant as T changes:
d loss / d z_s = kd_weight * T * (softmax(z_s / T) - softmax(z_t / T)) / B for the KD part.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_to_student(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)) per sample, shape (..., B). Teacher is detached."""
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def kd_term(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float, multi_teacher: str) -> Tensor:
    """Mean-over-batch KL from (n_teachers, B, C) teacher logits to (B, C) student logits.

    'mean_kl' averages the KL to each teacher (deep mutual learning); 'mean_probs' takes the
    KL to the teachers' mean distribution (an ensemble teacher).
    """
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be (n_teachers, B, C), got {tuple(teacher_logits.shape)}")
    if multi_teacher == "mean_kl":
        return kl_to_student(teacher_logits, student_logits.unsqueeze(0), temperature).mean()
    if multi_teacher == "mean_probs":
        p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=-1).mean(0)
        log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        return (torch.xlogy(p_t, p_t) - p_t * log_p_s).sum(-1).mean()
    raise ValueError(f"multi_teacher: got {multi_teacher!r}; allowed: 'mean_kl', 'mean_probs'")


def distill_loss(
    logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    temperature: float,
    kd_weight: float,
    multi_teacher: str = "mean_kl",
    ce_weight: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hinton KD loss and its parts (detached, for logging).

    teacher_logits is (n_teachers, B, C), or None when there is no teacher at this step
    (the independent baseline, or before a teacher exists): the loss is then plain CE.
    ce_weight None is the convex mix, 1 - kd_weight.
    """
    ce = F.cross_entropy(logits.float(), labels)
    if teacher_logits is None:
        return ce, {"ce": ce.detach(), "kd": torch.zeros((), device=logits.device)}
    kd = kd_term(logits, teacher_logits, temperature=temperature, multi_teacher=multi_teacher)
    w_ce = 1.0 - kd_weight if ce_weight is None else ce_weight
    loss = w_ce * ce + kd_weight * temperature**2 * kd
    return loss, {"ce": ce.detach(), "kd": kd.detach()}
