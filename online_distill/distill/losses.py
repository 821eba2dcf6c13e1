"""The distillation loss (Hinton, Vinyals, Dean 2015), as pure functions.

    loss = ce_weight * CE(z_s, y) + kd_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

with ce_weight = 1 - kd_weight by default (Hinton's convex mix). The online-distillation papers
(DML, ONE, MCL-OKD) keep the CE weight at 1: ce_weight = 1, kd_weight = 1 gives CE + T^2 KL. Set
apart, the two weights keep "how much to learn from the teachers" apart from "how fast to learn
from the labels": the convex mix at kd_weight 0.5 halves the label gradient, which acts like
halving the learning rate for the label term.

The T^2 factor keeps the size of the soft-target gradient constant as T changes:
d loss / d z_s = kd_weight * T * (softmax(z_s / T) - softmax(z_t / T)) / B for the KD part.

Language models are classifiers at every position: logits (B, L, C), labels (B, L) with
ignore_index (-100) at padding. CE and the KD term are means over the real positions (B above
becomes the number of real tokens), so padding never counts. The KL may be replaced by reverse KL
(MiniLLM) or GKD's generalized JSD(beta), and the teacher may come compressed (sparse.py: top-k or
sampled token ids with their log-probs) instead of as dense logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
MULTI_TEACHER = ("mean_kl", "mean_probs")


def kl_to_student(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)) per sample, shape (..., B). Teacher is detached."""
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) summed over the last dim, from log-probs; a bucket with p = 0 adds 0 (also where
    log q is -inf there), so folded distributions with an empty bucket stay finite."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def check_divergence(divergence: str, jsd_beta: float) -> None:
    """One line naming the field and what it may hold."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"loss.divergence: got {divergence!r}; allowed: {', '.join(map(repr, DIVERGENCES))}")
    if divergence == "jsd" and not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"loss.jsd_beta: got {jsd_beta!r}; allowed: a number in [0, 1]")


def divergence_from_log_probs(log_p_t: Tensor, log_p_s: Tensor, *, divergence: str = "forward_kl",
                              jsd_beta: float = 0.5) -> Tensor:
    """The divergence between teacher and student per position, summed over the last dim.

    log_p_t, log_p_s: log-probabilities (already temperature-softened) of the same shape (..., C);
    the teacher is detached here. Also used on top-k targets folded to k + 1 buckets (sparse.py).

    forward_kl: KL(p_t || p_s) (Hinton; mode-covering). reverse_kl: KL(p_s || p_t) (MiniLLM;
    mode-seeking). jsd: GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024, Eq. 1),
    with TRL's convention (huggingface/trl, trl/trainer/gkd_trainer.py,
    GKDTrainer.generalized_jsd_loss):
        m = beta * p_t + (1 - beta) * p_s
        JSD(beta) = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)
    and, as there, beta = 0 is forward KL(p_t || p_s) and beta = 1 is reverse KL(p_s || p_t).
    These endpoints are a switch, not a limit: the formula itself goes to 0 at both ends.
    beta = 0.5 is the symmetric JSD (bounded by log 2).
    """
    check_divergence(divergence, jsd_beta)
    log_p_t = log_p_t.detach()
    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0.0):
        return _kl(log_p_t, log_p_s)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1.0):
        return _kl(log_p_s, log_p_t)
    # log m by logaddexp (TRL: logsumexp of the stack), stable where one of the two is tiny; broadcasts
    log_m = torch.logaddexp(log_p_s + math.log1p(-jsd_beta), log_p_t + math.log(jsd_beta))
    return jsd_beta * _kl(log_p_t, log_m) + (1.0 - jsd_beta) * _kl(log_p_s, log_m)


def per_position_kd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float, multi_teacher: str,
                    divergence: str = "forward_kl", jsd_beta: float = 0.5) -> Tensor:
    """The divergence at each position, shape student_logits.shape[:-1]: no T^2, no averaging.

    student_logits (..., C); teacher_logits (n_teachers, ..., C) dense. 'mean_kl' averages the
    divergence to each teacher (deep mutual learning); 'mean_probs' takes the divergence to the
    teachers' mean distribution (an ensemble teacher).
    """
    if teacher_logits.dim() != student_logits.dim() + 1 or teacher_logits.shape[1:] != student_logits.shape:
        raise ValueError(f"teacher_logits must be (n_teachers, {', '.join(map(str, student_logits.shape))}) "
                         f"for student logits {tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    if multi_teacher not in MULTI_TEACHER:
        raise ValueError(f"multi_teacher: got {multi_teacher!r}; allowed: 'mean_kl', 'mean_probs'")
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if multi_teacher == "mean_probs":  # log of the mean of the teachers' probabilities
        log_p_t = (torch.logsumexp(log_p_t, dim=0) - math.log(log_p_t.shape[0])).unsqueeze(0)
    return divergence_from_log_probs(log_p_t, log_p_s.unsqueeze(0), divergence=divergence, jsd_beta=jsd_beta).mean(0)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the real positions; 0 (not NaN) when there are none. `where`, not a product, so
    whatever sits at a padded position (even inf) cannot reach the sum."""
    if mask is None:
        return values.mean()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp_min(1)


def kd_term(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float, multi_teacher: str,
            divergence: str = "forward_kl", jsd_beta: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """Mean over real positions of the per-position divergence (per_position_kd), no T^2.

    teacher_logits (n_teachers, *student_logits.shape); mask (student_logits.shape[:-1]) is True
    at real positions, None for all of them.
    """
    return masked_mean(per_position_kd(student_logits, teacher_logits, temperature=temperature,
                                        multi_teacher=multi_teacher, divergence=divergence, jsd_beta=jsd_beta), mask)


class DenseTarget:
    """Dense teacher logits (n_teachers, *student_logits.shape) as the loss reads every teacher
    target: `per_position` gives the divergence at each position. Its compressed counterparts
    (sparse.SparseTarget, sparse.SparseTeachers) answer the same call, so the loss and the loop
    never ask which form a teacher came in."""

    def __init__(self, logits: Tensor):
        self.logits = logits

    def per_position(self, student_logits: Tensor, *, temperature: float, multi_teacher: str,
                     divergence: str = "forward_kl", jsd_beta: float = 0.5) -> Tensor:
        return per_position_kd(student_logits, self.logits, temperature=temperature, multi_teacher=multi_teacher,
                               divergence=divergence, jsd_beta=jsd_beta)

    def to(self, device: torch.device | str) -> DenseTarget:
        return DenseTarget(self.logits.to(device))

    def token_log_prob(self, tokens: Tensor, *, temperature: float) -> Tensor:
        """The teachers' tempered log-prob of `tokens` (shape of the student's positions), averaged
        over teachers: what the policy-gradient estimator reads (policy_gradient_kd)."""
        log_p = F.log_softmax(self.logits.detach().float() / temperature, dim=-1)
        idx = tokens.unsqueeze(0).unsqueeze(-1).expand(len(log_p), *tokens.shape, 1)
        return log_p.gather(-1, idx).squeeze(-1).mean(0)

    def __len__(self) -> int:
        return len(self.logits)


def policy_gradient_kd(student_logits: Tensor, target, tokens: Tensor, *, temperature: float) -> tuple[Tensor, Tensor]:
    """On-policy distillation's per-token policy-gradient estimator, per position: (surrogate, ratio).

    tokens[..., j] is the token the student drew after position j. ratio = log p_s(a) - log p_t(a)
    (both tempered, stopped) is a one-sample estimate of KL(p_s || p_t) at that state, and its
    negative the per-token reward (Thinking Machines' on-policy distillation; verl's OPD). The
    surrogate ratio * log p_s(a) has, for a ~ p_s, the expected gradient of the reverse KL at the
    state (sum_a p_s grad log p_s = 0 removes the other term), so only the drawn token's
    log-prob moves, and the teacher's log-prob of that token is all it needs.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    log_p_t = target.token_log_prob(tokens, temperature=temperature)
    ratio = (log_p_s - log_p_t).detach()
    return ratio * log_p_s, ratio


def distill_loss(
    logits: Tensor,
    teacher_logits,
    labels: Tensor,
    *,
    temperature: float,
    kd_weight: float,
    multi_teacher: str = "mean_kl",
    ce_weight: float | None = None,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    kd_mask: Tensor | None = None,
    pg_tokens: Tensor | None = None,
    pg_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KD loss and its parts (detached, for logging), for classifiers and language models.

    logits: (B, C), or (B, L, C) for a sequence model (a classifier at every position).
    labels: (B,) or (B, L); a label equal to ignore_index marks padding, which never counts.
    teacher_logits: dense (n_teachers, *logits.shape) or a DenseTarget of them; a compressed
    target (sparse.SparseTarget: one teacher, or teachers stacked in front; sparse.SparseTeachers:
    one per teacher); or None when there is no teacher at this step (the independent baseline, or
    before a teacher exists): plain CE.
    ce_weight None is the convex mix, 1 - kd_weight. divergence: 'forward_kl', 'reverse_kl' or
    'jsd' (with jsd_beta); see divergence_from_log_probs.

    CE and the KD term are both means over real positions (the KD term: the divergence per
    position summed over classes), so a padded batch gives the loss of the unpadded one:
        loss = ce_weight * CE + kd_weight * T^2 * KD
    parts: "ce", "kd" (without T^2), "tokens" (real positions, a float32 tensor: for
    token-weighted sums across batches), "kd_tokens" (the positions the KD term counted).

    On-policy training (training/onpolicy.py) sets the KD term's positions apart from the
    labels': kd_mask (the student's own continuations count for the KD term but carry no label);
    with pg_tokens and pg_mask (the drawn tokens, and where they were drawn), the KD term there
    is policy_gradient_kd's surrogate instead of the divergence, and "kd" reports its estimate of
    the reverse KL.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} for logits {tuple(logits.shape)}, "
                         f"got {tuple(labels.shape)}")
    mask = labels != ignore_index
    tokens = mask.sum().float()
    kd_mask = mask if kd_mask is None else kd_mask
    flat = logits.float().reshape(-1, logits.shape[-1])
    # sum / count rather than reduction="mean": an all-padding batch gives 0, not NaN
    ce = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="sum") / tokens.clamp_min(1)
    if teacher_logits is None:
        return ce, {"ce": ce.detach(), "kd": torch.zeros((), device=logits.device), "tokens": tokens,
                    "kd_tokens": kd_mask.sum().float()}
    check_divergence(divergence, jsd_beta)
    # plain tensors are the dense form (the Python API's convenience); every other form is a
    # target object that answers per_position itself (DenseTarget, sparse.SparseTarget/-Teachers)
    target = DenseTarget(teacher_logits) if isinstance(teacher_logits, Tensor) else teacher_logits
    if not hasattr(target, "per_position"):
        raise ValueError(f"teacher_logits: got {type(teacher_logits).__name__}; allowed: a tensor (n_teachers, "
                         f"{', '.join(map(str, logits.shape))}), a teacher target (losses.DenseTarget, "
                         "sparse.SparseTarget, sparse.SparseTeachers), or None")
    per = target.per_position(logits, temperature=temperature, multi_teacher=multi_teacher, divergence=divergence,
                              jsd_beta=jsd_beta)
    shown = per.detach()
    if pg_mask is not None:
        surrogate, ratio = policy_gradient_kd(logits, target, pg_tokens, temperature=temperature)
        per, shown = torch.where(pg_mask, surrogate, per), torch.where(pg_mask, ratio, shown)
    kd = masked_mean(per, kd_mask)
    w_ce = 1.0 - kd_weight if ce_weight is None else ce_weight
    loss = w_ce * ce + kd_weight * temperature**2 * kd
    return loss, {"ce": ce.detach(), "kd": masked_mean(shown, kd_mask), "tokens": tokens,
                  "kd_tokens": kd_mask.sum().float()}
