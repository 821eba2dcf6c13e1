"""What a checkpoint holds, how each rank writes its part, and how one is checked and restored.

Each rank writes its own files into the checkpoint directory (rundir.RunDir.saving_dir):
replica 0 of each worker a peer file per peer it holds (model, optimizer, schedule, teacher
state), every rank its RNG state, rank 0 the history so far, the epoch's flat metrics and, at the
last epoch, the predictions. Each rank's last file is its manifest: the names and sizes of the
files it wrote, and the world size. A file a manifest lists that is missing or of another size
marks the checkpoint damaged; a rank's manifest missing marks it incomplete (`problems`).
Loaded only with torch.load(weights_only=True): a checkpoint is data, never code.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.topology import Topology
from . import layout as names
from . import storage


@dataclass
class Epoch:
    """What the loop hands its reporter at the end of an epoch: the numbers, and the state a
    checkpoint saves."""

    index: int
    """0-based epoch."""
    metrics: dict
    """The epoch's flat metrics (`peer0/val_acc`, `ensemble/val_nll`, ...): rank 0's; {} on other ranks."""
    history: list[dict]
    """One row per member and epoch so far (rank 0's; [] on other ranks)."""
    topo: Topology
    peers: list
    """(model, optimizer, scheduler) of each peer this worker holds, in topo.peers order."""
    teacher: Any
    predictions: dict | None = None
    """Last epoch, rank 0: {"val"/"test": {"labels": (N,), "logits": {peer: (N, C)}}}."""
    last: bool = False


def save(directory: str, epoch: Epoch) -> None:
    """This rank's files of one checkpoint, its manifest last. `directory` is local or a URI."""
    topo, written = epoch.topo, {}

    def put(name: str, obj, as_json: bool = False) -> None:
        if as_json:
            data = json.dumps(obj).encode()
        else:
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()
        storage.write_bytes(storage.join(directory, name), data)
        written[name] = len(data)

    if topo.replica == 0:
        for i, (p, (model, opt, sched)) in enumerate(zip(topo.peers, epoch.peers)):
            put(names.peer_file(p), {"epoch": epoch.index, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict(), "teacher": epoch.teacher.state_dict(i)})
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    put(names.rng_file(topo.rank), rng)
    if topo.rank == 0:
        put(names.HISTORY, {"epoch": epoch.index, "history": epoch.history}, as_json=True)
        put(names.EPOCH_METRICS, epoch.metrics, as_json=True)
        if epoch.predictions is not None:
            put(names.PREDICTIONS, epoch.predictions)
    # written last: a rank that died while saving leaves no manifest, and the checkpoint is incomplete
    storage.write_text(storage.join(directory, names.manifest_file(topo.rank)),
                       json.dumps({"rank": topo.rank, "world_size": topo.world_size, "files": written}))


def restore(directory: str, topo: Topology, peers: list, teacher) -> tuple[int, list[dict]]:
    """Load this worker's peers from a checkpoint directory; returns (next epoch, history).
    Peer files do not depend on the layout, so a run may resume packed that started spread."""
    state = {}
    for i, (p, (model, opt, sched)) in enumerate(zip(topo.peers, peers)):
        state = load_peer(directory, p)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        teacher.load_state_dict(i, state["teacher"])
    rng = _load(directory, names.rng_file(topo.rank))
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(state["epoch"]) + 1, read_history(directory)


def _load(directory: str, name: str):
    data = storage.read_bytes(storage.join(directory, name))
    return None if data is None else torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_peer(directory: str, peer: int) -> dict:
    state = _load(directory, names.peer_file(peer))
    if state is None:
        raise FileNotFoundError(f"{storage.join(directory, names.peer_file(peer))}: no such peer in this checkpoint")
    return state


def read_metrics(directory: str) -> dict:
    """The flat metrics of the epoch a checkpoint holds ({} for one saved without them)."""
    text = storage.read_text(storage.join(directory, names.EPOCH_METRICS))
    return {} if text is None else json.loads(text)


def read_history(directory: str) -> list[dict]:
    text = storage.read_text(storage.join(directory, names.HISTORY))
    return [] if text is None else json.loads(text)["history"]


def read_predictions(directory: str) -> dict | None:
    return _load(directory, names.PREDICTIONS)


def epoch_of(directory: str) -> int | None:
    """The 0-based epoch a checkpoint holds (None without a history)."""
    text = storage.read_text(storage.join(directory, names.HISTORY))
    return None if text is None else int(json.loads(text)["epoch"])


# --- completeness ---------------------------------------------------------------------------------

@dataclass
class Verdict:
    problems: dict[str, str] = field(default_factory=dict)
    """file -> what is wrong with it; empty: complete, and every file a resume reads loads."""
    finished: bool = False
    """Every rank that saved into it finished (its manifest is there)."""


def verify(directory: str, num_peers: int, *, deep: bool = True) -> Verdict:
    """Check one checkpoint directory (local or a URI). Required: a peer file for every
    p < num_peers and the history; every RNG file present must load too (a missing one is
    tolerated: restore keeps fresh RNG state, and the world size may change). `deep=False`
    checks the manifests and sizes only, without loading tensors."""
    sizes = storage.listing(directory, files=True)
    if sizes is None:
        return Verdict({"(directory)": "missing"})
    problems: dict[str, str] = {}
    worlds = set()
    for name in sorted(n for n in sizes if names.is_manifest(n)):
        try:
            manifest = json.loads(storage.read_text(storage.join(directory, name)))
            listed_files = manifest["files"]
        except Exception as e:  # noqa: BLE001 - whatever fails to read is damage
            problems[name] = f"unreadable ({short(e)})"
            continue
        worlds.add(int(manifest.get("world_size", 0)))
        for f, size in listed_files.items():
            if f not in sizes:
                problems.setdefault(f, f"missing ({name} lists it)")
            elif sizes[f] != size:
                problems.setdefault(f, f"{sizes[f]} bytes where {name} says {size}" + (" (cut short)" if sizes[f] < size else ""))
    world = max(worlds, default=0)
    if world == 0:
        problems["(manifests)"] = "none says how many ranks saved into it"
    for r in range(world):
        if names.manifest_file(r) not in sizes:
            problems[names.manifest_file(r)] = f"missing: rank {r} of the {world} saving into it never finished"
    finished = world > 0 and all(names.manifest_file(r) in sizes for r in range(world))

    epochs = {}
    for name in [names.peer_file(p) for p in range(num_peers)] + [names.HISTORY] + \
            sorted(n for n in sizes if names.is_rng_file(n)):
        if name in problems:
            continue
        if name not in sizes:
            problems[name] = "missing"
            continue
        if not deep and name != names.HISTORY:
            continue
        try:
            if name == names.HISTORY:
                epochs[name] = json.loads(storage.read_text(storage.join(directory, name)))["epoch"]
                continue
            state = _load(directory, name)
            if names.peer_files([name]):
                epochs[name] = state["epoch"]
        except Exception as e:  # noqa: BLE001 - a cut-short zip, a bad pickle, a missing key: all damage
            problems[name] = f"unreadable ({short(e)})"
    if len(set(epochs.values())) > 1:  # two saves' files mixed in one directory
        problems["(all files)"] = "from different epochs: " + ", ".join(f"{n} {e}" for n, e in sorted(epochs.items()))
    return Verdict(problems, finished)


def short(e: BaseException) -> str:
    first = str(e).strip().split("\n")[0].split(". ")[0][:120]  # torch's zip errors run on for lines
    return f"{type(e).__name__}: {first}" if first else type(e).__name__



# --- where a run resumes ----------------------------------------------------------------------------

@dataclass
class ResumePoint:
    """Where a run directory resumes, and what stands in the way (run/resume.py moves that aside)."""
    checkpoint: str | None = None
    """The checkpoint directory it resumes from (a path); None: from scratch."""
    epoch: int | None = None
    """The 0-based epoch that checkpoint holds (training goes on with epoch + 1)."""
    damaged: dict[str, list[str]] = field(default_factory=dict)
    """Newer checkpoints, complete once, that do not load: name -> problems."""
    incomplete: dict[str, list[str]] = field(default_factory=dict)
    """Newer saves that never finished: name -> problems."""

    @property
    def needs_fallback(self) -> bool:
        return bool(self.damaged or self.incomplete)

    @property
    def refused(self) -> bool:  # checkpoints were complete once, and none of them loads
        return self.checkpoint is None and bool(self.damaged)

    def describe(self) -> str:
        if self.checkpoint is None:
            return "from scratch"
        return f"from {storage.basename(self.checkpoint)} (epoch {self.epoch + 1} done)"


def find_resume_point(run: names.RunDir, num_peers: int, *, deep: bool = True) -> ResumePoint:
    """Check a run's checkpoint directories, newest first, until one is complete and loads
    (`deep=False`: until one is complete, without loading tensors). Changes nothing."""
    point = ResumePoint()
    for name in reversed(run.checkpoints()):
        verdict = verify(run.file(name), num_peers, deep=deep)
        if not verdict.problems:
            point.checkpoint, point.epoch = run.file(name), epoch_of(run.file(name))
            break
        (point.damaged if verdict.finished else point.incomplete)[name] = \
            [f"{n}: {what}" for n, what in sorted(verdict.problems.items())]
    return point
