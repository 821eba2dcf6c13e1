"""A frozen teacher's outputs per training example, on disk (distill.teacher_cache_dir).

A frozen teacher gives the same output for an example every time, so its outputs are computed
once per example and kept, in the form the loss takes them (distill.logits: dense float32
logits, or a compressed sparse target, which is what makes a language model's cache affordable:
top-8 of a 256-byte vocabulary is 24 bytes a token instead of 1,024). Every later run and sweep
trial of the same teacher, data and form reads them and runs the teacher zero times.

    <teacher_cache_dir>/<key>/meta.json          what the key stands for
    <teacher_cache_dir>/<key>/part-<id>.pt       entries: example digests and their outputs

The key is a digest of the teacher's weights and model, the dataset (its name, sequence length
and split), and the form (kind, k and temperature; dense logits do not depend on T). An example
is known by a 64-bit digest of its bytes, as the in-memory cache (distill.cache_teacher) knows
it. Parts are written whole to a temporary name and renamed (rundir's rule for every write), each
by the one process that computed its entries, so runs and trials sharing a cache never write the
same file; a reader takes every complete part there is.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import uuid

import torch
from torch import Tensor

from ..distill.form import LogitForm
from ..rundir import storage

META = "meta.json"
FILLING = "filling.lock"
"""Held (flock) by the run that fills an entry; another run of the same entry waits, then reads."""
PART = "part-{}.pt"


def cache_key(cfg, members: list[tuple[str, dict]]) -> str:
    """The digest a cache is filed under: teacher (model specs and weights), data and form."""
    h = hashlib.blake2b(digest_size=12)
    for model_name, weights in members:
        h.update(model_name.encode())
        for name, t in sorted(weights.items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    d = cfg.data
    h.update(json.dumps({"dataset": d.dataset, "seq_len": d.seq_len, "val_size": d.val_size, "split_seed": d.split_seed,
                         **LogitForm.of(cfg).key()}, sort_keys=True).encode())
    return h.hexdigest()


class DiskCache:
    """Entries by example digest: the wire dict of each example's output (LogitForm.entries)."""

    def __init__(self, root: str, key: str, describe: dict | None = None):
        self.dir = storage.join(storage.absolute(root), key)
        self.entries: dict[bytes, object] = {}
        self.new: dict[bytes, object] = {}
        storage.make_dir(self.dir)
        if describe is not None and not storage.exists(storage.join(self.dir, META)):
            storage.write_text(storage.join(self.dir, META), json.dumps(describe, indent=1, default=str))
        self.load()

    def load(self) -> int:
        """Read every complete part (another run may have added some); returns the entries known."""
        for name in sorted(storage.listing(self.dir, files=True) or {}):
            if not (name.startswith("part-") and name.endswith(".pt")):
                continue
            data = storage.read_bytes(storage.join(self.dir, name))
            part = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            for key, value in zip(part["keys"], _rows(part)):
                self.entries.setdefault(bytes(key.tolist()), value)
        return len(self.entries)

    @contextlib.contextmanager
    def filling(self):
        """One filler at a time (on a local disk): yields True when another run was filling this
        entry and this one waited for it, having then read what it wrote."""
        if storage.is_uri(self.dir):
            yield False
            return
        import fcntl

        with open(os.path.join(self.dir, FILLING), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                waited = False
            except BlockingIOError:
                fcntl.flock(f, fcntl.LOCK_EX)  # released when the other run has flushed its part
                waited = True
                self.load()
            try:
                yield waited
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def missing(self, keys: list[bytes]) -> list[int]:
        return [i for i, k in enumerate(keys) if k not in self.entries]

    def put(self, keys: list[bytes], values: list) -> None:
        for k, v in zip(keys, values):
            self.entries[k] = v
            self.new[k] = v

    def flush(self) -> int:
        """Write the entries added since the last flush as one new part; returns how many."""
        if not self.new:
            return 0
        keys = torch.tensor([list(k) for k in self.new], dtype=torch.uint8)
        values = list(self.new.values())
        if "dense" in values[0]:
            part = {"keys": keys, "dense": torch.stack([v["dense"] for v in values])}
        else:
            part = {"keys": keys, **{f"wire.{n}": torch.stack([v[n] for v in values]) for n in values[0]
                                     if isinstance(values[0][n], Tensor)},
                    "header": json.dumps({n: v for n, v in values[0].items() if not isinstance(v, Tensor)})}
        buf = io.BytesIO()
        torch.save(part, buf)
        storage.write_bytes(storage.join(self.dir, PART.format(uuid.uuid4().hex[:12])), buf.getvalue())
        n = len(self.new)
        self.new = {}
        return n


def _rows(part: dict) -> list:
    if "dense" in part:
        return [{"dense": row} for row in part["dense"].unbind(0)]
    header = json.loads(part["header"])
    names = [k[len("wire."):] for k in part if k.startswith("wire.")]
    n = len(part["keys"])
    return [{**header, **{name: part[f"wire.{name}"][i] for name in names}} for i in range(n)]
