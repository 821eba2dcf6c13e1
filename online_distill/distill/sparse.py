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

Log-probs travel as float16 (bits=16), or as one byte each (bits=8: sqrt-companded over
[-16, 0] nats, finest near 0), so at V = 256 a slot costs 2 bytes and k = 10 fits in 2% of dense.
An 8-bit top-k spends its first slot on the tail's mass, not on the top token's probability,
which is then 1 - tail - the rest: the tail (the one bucket the student's tail is matched to)
keeps a few percent of relative precision even when the top token holds 99.9% of the mass. compress
makes the codes itself, so a target is the same numbers live, exchanged or cached.

    target = compress(teacher_logits, temperature=2.0, kind="topk", k=16)
    per_position = sparse_kd(student_logits, target, temperature=2.0, divergence="forward_kl")
    wire = to_wire(target)          # compact tensors to send or store; from_wire(wire) back

losses.distill_loss takes a SparseTarget (one teacher, or teachers stacked in front) or a
SparseTeachers (one target per teacher) where it takes dense logits: all answer per_position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import MULTI_TEACHER, check_divergence, divergence_from_log_probs, masked_mean, per_position_kd

KINDS = ("topk", "sampled")
BITS = (16, 8)
"""How a log-prob travels: float16, or one byte on a companded grid (quantize_logp)."""
_LOGP_FLOOR = -6.0e4  # float16 holds down to -65504: a log-prob below becomes -inf on the wire
_LOG_RANGE = 16.0  # 8-bit log-probs cover [-16, 0] nats; p < 1.1e-7 is stored as e^-16


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
    bits: int = 16
    """How logp travels (to_wire): 16 float16, 8 one byte (encode_logp8; logp is decoded from them)."""
    codes: Tensor | None = None
    """bits 8: the uint8 codes logp was decoded from, what to_wire sends (re-encoding the decoded
    floats could move a tiny tail's code by one)."""

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def to(self, device: torch.device | str) -> SparseTarget:
        w = None if self.weight is None else self.weight.to(device)
        c = None if self.codes is None else self.codes.to(device)
        return replace(self, ids=self.ids.to(device), logp=self.logp.to(device), weight=w, codes=c)

    def per_position(self, student_logits: Tensor, *, temperature: float, multi_teacher: str = "mean_kl",
                     divergence: str = "forward_kl", jsd_beta: float = 0.5) -> Tensor:
        """The divergence at each position, as losses.distill_loss reads every target: one
        teacher, or teachers stacked in a leading dim (then as SparseTeachers)."""
        if self.ids.dim() == student_logits.dim() + 1:
            return SparseTeachers(self.unbind()).per_position(student_logits, temperature=temperature,
                                                               multi_teacher=multi_teacher, divergence=divergence,
                                                               jsd_beta=jsd_beta)
        return sparse_kd(student_logits, self, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta)

    def token_log_prob(self, tokens: Tensor, *, temperature: float) -> Tensor:
        """The teacher's log-prob of `tokens` (the student's positions) from its top-k: exact for an
        id in the top k, else the tail's mass spread evenly over the V - k ids outside it (the
        policy-gradient estimator's reading, losses.policy_gradient_kd). Teachers stacked in
        front are averaged."""
        if self.kind != "topk":
            raise ValueError(f"the policy-gradient estimator reads a teacher's log-prob of one token, which "
                             f"{self.kind!r} targets do not hold; allowed: dense or top-k teacher outputs")
        if self.ids.dim() == tokens.dim() + 2:  # teachers stacked in front of the positions and the k slots
            return SparseTeachers(self.unbind()).token_log_prob(tokens, temperature=temperature)
        hit = self.ids == tokens.unsqueeze(-1)
        inside = torch.where(hit, self.logp.float(), torch.zeros_like(self.logp, dtype=torch.float32)).sum(-1)
        tail = (1 - self.logp.float().exp().sum(-1)).clamp_min(1e-12)
        return torch.where(hit.any(-1), inside, tail.log() - math.log(max(1, self.vocab - self.k)))

    def unbind(self) -> list[SparseTarget]:
        """One SparseTarget per entry of the leading dim (teachers stacked, e.g. after an all-gather)."""
        ws = [None] * len(self.ids) if self.weight is None else self.weight.unbind(0)
        cs = [None] * len(self.ids) if self.codes is None else self.codes.unbind(0)
        return [replace(self, ids=i, logp=lp, weight=w, codes=c)
                for i, lp, w, c in zip(self.ids.unbind(0), self.logp.unbind(0), ws, cs)]


class SparseTeachers(list):
    """Compressed targets of several teachers, one SparseTarget each (their top-k sets differ, so
    they do not stack): the divergence to each, averaged ('mean_kl', deep mutual learning)."""

    def per_position(self, student_logits: Tensor, *, temperature: float, multi_teacher: str = "mean_kl",
                     divergence: str = "forward_kl", jsd_beta: float = 0.5) -> Tensor:
        if multi_teacher not in MULTI_TEACHER:
            raise ValueError(f"multi_teacher: got {multi_teacher!r}; allowed: 'mean_kl', 'mean_probs'")
        if multi_teacher == "mean_probs" and len(self) > 1:
            # top-k sets differ per teacher and samples carry no other teacher's probabilities, so the
            # mean distribution is not representable from compressed targets
            raise ValueError(f"multi_teacher: got 'mean_probs' with {len(self)} compressed (sparse) teachers; "
                             "allowed: 'mean_kl', or dense teacher logits")
        return torch.stack([t.per_position(student_logits, temperature=temperature, divergence=divergence,
                                           jsd_beta=jsd_beta) for t in self]).mean(0)

    def to(self, device: torch.device | str) -> SparseTeachers:
        return SparseTeachers(t.to(device) for t in self)

    def token_log_prob(self, tokens: Tensor, *, temperature: float) -> Tensor:
        return torch.stack([t.token_log_prob(tokens, temperature=temperature) for t in self]).mean(0)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: got {kind!r}; allowed: 'topk', 'sampled'")


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits: got {bits!r}; allowed: 16 (float16 log-probs) or 8 (one byte each)")


def quantize_logp(logp: Tensor) -> Tensor:
    """Log-probs (<= 0) as uint8 codes q = round(255 sqrt(-logp / 16)), clamped to [-16, 0]: the
    step in log p is 2 sqrt(16 |logp|) / 255: 0.010 nats at p = 0.9, 0.054 at p = 0.05."""
    u = (-logp.double()).clamp(0.0, _LOG_RANGE).div(_LOG_RANGE).sqrt()
    return torch.round(u * 255.0).to(torch.uint8)


def dequantize_logp(q: Tensor) -> Tensor:
    """The log-probs (float64) of quantize_logp's codes: -16 (q / 255)^2."""
    return -_LOG_RANGE * (q.double() / 255.0) ** 2


def encode_logp8(kind: str, logp: Tensor) -> Tensor:
    """A target's (..., k) log-probs as uint8 codes. topk: slot 0 (the top token) holds log(tail
    mass) instead, tail = 1 - sum(p), computed in float64; sampled: the log-probs as they are."""
    lp = logp.double()
    if kind == "topk":
        tail = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(0.0).log()  # log 0 = -inf: code 255
        lp = torch.cat([tail, lp[..., 1:]], dim=-1)
    return quantize_logp(lp)


def decode_logp8(kind: str, codes: Tensor) -> Tensor:
    """encode_logp8's codes as float32 log-probs; topk: the top token's p = 1 - tail - the others
    (floored at float32's smallest normal number)."""
    lp = dequantize_logp(codes)
    if kind == "topk":
        top = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(torch.finfo(torch.float32).tiny)
        lp = torch.cat([top.log(), lp[..., 1:]], dim=-1)
    return lp.float()


def compress(teacher_logits: Tensor, *, temperature: float, kind: str, k: int,
             generator: torch.Generator | None = None, bits: int = 16, row_keys: Tensor | None = None) -> SparseTarget:
    """Compress raw teacher logits (..., V) at temperature T.

    topk: the k largest tempered log-probs. sampled: k ids drawn i.i.d. from softmax(logits / T)
    with torch.multinomial (pass a `generator` on the logits' device for reproducible draws),
    duplicates merged into unique ids with weight count / k, padded to k slots with weight 0 so
    every position has the same shape. bits=8: the log-probs rounded to the one-byte grid
    (quantize_logp), so the target is exactly what its wire form carries.

    row_keys (int64, one per leading row, e.g. per example): sampled draws come from counter-based
    uniforms of (row key, position, draw) instead of a generator (keyed_uniforms), so a row's
    draws do not depend on the batch it sits in, the step, or the device: the same example gives
    the same sample live, exchanged, from a service and from a cache.
    """
    _check_kind(kind)
    _check_bits(bits)
    target = _compress(teacher_logits, temperature=temperature, kind=kind, k=k, generator=generator, row_keys=row_keys)
    if bits == 8:
        codes = encode_logp8(kind, target.logp)
        target = replace(target, logp=decode_logp8(kind, codes), bits=8, codes=codes)
    return target


def _compress(teacher_logits: Tensor, *, temperature: float, kind: str, k: int,
              generator: torch.Generator | None, row_keys: Tensor | None = None) -> SparseTarget:
    vocab = teacher_logits.shape[-1]
    if k < 1 or (kind == "topk" and k > vocab):  # draws are with replacement: sampled k may exceed V
        raise ValueError(f"k: got {k}; allowed: 1 <= k <= vocab ({vocab}) for topk, k >= 1 for sampled")
    logp = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if kind == "topk":
        top, ids = logp.topk(k, dim=-1)
        return SparseTarget("topk", ids, top, None, vocab, float(temperature))
    lead = logp.shape[:-1]
    flat = logp.reshape(-1, vocab)
    if row_keys is None:
        draws = torch.multinomial(flat.exp(), k, replacement=True, generator=generator)
    else:
        draws = _keyed_draws(flat, row_keys.to(flat.device), k)
    draws = draws.sort(dim=-1).values
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


_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch holds."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping arithmetic): a bijection whose output bits
    each depend on every input bit, the same on every device."""
    x = x + _i64(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _i64(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _i64(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def keyed_uniforms(row_keys: Tensor, positions: int, k: int) -> Tensor:
    """Uniforms in [0, 1), float64, shape (rows, positions, k): a pure function of (row key,
    position, draw index), a counter-based generator (as Philox is) built from mix64."""
    pos = torch.arange(positions, device=row_keys.device, dtype=torch.int64).view(1, -1, 1)
    j = torch.arange(k, device=row_keys.device, dtype=torch.int64).view(1, 1, -1)
    counter = mix64(row_keys.view(-1, 1, 1) ^ mix64(pos * k + j))
    return _shr(mix64(counter), 11).double() * 2.0**-53


def _keyed_draws(flat_logp: Tensor, row_keys: Tensor, k: int) -> Tensor:
    """k ids per position of (rows * positions, V) log-probs, drawn by inverse CDF from
    keyed_uniforms: rows are row_keys' entries, each with the same number of positions."""
    rows = len(row_keys)
    positions = len(flat_logp) // max(1, rows)
    u = keyed_uniforms(row_keys, positions, k).reshape(-1, k)
    cdf = flat_logp.double().exp().cumsum(-1)
    draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return draws.clamp_max(flat_logp.shape[-1] - 1)


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


def bytes_per_token(kind: str, k: int, vocab: int, bits: int = 16) -> int:
    """Bytes one position costs on the wire: k ids (id_dtype) + k log-probs (bits / 8 bytes each),
    plus k counts (count_dtype) for 'sampled'."""
    _check_kind(kind)
    _check_bits(bits)
    per_slot = torch.empty((), dtype=id_dtype(vocab)).element_size() + bits // 8
    if kind == "sampled":
        per_slot += torch.empty((), dtype=count_dtype(k)).element_size()
    return k * per_slot


def dense_bytes_per_token(vocab: int) -> int:
    """Bytes of one position's dense float32 logits."""
    return 4 * vocab


def to_wire(target: SparseTarget) -> dict:
    """Compact tensors to send or store: "ids" (id_dtype), "logp" (float16, or uint8 codes when
    target.bits is 8), "counts" (sampled only, count_dtype), plus the plain values "kind", "vocab",
    "temperature" that from_wire needs (a fixed header, not counted by nbytes)."""
    if target.bits == 8:
        logp = target.codes if target.codes is not None else encode_logp8(target.kind, target.logp)
    else:
        logp = target.logp.float().clamp_min(_LOGP_FLOOR).to(torch.float16)
    d = {"kind": target.kind, "vocab": target.vocab, "temperature": target.temperature,
         "ids": target.ids.to(id_dtype(target.vocab)), "logp": logp}
    if target.kind == "sampled":
        d["counts"] = torch.round(target.weight.float() * target.k).to(count_dtype(target.k))
    return d


def from_wire(d: dict) -> SparseTarget:
    """The SparseTarget of to_wire's dict (ids int64, logp float32, weight = count / k); uint8
    log-probs are 8-bit codes."""
    _check_kind(d["kind"])
    ids = d["ids"].long()
    weight = d["counts"].float() / ids.shape[-1] if d["kind"] == "sampled" else None
    if d["logp"].dtype == torch.uint8:
        return SparseTarget(d["kind"], ids, decode_logp8(d["kind"], d["logp"]), weight, int(d["vocab"]),
                            float(d["temperature"]), 8, d["logp"])
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
