"""Checkpoint files. Each rank writes its own files into the one reported checkpoint:
replica 0 of each worker writes `peer{p}.pt` for each peer it holds (model, optimizer, schedule, teacher), every rank
writes `rng_rank{r}.pt`, and rank 0 writes `history.json` (the metrics table so far).
Loaded only with torch.load(weights_only=True): a checkpoint is data, never code.
Each rank's last file is `manifest_rank{r}.json`, the names and sizes of the files beside it
and the world size: a file it lists that is missing or of another size marks the checkpoint
damaged, a rank's manifest missing marks it incomplete (resume.verify).
"""
from __future__ import annotations

import json
import os

import torch

from .topology import Topology


def _atomic_save(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _atomic_write_json(obj, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def save(directory: str, topo: Topology, epoch: int, peers: list, teacher, history: list[dict],
         metrics: dict | None = None) -> None:
    """`peers` holds (model, optimizer, scheduler) for each peer of topo.peers, in order;
    rank 0 also writes the epoch's flat metrics (what Ray reports), when given."""
    if topo.replica == 0:
        for i, (p, (model, opt, sched)) in enumerate(zip(topo.peers, peers)):
            _atomic_save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "teacher": teacher.state_dict(i)},
                         os.path.join(directory, f"peer{p}.pt"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _atomic_save(rng, os.path.join(directory, f"rng_rank{topo.rank}.pt"))
    if topo.rank == 0:
        _atomic_write_json({"epoch": epoch, "history": history}, os.path.join(directory, "history.json"))
        if metrics is not None:
            _atomic_write_json(metrics, os.path.join(directory, "metrics.json"))
    write_manifest(directory, topo.rank, topo.world_size)


def restore(checkpoint, topo: Topology, peers: list, teacher) -> tuple[int, list[dict]]:
    """Load this worker's peers from a ray.train.Checkpoint; returns (next epoch, history).
    Peer files do not depend on the layout, so a run may resume packed that started spread."""
    with checkpoint.as_directory() as d:
        for i, (p, (model, opt, sched)) in enumerate(zip(topo.peers, peers)):
            state = load_peer(d, p)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            teacher.load_state_dict(i, state["teacher"])
        rng_path = os.path.join(d, f"rng_rank{topo.rank}.pt")
        if os.path.exists(rng_path):
            rng = torch.load(rng_path, weights_only=True)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        history = read_history(d)
    return int(state["epoch"]) + 1, history


def load_peer(directory: str, peer: int) -> dict:
    path = os.path.join(directory, f"peer{peer}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such peer in this checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_metrics(directory: str) -> dict:
    """The flat metrics of the epoch a checkpoint holds ({} for one saved without them)."""
    path = os.path.join(directory, "metrics.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_history(directory: str) -> list[dict]:
    path = os.path.join(directory, "history.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["history"]


# --- completeness: resume.verify checks a checkpoint against its ranks' manifests ---------------

MANIFEST = "manifest_rank{rank}.json"


def write_manifest(directory: str, rank: int, world_size: int) -> None:
    """A rank's last file in a checkpoint: every file beside it (its own, as each rank saves into
    a directory of its own before Ray gathers them) with its size, and how many ranks save into
    this checkpoint. Written last and atomically, so a rank that died while saving leaves no
    manifest (the checkpoint is incomplete), and a file cut short later is caught."""
    files = {n: os.path.getsize(os.path.join(directory, n)) for n in sorted(os.listdir(directory))
             if not n.endswith(".tmp") and not (n.startswith("manifest_rank") and n.endswith(".json"))}
    _atomic_write_json({"rank": rank, "world_size": world_size, "files": files},
                       os.path.join(directory, MANIFEST.format(rank=rank)))
