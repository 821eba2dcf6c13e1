"""Compressed teacher targets: a few token ids and their log-probs instead of V dense logits.

Dense logits cost 4 V bytes per token (200 KB at V = 50k), too much for the exchange between
workers or for a teacher-logits cache at LM scale. Two compressions, both at the KD temperature T:

- topk: the k most likely ids and their log-probs; the tail's total mass 1 - sum(p) is implied.
  The student's distribution is folded into the same k + 1 buckets (its k probabilities plus one
  tail bucket) before the divergence, so both sides stay distributions. Biased: the tail's shape
  is lost, and folding can only lower a divergence (data processing inequality).
- sampled: k ids drawn i.i.d. from the teacher (duplicates merged, weight = count / k). The
  forward-KL estimate sum_j w_j (log p_t(id_j) - log p_s(id_j)) is unbiased, and so is its
  gradient ("random sampling KD", arXiv 2503.16870). Forward KL only.

    target = compress(teacher_logits, temperature=2.0, kind="topk", k=16)
    per_position = sparse_kd(student_logits, target, temperature=2.0, divergence="forward_kl")
    wire = to_wire(target)          # compact tensors to send or store; from_wire(wire) back

losses.distill_loss takes a SparseTarget (or a list, one per teacher) where it takes dense logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import check_divergence, divergence_from_log_probs, masked_mean, per_position_kd

KINDS = ("topk", "sampled")
_LOGP_FLOOR = -6.0e4  # float16 holds down to -65504: a log-prob below becomes -inf on the wire


@dataclass
class SparseTarget:
    """A compressed teacher distribution at temperature `temperature` over `vocab` ids.

    ids (..., k) int64 token ids; logp (..., k) the teacher's tempered log-probs at those ids;
    weight (..., k) for 'sampled' only: count / k per unique drawn id, 0 at padding slots (then
    id 0, logp 0), None for 'topk'. The leading shape is the student's (B,) or (B, L), or has
    n_teachers in front (see unbind).
    """

    kind: str
    ids: Tensor
    logp: Tensor
    weight: Tensor | None
    vocab: int
    temperature: float

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def to(self, device: torch.device | str) -> "SparseTarget":
        w = None if self.weight is None else self.weight.to(device)
        return replace(self, ids=self.ids.to(device), logp=self.logp.to(device), weight=w)

    def kd(self, student_logits: Tensor, *, temperature: float, divergence: str, jsd_beta: float = 0.5) -> Tensor:
        """sparse_kd(student_logits, self, ...): how losses.distill_loss reads a compressed teacher."""
        return sparse_kd(student_logits, self, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta)

    def unbind(self) -> list["SparseTarget"]:
        """One SparseTarget per entry of the leading dim (teachers stacked, e.g. after an all-gather)."""
        ws = [None] * len(self.ids) if self.weight is None else self.weight.unbind(0)
        return [replace(self, ids=i, logp=lp, weight=w) for i, lp, w in zip(self.ids.unbind(0), self.logp.unbind(0), ws)]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: got {kind!r}; allowed: 'topk', 'sampled'")


def compress(teacher_logits: Tensor, *, temperature: float, kind: str, k: int,
             generator: torch.Generator | None = None) -> SparseTarget:
    """Compress raw teacher logits (..., V) at temperature T.

    topk: the k largest tempered log-probs. sampled: k ids drawn i.i.d. from softmax(logits / T)
    with torch.multinomial (pass a `generator` on the logits' device for reproducible draws),
    duplicates merged into unique ids with weight count / k, padded to k slots with weight 0 so
    every position has the same shape.
    """
    _check_kind(kind)
    vocab = teacher_logits.shape[-1]
    if k < 1 or (kind == "topk" and k > vocab):  # draws are with replacement: sampled k may exceed V
        raise ValueError(f"k: got {k}; allowed: 1 <= k <= vocab ({vocab}) for topk, k >= 1 for sampled")
    logp = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if kind == "topk":
        top, ids = logp.topk(k, dim=-1)
        return SparseTarget("topk", ids, top, None, vocab, float(temperature))
    lead = logp.shape[:-1]
    flat = logp.reshape(-1, vocab)
    draws = torch.multinomial(flat.exp(), k, replacement=True, generator=generator).sort(dim=-1).values
    # merge duplicates with fixed shapes: in each sorted row a new id opens the next slot
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = new.long().cumsum(-1) - 1
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(-1, slot, draws)  # padding slots keep id 0
    filled = counts > 0
    picked = flat.gather(-1, ids)
    top = torch.where(filled, picked, torch.zeros_like(picked))
    weight = counts.float() / k
    return SparseTarget("sampled", ids.view(*lead, k), top.view(*lead, k), weight.view(*lead, k), vocab,
                        float(temperature))


def fold_topk(student_logits: Tensor, target: SparseTarget, temperature: float) -> tuple[Tensor, Tensor]:
    """(log p_t, log p_s) over the same buckets: the k ids, plus one tail bucket when k < V.

    The student's tail is logsumexp over the logits not in the top k minus logsumexp over all:
    exact and stable (1 - sum(p) would cancel catastrophically when the k ids hold nearly all of
    the mass). The teacher's tail is 1 - sum(exp(logp)), clamped at 0 and renormalised (logp may
    have been rounded to float16 on the wire), then floored at float32's smallest normal number so
    that reverse KL stays finite when the k ids hold all the teacher's mass to float precision.
    """
    z = student_logits.float() / temperature
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)
    log_s = z.gather(-1, target.ids) - log_z
    log_t = target.logp.float()
    if target.k == target.vocab:  # nothing outside the k ids: no tail bucket (it would be log 0 - log 0)
        return log_t - torch.logsumexp(log_t, dim=-1, keepdim=True), log_s
    others = z.scatter(-1, target.ids, float("-inf"))
    log_s = torch.cat([log_s, torch.logsumexp(others, dim=-1, keepdim=True) - log_z], dim=-1)
    p_k = log_t.exp()
    total = p_k.sum(-1, keepdim=True)
    tail = (1.0 - total).clamp_min(0.0)
    log_norm = torch.log(torch.maximum(total, torch.ones_like(total)))
    log_tail = torch.log(tail.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.cat([log_t, log_tail], dim=-1) - log_norm, log_s


def _check_target(student_logits: Tensor, target: SparseTarget, temperature: float) -> None:
    _check_kind(target.kind)
    if target.vocab != student_logits.shape[-1]:
        raise ValueError(f"the sparse target's vocab is {target.vocab} but the student has {student_logits.shape[-1]} "
                         "classes; allowed: the same vocabulary")
    if target.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"the sparse target covers positions {tuple(target.ids.shape[:-1])} but the student's logits "
                         f"are {tuple(student_logits.shape)}; allowed: ids of shape (*logits.shape[:-1], k)")
    if not math.isclose(target.temperature, temperature, rel_tol=1e-6):
        raise ValueError(f"the sparse target was made at temperature {target.temperature} but the loss uses "
                         f"{temperature}; allowed: the same loss.temperature for both (log-probs are stored tempered)")


def sparse_kd(student_logits: Tensor, target: SparseTarget, *, temperature: float, divergence: str,
              jsd_beta: float = 0.5) -> Tensor:
    """The divergence at each position (student_logits.shape[:-1]) against a compressed teacher;
    no T^2 and no averaging (losses.distill_loss does both). Gradients reach the student only.

    topk: forward KL, reverse KL or JSD between the two distributions folded to k + 1 buckets
    (fold_topk). sampled: the unbiased forward-KL estimate sum_j w_j (logp_t_j - log p_s(id_j)),
    which may be negative at a single position; other divergences are refused.
    """
    check_divergence(divergence, jsd_beta)
    _check_target(student_logits, target, temperature)
    target = target.to(student_logits.device)
    if target.kind == "topk":
        log_t, log_s = fold_topk(student_logits, target, temperature)
        return divergence_from_log_probs(log_t, log_s, divergence=divergence, jsd_beta=jsd_beta)
    if divergence != "forward_kl":
        raise ValueError(f"loss.divergence: got {divergence!r}; sampled targets support forward_kl only (an unbiased "
                         "estimate needs expectations under the teacher); allowed: 'forward_kl', or topk targets")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, target.ids)
    w = target.weight.float()
    # where, not a product: a padding slot (w = 0) adds exactly 0 whatever its log-probs are
    return torch.where(w > 0, w * (target.logp.float() - log_s), torch.zeros_like(w)).sum(-1)


# ---- wire format -----------------------------------------------------------------------------

def id_dtype(vocab: int) -> torch.dtype:
    """The smallest integer dtype that holds ids 0 .. vocab - 1."""
    if vocab <= 256:
        return torch.uint8
    if vocab <= 32768:
        return torch.int16
    return torch.int32


def count_dtype(k: int) -> torch.dtype:
    """Sampled weights travel as exact integer counts (weight = count / k): the smallest dtype for 0 .. k."""
    if k <= 255:
        return torch.uint8
    if k <= 32767:
        return torch.int16
    return torch.int32


def bytes_per_token(kind: str, k: int, vocab: int) -> int:
    """Bytes one position costs on the wire: k ids (id_dtype) + k float16 log-probs, plus k counts
    (count_dtype) for 'sampled'."""
    _check_kind(kind)
    per_slot = torch.empty((), dtype=id_dtype(vocab)).element_size() + 2
    if kind == "sampled":
        per_slot += torch.empty((), dtype=count_dtype(k)).element_size()
    return k * per_slot


def dense_bytes_per_token(vocab: int) -> int:
    """Bytes of one position's dense float32 logits."""
    return 4 * vocab


def to_wire(target: SparseTarget) -> dict:
    """Compact tensors to send or store: "ids" (id_dtype), "logp" (float16), "counts" (sampled
    only, count_dtype), plus the plain values "kind", "vocab", "temperature" that from_wire needs
    (a fixed header, not counted by nbytes)."""
    d = {"kind": target.kind, "vocab": target.vocab, "temperature": target.temperature,
         "ids": target.ids.to(id_dtype(target.vocab)),
         "logp": target.logp.float().clamp_min(_LOGP_FLOOR).to(torch.float16)}
    if target.kind == "sampled":
        d["counts"] = torch.round(target.weight.float() * target.k).to(count_dtype(target.k))
    return d


def from_wire(d: dict) -> SparseTarget:
    """The SparseTarget of to_wire's dict (ids int64, logp float32, weight = count / k)."""
    _check_kind(d["kind"])
    ids = d["ids"].long()
    weight = d["counts"].float() / ids.shape[-1] if d["kind"] == "sampled" else None
    return SparseTarget(d["kind"], ids, d["logp"].float(), weight, int(d["vocab"]), float(d["temperature"]))


def nbytes(wire: dict) -> int:
    """Bytes of the tensors in a to_wire dict: bytes_per_token * positions."""
    return sum(t.numel() * t.element_size() for t in wire.values() if isinstance(t, Tensor))


# ---- how much the compression loses ----------------------------------------------------------

def reconstruct(target: SparseTarget) -> Tensor:
    """Full (..., V) log-probs of a topk target: the k stored probabilities, and the tail mass
    spread uniformly over the other V - k ids (log 0 = -inf where the tail is empty). Sampled
    targets hold no tail to spread: refused."""
    if target.kind != "topk":
        raise ValueError(f"reconstruct: got a {target.kind!r} target; allowed: 'topk' (a sample does not define the "
                         "rest of the distribution)")
    log_t = target.logp.float()
    lead = log_t.shape[:-1]
    if target.k == target.vocab:
        rest = log_t.new_full((*lead, target.vocab), float("-inf"))
        log_t = log_t - torch.logsumexp(log_t, dim=-1, keepdim=True)
    else:
        total = log_t.exp().sum(-1, keepdim=True)
        tail = (1.0 - total).clamp_min(0.0)
        log_norm = torch.log(torch.maximum(total, torch.ones_like(total)))
        log_each = torch.log(tail) - math.log(target.vocab - target.k) - log_norm  # -inf where tail is 0
        rest = log_each.expand(*lead, target.vocab).clone()
        log_t = log_t - log_norm
    return rest.scatter(-1, target.ids.to(rest.device), log_t)


def fidelity(teacher_logits: Tensor, student_logits: Tensor, target: SparseTarget, *, temperature: float,
             divergence: str, mask: Tensor | None = None, jsd_beta: float = 0.5) -> dict[str, float]:
    """What a compressed target loses, on one batch (all means over real positions, mask True):

    kl_dense_to_reconstructed: KL(p_dense || reconstruct(target)) at T (NaN for sampled);
    kd_dense, kd_sparse: the KD term (divergence per position, no T^2) of the same student against
    the dense teacher and against the target; kd_rel_error: |kd_sparse - kd_dense| / kd_dense.
    teacher_logits, student_logits (..., V); target made from teacher_logits.
    """
    with torch.no_grad():
        t, s = teacher_logits.float(), student_logits.float()
        kd_dense = masked_mean(per_position_kd(s, t.unsqueeze(0), temperature=temperature, multi_teacher="mean_kl",
                                                divergence=divergence, jsd_beta=jsd_beta), mask).item()
        kd_sparse = masked_mean(sparse_kd(s, target, temperature=temperature, divergence=divergence,
                                           jsd_beta=jsd_beta), mask).item()
        if target.kind == "topk":
            log_dense = F.log_softmax(t / temperature, dim=-1)
            kl_rec = masked_mean(divergence_from_log_probs(log_dense, reconstruct(target.to(t.device))), mask).item()
        else:
            kl_rec = float("nan")
    err = abs(kd_sparse - kd_dense)
    rel = err / kd_dense if kd_dense > 0 else (0.0 if err == 0 else float("inf"))
    return {"kl_dense_to_reconstructed": kl_rec, "kd_dense": kd_dense, "kd_sparse": kd_sparse, "kd_rel_error": rel}
