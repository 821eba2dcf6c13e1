"""The teacher's output in the form it travels: the one reader of distill.logits, logits_k and
logits_bits.

A run hands teacher logits to the loss, between workers (DML), from a teacher service and from a
teacher cache in one form: dense logits, or compressed to k token ids and their log-probs (topk,
sampled; sparse.py has the math). LogitForm is that choice, made once from the config, and every
place a teacher's output is made, moved, stored or measured asks it:

    form = LogitForm.of(cfg)
    out = form.output(z, x=x, teacher=p)       # one teacher's output for a batch, in the form
    wire = form.to_wire(out)                    # compact tensors to send or store; from_wire back
    target = form.target([out, ...])            # what the loss reads (per_position), any form
    form.key(), form.describe()                 # a cache's or service's key, a message

One digest, one seed rule. An example is known by a 64-bit digest of its bytes
(example_digests), which keys the teacher cache, the service's kept outputs and the in-memory
cache. A sampled target's draws are a pure function of (the example's digest, the teacher's
index, position, draw): counter-based uniforms (sparse.keyed_uniforms), not a generator, so an
example gets the same sample live, exchanged between workers, from the service and from the
disk cache, whichever batch it sits in, at any step, for every peer. The teacher's index is the
peer whose logits are compressed (DML, codistillation, a self-teacher of peer p), and 0 for a
frozen teacher, which is one teacher for every peer.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from . import sparse
from .losses import DenseTarget

KINDS = ("dense", "topk", "sampled")
_TEACHER_SALT = 0x5EED_7EAC_4E2


def example_digests(x: Tensor) -> list[bytes]:
    """A 64-bit digest of each example's bytes (the batch's first dim): what a teacher cache and
    the service key an example by, and what a sampled target's draws are seeded from."""
    rows = x.detach().cpu().contiguous().view(len(x), -1).numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=8).digest() for r in rows]


def row_keys(digests: list[bytes], teacher: int) -> Tensor:
    """The int64 key of each example's draws from `teacher` (the seed rule above)."""
    keys = torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests], dtype=torch.int64)
    return sparse.mix64(keys ^ sparse.mix64(torch.tensor(teacher * 1_000_003 + _TEACHER_SALT, dtype=torch.int64)))


@dataclass(frozen=True)
class LogitForm:
    kind: str = "dense"
    """'dense', 'topk' or 'sampled' (distill.logits)."""
    k: int = 8
    """Token ids kept per position (distill.logits_k; top-k keeps at most the vocabulary)."""
    bits: int = 16
    """Bits of a stored log-prob: 16 (float16) or 8 (distill.logits_bits)."""
    temperature: float = 1.0
    """The KD temperature: compressed log-probs are stored tempered (loss.temperature)."""

    @classmethod
    def of(cls, cfg) -> LogitForm:
        d = cfg.distill
        return cls(d.logits, d.logits_k, d.logits_bits, float(cfg.loss.temperature))

    @property
    def dense(self) -> bool:
        return self.kind == "dense"

    # ---- names ---------------------------------------------------------------------------------

    def key(self) -> dict:
        """What a frozen teacher's output is, beyond the teacher and the data: the part of a teacher
        cache's key (and a service's) that the form sets; dense logits do not depend on T."""
        return {"form": self.kind, "k": self.k, **({"bits": self.bits} if self.bits != 16 else {}),
                "T": None if self.dense else self.temperature}

    def describe(self) -> str:
        """The form in a message: 'dense', or e.g. 'topk, k 8, 16-bit, T 2'."""
        return self.kind if self.dense else f"{self.kind}, k {self.k}, {self.bits}-bit, T {self.temperature:g}"

    def bytes_per_token(self, vocab: int) -> int:
        """Bytes one position of one teacher costs on the wire and in a cache."""
        if self.dense:
            return sparse.dense_bytes_per_token(vocab)
        return sparse.bytes_per_token(self.kind, self._k(vocab), vocab, self.bits)

    def _k(self, vocab: int) -> int:
        return min(self.k, vocab) if self.kind == "topk" else self.k

    # ---- making and reading outputs ------------------------------------------------------------

    def output(self, z: Tensor, *, teacher: int, x: Tensor | None = None, digests: list[bytes] | None = None):
        """One teacher's logits for a batch (B, ..., V) in this form: float32 logits as they are, or
        a sparse.SparseTarget. Sampled draws need the examples (x) or their digests."""
        if self.dense:
            return z.detach().float()
        keys = None
        if self.kind == "sampled":
            if digests is None:
                if x is None:
                    raise ValueError("a sampled target needs the batch (x) or its example digests: its draws are "
                                     "seeded by example")
                digests = example_digests(x)
            keys = row_keys(digests, teacher)
        return sparse.compress(z, temperature=self.temperature, kind=self.kind, k=self._k(z.shape[-1]),
                               bits=self.bits, row_keys=keys)

    def target(self, outputs: list):
        """What the loss reads from several teachers' outputs (each in this form): a
        losses.DenseTarget of the stacked logits or a sparse.SparseTeachers; None for no teacher."""
        if not outputs:
            return None
        if self.dense:
            return DenseTarget(torch.stack(outputs))
        return sparse.SparseTeachers(outputs)

    def target_of(self, z: Tensor | None, *, x: Tensor, teachers: list[int]):
        """Dense teacher logits (n_teachers, B, ..., V), `teachers` naming each, as the loss reads them."""
        if z is None:
            return None
        return self.target([self.output(zi, x=x, teacher=t) for zi, t in zip(z, teachers)])

    # ---- the wire ------------------------------------------------------------------------------

    def to_wire(self, output) -> dict:
        """Compact tensors to send or store: {"dense": float32 logits}, or sparse.to_wire's dict."""
        if self.dense:
            return {"dense": output}
        return sparse.to_wire(output)

    def from_wire(self, wire: dict):
        if self.dense:
            return wire["dense"]
        return sparse.from_wire(wire)

    @staticmethod
    def nbytes(wire: dict) -> int:
        """Bytes of a wire dict's tensors (its plain header values are not counted)."""
        return sparse.nbytes(wire)

    def entries(self, output) -> list[dict]:
        """Each example's wire dict of a batch's output, on the CPU and copied out, so an entry never
        keeps its batch alive (a teacher cache's and the service's unit)."""
        wire = self.to_wire(output)
        tensors = {k: v.detach().cpu() for k, v in wire.items() if isinstance(v, Tensor)}
        header = {k: v for k, v in wire.items() if not isinstance(v, Tensor)}
        n = len(next(iter(tensors.values())))
        return [{**header, **{k: v[i].clone() for k, v in tensors.items()}} for i in range(n)]

    def stack(self, entries: list[dict], device: torch.device | str):
        """A batch's output from its examples' entries (entries' inverse), on `device`."""
        first = entries[0]
        wire = {**{k: v for k, v in first.items() if not isinstance(v, Tensor)},
                **{k: torch.stack([e[k] for e in entries]).to(device) for k, v in first.items() if isinstance(v, Tensor)}}
        return self.from_wire(wire)

    # ---- what the form loses -------------------------------------------------------------------

    def fidelity(self, teacher: Tensor, student: Tensor, *, x: Tensor, teacher_index: int, mask=None) -> dict[str, float]:
        """sparse.fidelity of this form for one teacher's dense logits on a batch: KL(dense ||
        reconstructed) and the KD term's relative error. {} for dense (nothing is lost)."""
        if self.dense:
            return {}
        f = sparse.fidelity(teacher, student, self.output(teacher, x=x, teacher=teacher_index),
                            temperature=self.temperature, divergence="forward_kl", mask=mask)
        return {"logits_kl": f["kl_dense_to_reconstructed"], "kd_rel_error": f["kd_rel_error"]}
