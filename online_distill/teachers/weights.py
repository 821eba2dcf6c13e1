"""A frozen teacher's weights: where they come from, how they are read (as data) and loaded, and
an ensemble of frozen models as one teacher. Shared by the teacher in a worker (frozen.py) and
the teacher service's actors (service.py)."""
from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config.schema import ConfigError
from ..rundir import storage

_FIELD = "distill.teacher_checkpoint"


@dataclass(frozen=True)
class TeacherSource:
    path: str
    """The file the weights are read from."""
    model_name: str
    """The teacher's model spec (a name, or an import path: online_distill.config.specs)."""
    peer: int | None
    """The teacher's peer index in its run; None for a user's plain state dict."""


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


class Ensemble(torch.nn.Module):
    """Frozen models as one teacher: the log of their mean probability, a valid logit vector
    (softmax gives back the mean; a temperature then softens the ensemble's distribution)."""

    def __init__(self, nets: list[torch.nn.Module]):
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([torch.softmax(n(x).float(), dim=-1) for n in self.nets]).mean(0)
        return probs.clamp_min(1e-30).log()


def teacher_members(copy: dict) -> list[dict]:
    """The members of a run's teacher copy (lifecycle.write_copy): one, or an ensemble's."""
    return copy.get("members") or [copy]


def read_members(data: bytes) -> list[dict]:
    """The members of a teacher copy file, from its bytes (weights_only: a copy is data)."""
    return teacher_members(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
