"""On-policy distillation (GKD, MiniLLM): the student continues prompts itself, and the teacher
scores the states the student actually visits (config: onpolicy).

Per step, a share `lmbda` of the batch's sequences (the same rows for every peer, chosen by the
run's seed and the step) is cut to a prompt (the window's first `prompt_len` tokens) and each
peer continues it by sampling from itself (models.generate, with a key-value cache). A peer then
trains on its own batch: the data rows as they were, and its generated rows, where

- the labels are ignored everywhere (no cross-entropy on the student's own draws: that would
  reinforce its mistakes), and
- the KD term counts at every state from the prompt's last token to the last generated token but
  one: position j's distribution is the one the student drew token j + 1 from, so the divergence
  (or the policy-gradient estimator) is taken exactly where the student chose. Prompt tokens
  and padding never count.

The teachers then score each peer's own batch (Teacher.logits_on): a frozen teacher in process
or through its service, the other peers (on-policy mutual learning), an EMA or a snapshot.
Everything here is a pure function of (seed, step, peer) and the weights, so a resumed run and
a packed or spread cohort draw the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config.schema import Config
from ..data.datasets import IGNORE_INDEX
from ..distill.sparse import mix64
from ..models.generate import Sampling, generate

PAD = 0
"""The padding id of the built-in token sequences (data.SequenceTensors)."""


@dataclass
class Rollout:
    """One peer's batch for one step."""

    x: Tensor
    """(B, L) token ids: the data rows, and the peer's own continuations of the prompts."""
    y: Tensor
    """(B, L) labels of the cross-entropy term: the data's next tokens; IGNORE_INDEX on generated rows."""
    kd_mask: Tensor
    """(B, L) where the KD term counts: real positions of data rows, the states the student drew from."""
    generated: Tensor
    """(B,) the rows the student continued."""
    pg_tokens: Tensor | None = None
    """(B, L) with onpolicy.estimator 'policy_gradient': the drawn token after each position."""
    pg_mask: Tensor | None = None
    """(B, L) where the policy-gradient estimator replaces the divergence (the generated states)."""
    new_tokens: int = 0
    """Tokens generated for this batch."""


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (the run's seed, the step, the peer)."""
    key = torch.tensor(0, dtype=torch.int64)
    for p in parts:
        key = mix64(key ^ torch.tensor(int(p), dtype=torch.int64))
    return int(key) & (2**63 - 1)


class OnPolicy:
    """Makes each peer's rollout from the step's data batch."""

    def __init__(self, cfg: Config, seq_len: int, steps_per_epoch: int = 1):
        op = cfg.onpolicy
        self.cfg, self.op, self.seq_len = cfg, op, seq_len
        self.first_step = round(op.start_epochs * steps_per_epoch)  # off-policy before it (onpolicy.start_epochs)
        self.sampling = Sampling(max_new_tokens=op.max_new_tokens or seq_len, temperature=op.temperature,
                                 top_k=op.top_k, top_p=op.top_p, pad_id=PAD)

    def rows(self, batch_size: int, step: int, device: torch.device) -> Tensor:
        """(B,) bool: which rows of step `step` the students continue (each with chance lmbda)."""
        if self.op.lmbda == 0 or step < self.first_step:
            return torch.zeros(batch_size, dtype=torch.bool, device=device)
        g = torch.Generator().manual_seed(seed_of(self.cfg.train.seed, step, 7))
        return (torch.rand(batch_size, generator=g) < self.op.lmbda).to(device)

    def rollout(self, model: nn.Module, x: Tensor, y: Tensor, step: int, peer: int) -> Rollout:
        """The peer's batch: rows chosen by `rows` continued by `model` from their prompts."""
        gen = self.rows(len(x), step, x.device)
        if self.op.mask_prompts:  # data rows learn after their prompt only, as generated rows do
            y = torch.where(torch.arange(y.shape[1], device=y.device) < self.op.prompt_len - 1, IGNORE_INDEX, y)
        kd_mask = y != IGNORE_INDEX
        if not bool(gen.any()):
            return Rollout(x, y, kd_mask, gen)
        idx = gen.nonzero().squeeze(1)
        prompts = x[idx, : self.op.prompt_len]
        lengths = (prompts != PAD).sum(1).clamp_min(1)
        out = generate(model, prompts, lengths, self.sampling, seed=seed_of(self.cfg.train.seed, step, peer))
        x, y, kd_mask = x.clone(), y.clone(), kd_mask.clone()
        x[idx] = PAD
        x[idx, : out.tokens.shape[1]] = out.tokens
        y[idx] = IGNORE_INDEX
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        # position j predicts token j + 1: the states from the prompt's last token to the one before the last drawn
        states = (pos >= (out.prompt_lengths - 1).unsqueeze(1)) & (pos < (out.lengths - 1).unsqueeze(1))
        kd_mask[idx] = states
        r = Rollout(x, y, kd_mask, gen, new_tokens=int((out.lengths - out.prompt_lengths).sum()))
        if self.op.estimator == "policy_gradient":
            r.pg_tokens = torch.cat([x[:, 1:], torch.full_like(x[:, :1], PAD)], dim=1)
            r.pg_mask = torch.zeros_like(kd_mask)
            r.pg_mask[idx] = states
        return r


def repetition(tokens: Tensor, n: int = 4) -> float:
    """The share of a continuation's n-grams that already occurred earlier in it (0: none
    repeated; a model stuck in a loop approaches 1)."""
    seq = tokens.tolist()
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def generation_metrics(model: nn.Module, prompts: Tensor, teacher_score, sampling: Sampling, prompt_len: int, *,
                       seed: int, autocast) -> tuple[dict[str, float], list[tuple[Tensor, Tensor]]]:
    """What a student writes, on validation prompts (the windows' first prompt_len tokens):
    val_gen_repetition (repeated 4-grams of its continuations) and, where the worker holds a
    dense teacher (teacher_score(x) -> (1, B, L, V), else None), val_gen_teacher_nll (the
    teacher's mean NLL per generated token) and val_gen_reverse_kl (the student's exact
    KL(p_student || p_teacher) over the vocabulary at every state it generated from, T = 1).
    Also returns (prompt, continuation) id pairs, for the samples file."""
    lengths = (prompts[:, :prompt_len] != PAD).sum(1).clamp_min(1)
    out = generate(model, prompts[:, :prompt_len], lengths, sampling, seed=seed)
    pairs = [(out.tokens[i, : int(lengths[i])], out.continuation(i)) for i in range(len(prompts))]
    metrics = {"val_gen_repetition": sum(repetition(c) for _, c in pairs) / max(1, len(pairs))}
    z_t = teacher_score(out.tokens)
    if z_t is None:
        return metrics, pairs
    pos = torch.arange(out.tokens.shape[1], device=prompts.device).unsqueeze(0)
    states = (pos >= (out.prompt_lengths - 1).unsqueeze(1)) & (pos < (out.lengths - 1).unsqueeze(1))
    was = model.training
    model.eval()
    with autocast():
        z_s = model(out.tokens).float()
    model.train(was)
    log_t = torch.log_softmax(z_t[0].float(), -1)
    log_s = torch.log_softmax(z_s, -1)
    nxt = torch.cat([out.tokens[:, 1:], torch.full_like(out.tokens[:, :1], PAD)], dim=1)
    nll = -log_t.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    rkl = (log_s.exp() * (log_s - log_t)).sum(-1)
    n = states.sum().clamp_min(1)
    metrics["val_gen_teacher_nll"] = float(torch.where(states, nll, 0).sum() / n)
    metrics["val_gen_reverse_kl"] = float(torch.where(states, rkl, 0).sum() / n)
    return metrics, pairs
