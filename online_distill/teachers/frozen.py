"""Offline KD: a frozen teacher, loaded from a checkpoint, teaches a student of any architecture.

distill.teacher_checkpoint may be
- a checkpoint directory of an earlier run of ours (it holds `peer{p}.pt` files); the peer is
  distill.teacher_peer and the model name is read from the run's config.yaml (in the run
  directory, one or two levels up), unless distill.teacher_model is given;
- a run directory (its latest `checkpoint_*` directory is used; for a born-again run, its
  last generation's);
- a .pt file: one of our `peer{p}.pt` files, or a plain state dict of a user's model, which
  needs distill.teacher_model (a name in MODELS, or a builder passed to the Python API).

Weights are read with torch.load(weights_only=True): a checkpoint is data, never code. The
teacher runs in eval mode without gradients; its forward pass is part of the step time (the
`exchange_share` column is the share of step time spent asking the teacher).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
from dataclasses import dataclass
from typing import Mapping

import pyarrow.fs as pafs
import torch
import yaml
from torch import Tensor

from .. import storage
from ..config import Config, ConfigError, DistillConfig
from .base import PeerSource, TeacherContext

_PEER_FILE = re.compile(r"^peer(\d+)\.pt$")
_FIELD = "distill.teacher_checkpoint"


@dataclass(frozen=True)
class TeacherSource:
    path: str
    """The file the weights are read from."""
    model_name: str
    peer: int | None
    """The teacher's peer index in its run; None for a user's plain state dict."""


def _expand(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _listing(path: str) -> dict[str, pafs.FileType]:
    """Names in a directory (local or any pyarrow filesystem URI) and their types."""
    fs, p = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return {os.path.basename(i.path.rstrip("/")): i.type for i in infos}


def _kind(path: str) -> pafs.FileType:
    fs, p = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    return fs.get_file_info(p).type


def _peer_files(names: Mapping[str, pafs.FileType]) -> list[int]:
    return sorted(int(m.group(1)) for n in names if (m := _PEER_FILE.match(n)))


def find_checkpoint_dir(path: str) -> str | None:
    """The checkpoint directory a path names: itself if it holds peer files, else the latest
    checkpoint_* directory in it, else (a born-again run) its last generation's."""
    names = _listing(path)
    if _peer_files(names):
        return path
    dirs = [n for n, t in names.items() if t == pafs.FileType.Directory]
    ckpts = sorted(n for n in dirs if n.startswith("checkpoint_"))
    if ckpts:
        return storage.join(path, ckpts[-1])
    gens = sorted((int(n[3:]), n) for n in dirs if re.fullmatch(r"gen\d+", n))
    if gens:
        return find_checkpoint_dir(storage.join(path, gens[-1][1]))
    return None


def read_run_config(checkpoint_dir: str) -> dict | None:
    """The config.yaml of the run a checkpoint directory belongs to (it, its parent, or the
    parent's parent, as laid out by plain runs and by Tune trials)."""
    d = checkpoint_dir
    for _ in range(3):
        text = storage.read_text(storage.join(d, "config.yaml"))
        if text is not None:
            return yaml.safe_load(text)
        parent = d.rstrip("/").rsplit("/", 1)[0] if "://" in d else os.path.dirname(d.rstrip(os.sep))
        if parent == d:
            break
        d = parent
    return None


def resolve_teacher(d: DistillConfig, models: Mapping | None = None) -> TeacherSource:
    """Which file and which model the teacher is; ConfigError naming the field otherwise.
    `models` (the builders by name) is checked against when given."""
    if not d.teacher_checkpoint:
        raise ConfigError(f"{_FIELD}: got {d.teacher_checkpoint!r}; allowed: a checkpoint directory, run directory "
                          "or .pt file")
    path = _expand(d.teacher_checkpoint)
    kind = _kind(path)
    if kind == pafs.FileType.NotFound:
        raise ConfigError(f"{_FIELD}: {path!r} does not exist; allowed: a checkpoint directory of an earlier run "
                          "(with peer<p>.pt files), its run directory, or a .pt state dict")
    run_cfg = None
    if kind == pafs.FileType.Directory:
        ckpt = find_checkpoint_dir(path)
        if ckpt is None:
            raise ConfigError(f"{_FIELD}: {path!r} holds no peer<p>.pt files and no checkpoint_* directories; allowed: "
                              "a checkpoint directory of an earlier run, its run directory, or a .pt state dict")
        peers, run_cfg = _peer_files(_listing(ckpt)), read_run_config(ckpt)
        n_peers = len(run_cfg["models"]) if run_cfg else len(peers)
        if d.teacher_peer not in peers or d.teacher_peer >= n_peers:
            raise ConfigError(f"distill.teacher_peer: got {d.teacher_peer}; allowed: 0..{n_peers - 1} "
                              f"(the peers of the teacher run in {ckpt})")
        file, peer = storage.join(ckpt, f"peer{d.teacher_peer}.pt"), d.teacher_peer
    else:
        m = _PEER_FILE.match(os.path.basename(path))
        file, peer = path, (int(m.group(1)) if m else None)
        if peer is not None:
            run_cfg = read_run_config(os.path.dirname(path) if "://" not in path else path.rsplit("/", 1)[0])
    name = d.teacher_model
    if name is None:
        if run_cfg is None or peer is None or peer >= len(run_cfg.get("models", [])):
            raise ConfigError(f"distill.teacher_model: got None; allowed: a model name (required: {path!r} has no run "
                              "config.yaml beside it to read the teacher's model from)")
        name = run_cfg["models"][peer]
    if models is not None and name not in models:
        raise ConfigError(f"distill.teacher_model: got {name!r}; allowed: {', '.join(sorted(models))}")
    return TeacherSource(file, name, peer)


def load_weights(src: TeacherSource) -> dict[str, Tensor]:
    """The teacher's state dict, read as data (weights_only); ours or a user's plain one."""
    try:
        obj = torch.load(io.BytesIO(storage.read_bytes(src.path)), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ConfigError(f"{_FIELD}: {src.path!r} is not a weights-only checkpoint ({str(e).splitlines()[0]}); "
                          "allowed: a file written with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # one of our peer{p}.pt files
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"{_FIELD}: {src.path!r} holds no state dict (a mapping of names to tensors)")
    return obj


def load_into(model: torch.nn.Module, weights: Mapping[str, Tensor], src: TeacherSource) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"distill.teacher_model: the weights in {src.path!r} do not fit model {src.model_name!r} "
                          f"({str(e).splitlines()[0]} ...); allowed: the model those weights were trained as") from None


class LogitCache:
    """A frozen teacher's logits per training example, keyed by a 64-bit digest of the example's
    bytes (the batch is all the teacher sees; a digest is exact up to a 2^-64 chance per pair).
    Only the examples not seen before go through the teacher."""

    def __init__(self):
        self.logits: dict[bytes, Tensor] = {}

    def get(self, x: Tensor, teacher) -> Tensor:
        rows = x.detach().cpu().contiguous().view(len(x), -1).numpy()
        keys = [hashlib.blake2b(r.tobytes(), digest_size=8).digest() for r in rows]
        new = [i for i, k in enumerate(keys) if k not in self.logits]
        if new:
            fresh = teacher(x[new]).cpu()
            for i, z in zip(new, fresh):
                self.logits[keys[i]] = z
        return torch.stack([self.logits[k] for k in keys]).to(x.device)


class FrozenTeacher(PeerSource):
    def __init__(self, ctx: TeacherContext, peer: int):
        src = resolve_teacher(ctx.cfg.distill)
        self.model_name, self.source = src.model_name, src.path
        self.model = ctx.build_model(src.model_name)
        load_into(self.model, load_weights(src), src)
        self.model = self.model.to(ctx.device).eval().requires_grad_(False)
        self.cache = LogitCache() if ctx.cfg.distill.cache_teacher else None

    @staticmethod
    def check(cfg: Config, models: Mapping, datasets: Mapping) -> None:
        """On the driver: the checkpoint exists, names a known model, and its weights fit that
        model on this dataset (a mismatch found on a worker would cost retries)."""
        from ..data import load_data
        from ..models import build_model

        src = resolve_teacher(cfg.distill, models)
        weights = load_weights(src)
        data = load_data(cfg.data, datasets)  # the teacher is built for the dataset's real first examples
        load_into(build_model(src.model_name, data.sample, data.num_classes, models, field="distill.teacher_model"),
                  weights, src)

    @torch.no_grad()
    def logits(self, x: Tensor, student_logits: Tensor) -> Tensor:
        if self.cache is None:
            return self.model(x).float().unsqueeze(0)
        return self.cache.get(x, lambda rows: self.model(rows).float()).unsqueeze(0)

    def state_dict(self) -> dict:
        # kept in every checkpoint: a resumed run goes on with this teacher even if its source changed
        return {"model": self.model.state_dict(), "model_name": self.model_name, "source": self.source}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])


class BornAgain(PeerSource):
    """distill.mode='born_again' as a worker would see it: generation 0, labels only. launch.train
    never sends this mode to workers: generations.py runs generation 0 as an 'independent' run
    and generation g as an 'offline' run taught by frozen generation g - 1 (FrozenTeacher)."""

    def __init__(self, ctx: TeacherContext, peer: int):
        pass

    @staticmethod
    def check(cfg: Config, models: Mapping, datasets: Mapping) -> None:
        if cfg.distill.generations < 2:
            raise ConfigError(f"distill.generations: got {cfg.distill.generations}; allowed: an integer >= 2 when "
                              "distill.mode='born_again' (generation 0 and at least one born-again student)")
        if cfg.num_peers != 1:
            raise ConfigError(f"models: got {list(cfg.models)}; allowed: one model when distill.mode='born_again' "
                              "(every generation is that model trained anew)")
        if cfg.distill.teacher_checkpoint:
            raise ConfigError(f"distill.teacher_checkpoint: got {cfg.distill.teacher_checkpoint!r}; allowed: null when "
                              "distill.mode='born_again' (generation 0 is trained in the run; to distil from an "
                              "existing checkpoint use distill.mode='offline')")


def with_absolute_checkpoint(cfg: Config) -> Config:
    """Ray Train runs workers in their own working directory: a relative (or ~) teacher path is
    made absolute on the driver, where it was written, before the config travels to them."""
    path = cfg.distill.teacher_checkpoint
    if not path or _expand(path) == path:
        return cfg
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher_checkpoint=_expand(path)))
