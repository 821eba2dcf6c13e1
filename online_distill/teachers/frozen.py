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
from collections.abc import Mapping

import pyarrow.fs as pafs
import torch
import yaml
from torch import Tensor

from ..config.schema import Config, ConfigError, DistillConfig
from ..distill.form import LogitForm, example_digests
from ..models.builders import resolve_model
from ..rundir import storage
from ..rundir.layout import CONFIG, checkpoint_dir_of, peer_file, peer_files, run_dir_of
from .base import PeerSource, TeacherContext
from .weights import Ensemble, TeacherSource, load_into, load_weights, read_members, teacher_members  # noqa: F401 (re-exported)

_FIELD = "distill.teacher_checkpoint"


def _expand(path: str) -> str:
    return storage.absolute(path)


def read_run_config(checkpoint_dir: str) -> dict | None:
    """The config.yaml of the run a checkpoint directory belongs to (it, its parent, or the
    parent's parent, as laid out by plain runs and by Tune trials)."""
    run = run_dir_of(checkpoint_dir)
    return None if run is None else yaml.safe_load(run.read_text(CONFIG))


def resolve_teacher(d: DistillConfig, models: Mapping | None = None) -> TeacherSource:
    """Which file and which model the teacher is; ConfigError naming the field otherwise.
    The model spec is resolved against `models` (user builders) and the registry."""
    if not d.teacher_checkpoint:
        raise ConfigError(f"{_FIELD}: got {d.teacher_checkpoint!r}; allowed: a checkpoint directory, run directory "
                          "or .pt file", _FIELD)
    path = _expand(d.teacher_checkpoint)
    kind = storage.kind(path)
    if kind == pafs.FileType.NotFound:
        raise ConfigError(f"{_FIELD}: {path!r} does not exist; allowed: a checkpoint directory of an earlier run "
                          "(with peer<p>.pt files), its run directory, or a .pt state dict", _FIELD)
    run_cfg = None
    if kind == pafs.FileType.Directory:
        ckpt = checkpoint_dir_of(path)
        if ckpt is None:
            raise ConfigError(f"{_FIELD}: {path!r} holds no peer<p>.pt files and no checkpoint_* directories; allowed: "
                              "a checkpoint directory of an earlier run, its run directory, or a .pt state dict", _FIELD)
        peers, run_cfg = peer_files(storage.listing(ckpt, files=True) or {}), read_run_config(ckpt)
        n_peers = len(run_cfg["models"]) if run_cfg else len(peers)
        if d.teacher_peer not in peers or d.teacher_peer >= n_peers:
            raise ConfigError(f"distill.teacher_peer: got {d.teacher_peer}; allowed: 0..{n_peers - 1} "
                              f"(the peers of the teacher run in {ckpt})", "distill.teacher_peer")
        file, peer = storage.join(ckpt, peer_file(d.teacher_peer)), d.teacher_peer
    else:
        found = peer_files([storage.basename(path)])
        file, peer = path, (found[0] if found else None)
        if peer is not None:
            run_cfg = read_run_config(storage.parent(path))
    name = d.teacher_model
    if name is None:
        if run_cfg is None or peer is None or peer >= len(run_cfg.get("models", [])):
            raise ConfigError(f"distill.teacher_model: got None; allowed: a model name (required: {path!r} has no run "
                              "config.yaml beside it to read the teacher's model from)", "distill.teacher_model")
        name = run_cfg["models"][peer]
    field = "distill.teacher_model" if d.teacher_model else f"distill.teacher_checkpoint (its run's models[{peer}])"
    resolve_model(name, dict(models) if models else None, field=field)
    return TeacherSource(file, name, peer)


class LogitCache:
    """A frozen teacher's logits per training example, keyed by a 64-bit digest of the example's
    bytes (the batch is all the teacher sees; a digest is exact up to a 2^-64 chance per pair).
    Only the examples not seen before go through the teacher."""

    def __init__(self):
        self.logits: dict[bytes, Tensor] = {}

    def get(self, x: Tensor, teacher) -> Tensor:
        keys = example_digests(x)
        new = [i for i, k in enumerate(keys) if k not in self.logits]
        if new:
            fresh = teacher(x[new]).cpu()
            for i, z in zip(new, fresh):
                self.logits[keys[i]] = z
        return torch.stack([self.logits[k] for k in keys]).to(x.device)


class FrozenTeacher(PeerSource):
    """The frozen teacher of offline KD (and of a born-again generation): one model, or with
    distill.teacher_ensemble every peer of the teacher run, whose logits are then the log of
    their mean probability. It is read from the run's own copy (rundir.TEACHER, written once by
    the driver: lifecycle.write_copy), so a checkpoint names the teacher instead of storing
    it again, and a resumed run goes on with the same teacher even if its source has changed
    since; outside a run, from the source."""

    def __init__(self, ctx: TeacherContext, peer: int):
        self.forwards, self.disk, self.cache, self.client = 0, None, None, None
        self.form, self.device = LogitForm.of(ctx.cfg), ctx.device
        if ctx.service:  # the teacher runs in the service's actors: nothing to build here
            from .service import ServiceClient

            self.client = ServiceClient(ctx.service)
            self.model_name, self.source, self.models, self.model = "service", ",".join(ctx.service), [], None
            return
        copy = _run_copy(ctx.run_dir)
        if copy is not None:
            members = [(TeacherSource(m["source"], m["model_name"], m.get("peer")), m["model"]) for m in copy]
        else:
            members = [(src, load_weights(src)) for src in resolve_teachers(ctx.cfg.distill)]
        self.model_name = "+".join(src.model_name for src, _ in members)
        self.source = members[0][0].path
        nets = []
        for src, weights in members:
            net = ctx.build_model(src.model_name)
            load_into(net, weights, src)
            nets.append(net.to(ctx.device).eval().requires_grad_(False))
        self.models = nets
        self.model = nets[0] if len(nets) == 1 else Ensemble(nets)
        self.cache = LogitCache() if ctx.cfg.distill.cache_teacher else None
        self.forwards = 0
        """Examples the teacher ran on in this process (the loop reports it as teacher_forwards)."""
        self.disk = None
        if ctx.cfg.distill.teacher_cache_dir:
            from .cache import cache_key

            key = cache_key(ctx.cfg, [(src.model_name, weights) for src, weights in members])
            self.disk = shared_disk_cache(ctx.cfg.distill.teacher_cache_dir, key)

    @staticmethod
    def check(cfg: Config, models: Mapping, datasets: Mapping, data=None) -> list[tuple[TeacherSource, dict]]:
        """On the driver: the checkpoint exists, names a known model, and its weights fit that
        model on this dataset (a mismatch found on a worker would cost retries). Returns each
        member's source and weights, which the driver copies into the run directory once."""
        from ..data.datasets import load_data
        from ..models.builders import build_model

        out = []
        for src in resolve_teachers(cfg.distill, models):
            weights = load_weights(src)
            if data is None:
                data = load_data(cfg.data, datasets)  # the teacher is built for the dataset's real first examples
            load_into(build_model(src.model_name, data.sample, data.num_classes, models, field="distill.teacher_model",
                                  label_shape=data.label_shape), weights, src)
            out.append((src, weights))
        return out

    @torch.no_grad()
    def target(self, x: Tensor, student_logits: Tensor, step: int, form, peer: int, generated: Tensor | None = None):
        """The teacher's output in the run's form, from the service, the disk cache or the model.
        One teacher for every peer: its index in the seed rule is 0 wherever it runs.
        `generated` (B,) marks rows a student wrote itself (on-policy): they never repeat, so they
        go through the teacher and are kept by no cache; the data rows still come from one."""
        fresh = None if generated is None or not bool(generated.any()) else generated
        if self.client is not None:
            rows = None if fresh is None else fresh.nonzero().squeeze(1).tolist()
            out = self.form.from_wire(self.client.get(x, step, transient=rows)).to(self.device)
        elif self.disk is not None:
            out = self._from_disk(x, fresh)
        elif fresh is not None and self.cache is not None:
            z_fresh = self._counted(x[fresh])
            z = z_fresh.new_empty(len(x), *z_fresh.shape[1:])
            z[fresh] = z_fresh
            if bool((~fresh).any()):
                z[~fresh] = self.cache.get(x[~fresh], self._counted)
            out = self.form.output(z, x=x, teacher=0)
        else:
            out = self.form.output(self.logits(x, student_logits, step)[0], x=x, teacher=0)
        return self.form.target([out])

    @torch.no_grad()
    def logits(self, x: Tensor, student_logits: Tensor, step: int = 0):
        """The teacher's dense logits (1, B, ..., V), run here (through the in-memory cache if any)."""
        if self.cache is None:
            self.forwards += len(x)
            return self.model(x).float().unsqueeze(0)
        return self.cache.get(x, self._counted).unsqueeze(0)

    def _counted(self, rows: Tensor) -> Tensor:
        self.forwards += len(rows)
        return self.model(rows).float()

    @torch.no_grad()
    def reference(self, x: Tensor) -> Tensor:
        if self.client is not None:
            return None  # the dense teacher is the service's; its form is measured there
        return self.model(x).float().unsqueeze(0)

    def prefetch(self, x: Tensor, step: int) -> None:
        if self.client is not None:
            self.client.prefetch(x, step)

    def _from_disk(self, x: Tensor, fresh: Tensor | None = None):
        """This batch's output from the disk cache; the examples it lacks go through the teacher
        once and are added (written with the next checkpoint). Rows marked `fresh` (a student's
        own continuations) go through the teacher and are not added."""
        keys = example_digests(x)
        skip = set() if fresh is None else set(fresh.nonzero().squeeze(1).tolist())
        missing = [i for i in self.disk.missing(keys) if i not in skip]
        if missing:
            z = self._counted(x[missing])
            self.disk.put([keys[i] for i in missing],
                          self.form.entries(self.form.output(z, digests=[keys[i] for i in missing], teacher=0)))
        entries = {}
        if skip:
            rows = sorted(skip)
            z = self._counted(x[rows])
            entries = dict(zip(rows, self.form.entries(self.form.output(z, digests=[keys[i] for i in rows], teacher=0))))
        return self.form.stack([entries[i] if i in entries else self.disk.entries[k] for i, k in enumerate(keys)],
                               x.device)

    def state_dict(self) -> dict:
        if self.client is not None:
            return {"model_name": self.model_name, "source": self.source}
        if self.disk is not None:
            self.disk.flush()  # the cache's new entries are kept with the checkpoint that needed them
        # the teacher itself is in the run directory once (rundir.TEACHER), not in every checkpoint
        return {"model_name": self.model_name, "source": self.source}

    def load_state_dict(self, state: dict) -> None:
        if "model" in state:  # a checkpoint of an earlier version, which stored the teacher in it
            self.model.load_state_dict(state["model"])


_DISK_CACHES: dict = {}


def shared_disk_cache(root: str, key: str):
    """One DiskCache per process and key: the peers of a worker share their teacher's entries."""
    from .cache import DiskCache

    if (root, key) not in _DISK_CACHES:
        _DISK_CACHES[(root, key)] = DiskCache(root, key)
    return _DISK_CACHES[(root, key)]


def resolve_teachers(d: DistillConfig, models: Mapping | None = None) -> list[TeacherSource]:
    """The teacher's source, or every peer's of its checkpoint with distill.teacher_ensemble."""
    if not d.teacher_ensemble:
        return [resolve_teacher(d, models)]
    first = resolve_teacher(d, models)
    if first.peer is None:
        raise ConfigError(f"distill.teacher_ensemble: true, but {d.teacher_checkpoint!r} is a plain state dict; allowed: "
                          "a run or checkpoint directory whose peers form the ensemble", "distill.teacher_ensemble")
    ckpt = storage.parent(first.path)
    return [resolve_teacher(dataclasses.replace(d, teacher_peer=p, teacher_checkpoint=ckpt), models)
            for p in peer_files(storage.listing(ckpt, files=True) or {})]


def _run_copy(run_dir) -> list[dict] | None:
    """The members of the run's copy of its frozen teacher (None outside a run, or before the
    driver wrote it)."""
    from ..rundir.layout import TEACHER

    if run_dir is None:
        return None
    data = run_dir.read_bytes(TEACHER)
    return None if data is None else read_members(data)


class BornAgain(PeerSource):
    """distill.mode='born_again' as a worker would see it: generation 0, labels only. launch.train
    never sends this mode to workers: generations.py runs generation 0 as an 'independent' run
    and generation g as an 'offline' run taught by frozen generation g - 1 (FrozenTeacher)."""

    def __init__(self, ctx: TeacherContext, peer: int):
        pass

    @staticmethod
    def check(cfg: Config, models: Mapping, datasets: Mapping, data=None) -> None:
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


@torch.no_grad()
def fill_disk_cache(cfg: Config, data, members: list, models: Mapping | None = None, batch_size: int = 256) -> tuple[int, int]:
    """On the driver, before any worker starts: every training example's teacher output into the
    disk cache (distill.teacher_cache_dir), so the run, and every later run and sweep trial of the
    same teacher, data and form, runs the teacher zero times. Returns (computed now, examples)."""
    from ..core.host import memory_format
    from ..data.datasets import Batches
    from ..models.builders import build_model
    from .cache import cache_key

    fmt = memory_format(data.sample, cfg.scale.channels_last)
    nets = []
    for src, weights in members:
        net = build_model(src.model_name, data.sample, data.num_classes, models, memory_format=fmt,
                          label_shape=data.label_shape)
        load_into(net, weights, src)
        nets.append(net.eval())
    model = nets[0] if len(nets) == 1 else Ensemble(nets)
    disk = shared_disk_cache(cfg.distill.teacher_cache_dir, cache_key(cfg, [(s.model_name, w) for s, w in members]))
    form = LogitForm.of(cfg)
    computed = 0
    with disk.filling():  # two runs started together: one fills, the other waits and reads
        for x, _ in Batches(data.train, batch_size, torch.device("cpu"), shuffle=False, drop_last=False,
                            memory_format=fmt):
            keys = example_digests(x)
            missing = disk.missing(keys)
            if not missing:
                continue
            z = model(x[missing]).float()
            fresh = [keys[i] for i in missing]
            disk.put(fresh, form.entries(form.output(z, digests=fresh, teacher=0)))
            computed += len(missing)
        disk.flush()
    return computed, len(data.train)
