"""A cohort of one worker, trained in the driver's own process.

A cohort that fits one worker (one replica, all its peers packed in it) needs no worker group.
Where `train` joins no cluster, it trains such a cohort through Ray Train V2's local mode
(ScalingConfig(num_workers=0): the training function runs in the calling process), and no Ray
cluster, Train controller or worker process is started: on 2 CPU cores that is ~20 s less per
run, and on a one-GPU machine the GPU is this process's.

Local mode keeps only its last report, in memory, and retries nothing (ray/train/v2/_internal/
execution/local_mode/), so this module does for it what Train's controller does for a worker
group, with the same files in the run directory:
- every epoch's checkpoint is written there under the name a worker group gives it
  (checkpoint_epoch_0003), complete before it has that name on a local disk (on an object store,
  its manifests say whether it is complete), and the newest run.checkpoints_to_keep are kept;
- an exception in the loop is retried from the newest checkpoint, run.max_failures times, as
  FailureConfig does. A crash of the process itself (a segfault, the kernel's OOM killer) ends
  the run: rerun the command and it resumes, or choose a worker group (run.in_process: never);
- a rerun resumes from the newest checkpoint that is complete and loads (resume.py), so a run
  started in a worker group may go on in-process (say, moved from two GPUs to one) and back.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pyarrow.fs as pafs

from .. import checkpoint as ckpt
from .. import storage
from ..config import Config, ConfigError


def cluster_address() -> str | None:
    """The Ray cluster a run would join: RAY_ADDRESS, or the address a `ray start` on this
    machine left behind (what ray.init() would join too); None: none, Ray would start locally."""
    from ray._private.utils import read_ray_address

    return os.environ.get("RAY_ADDRESS") or read_ray_address()


def runs_in_process(cfg: Config) -> bool:
    """Whether `train` trains this cohort in the calling process (run.in_process)."""
    return cfg.in_one_process and (cfg.run.in_process == "always" or cluster_address() is None)


def check_machine(cfg: Config) -> None:
    """What check_resources is for a worker group: refuse what this process cannot give."""
    cpus = os.cpu_count() or 1
    if cfg.scale.cpus_per_worker > cpus:
        raise ConfigError(f"scale.cpus_per_worker: got {cfg.scale.cpus_per_worker:g}; allowed: at most {cpus}, the CPUs "
                          "of this machine (the cohort trains in this process: run.in_process)", "scale.cpus_per_worker")
    if cfg.scale.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("scale.use_gpu: true, but this machine has no GPU that torch can use (the cohort trains "
                              "in this process: run.in_process). Allowed: false, or a cluster with GPUs (RAY_ADDRESS)",
                              "scale.use_gpu")


class CheckpointWriter:
    """The loop's reporter in local mode: each epoch's checkpoint into the run directory, the
    older ones beyond `keep` removed; remembers the last metrics and checkpoint."""

    def __init__(self, run_dir: str, keep: int):
        self.run_dir, self.keep = run_dir, keep
        self.latest: str | None = None
        self.metrics: dict = {}

    def __call__(self, metrics, cfg, topo, epoch, peers, teacher, history) -> None:
        name = f"checkpoint_epoch_{epoch + 1:04d}"
        dest = storage.join(self.run_dir, name)
        if "://" in self.run_dir:  # an object store has no rename: the manifests tell a cut-short copy
            with tempfile.TemporaryDirectory(prefix="od-ckpt-") as tmp:
                ckpt.save(tmp, topo, epoch, peers, teacher, history, metrics)
                fs, path = storage._resolve(dest)
                pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:  # written beside it under a name no reader takes for a checkpoint, then renamed
            partial = storage.join(self.run_dir, f".saving-{name}")
            shutil.rmtree(partial, ignore_errors=True)  # what a crash mid-save left: its manifest would list it
            os.makedirs(partial)
            ckpt.save(partial, topo, epoch, peers, teacher, history, metrics)
            os.rename(partial, dest)
        self.latest, self.metrics = dest, dict(metrics)
        prune_checkpoints(self.run_dir, self.keep)


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Remove all but the newest `keep` checkpoint_* directories of a run (never one set aside
    as damaged or incomplete); returns the names removed."""
    names = sorted(n for n in storage.listing(run_dir, files=False) or {} if n.startswith("checkpoint_"))
    old = names[:-keep]
    for name in old:
        storage.delete_dir(storage.join(run_dir, name))
    return old


def fit_in_process(cfg: Config, run_dir: str, start: str | None, make_trainer, *, models=None,
                   datasets=None) -> tuple[dict, object]:
    """Train the cohort in this process from checkpoint directory `start` (None: from scratch),
    retrying a failed attempt from the newest checkpoint; `make_trainer` is launch.make_trainer.
    Returns the last epoch's metrics and its checkpoint (a ray.train.Checkpoint), as a worker
    group's Result has them."""
    from ray.train import Checkpoint

    writer = CheckpointWriter(run_dir, cfg.run.checkpoints_to_keep)
    failures = 0
    while True:
        resume = writer.latest or start
        try:
            make_trainer(cfg, models=models, datasets=datasets, local_reporter=writer,
                         resume_from_checkpoint=Checkpoint(resume) if resume else None).fit()
            break
        except Exception as e:  # what FailureConfig retries in a worker group: any error of the loop
            if cfg.run.max_failures != -1 and failures >= cfg.run.max_failures:
                raise
            failures += 1
            again = f"from {os.path.basename(writer.latest or start)}" if writer.latest or start else "from the start"
            first = (str(e).strip().splitlines() or [""])[0][:200]
            limit = "unlimited" if cfg.run.max_failures == -1 else cfg.run.max_failures
            print(f"run {cfg.run.name!r}: training failed ({type(e).__name__}: {first}); retry {failures} of "
                  f"{limit} (run.max_failures) {again}", file=sys.stderr, flush=True)
    if writer.latest is None:  # every epoch was trained already: stopped before its tables were written
        return finished_at(start)
    return writer.metrics, Checkpoint(writer.latest)


def finished_at(checkpoint_dir: str) -> tuple[dict, object]:
    """The metrics and checkpoint of a run whose last epoch is the checkpoint it resumed from
    (it stopped after its last report, before its tables were written)."""
    from ray.train import Checkpoint

    point = Checkpoint(checkpoint_dir)
    with point.as_directory() as d:
        return ckpt.read_metrics(d), point
