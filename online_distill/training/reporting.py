"""What a worker does with each finished epoch: write its checkpoint into the run directory (every
rank its own files, committed by rank 0 once all are written), then tell whoever listens.

One writer for every way a cohort runs: a Ray Train worker group, Train's local mode in the
driver's process, a Tune trial. Checkpoints never go through Ray's own persistence, so the run
directory has one owner (rundir.py), a failed write is a StorageError that is not retried, and
a half-written checkpoint never has a checkpoint's name. The listeners:
- "train": ray.train.report(metrics) on every rank (a worker group; a Tune trial's driver relays
  the metrics and the checkpoint path, `checkpoint_dir` in the metrics, to Tune);
- "tune": ray.tune.report(metrics, checkpoint) (a Tune trial whose cohort trains in its process);
- None: nobody (the driver reads the run directory when the run ends).
Experiment trackers (TensorBoard, MLflow, W&B) get rank 0's metrics of each epoch.
"""
from __future__ import annotations

import torch.distributed as dist

from ..config.schema import Config
from ..rundir import checkpoint as ckpt
from ..rundir.layout import TRACKERS, RunDir, checkpoint_name

CHECKPOINT_KEY = "checkpoint_dir"
"""The metric that carries an epoch's checkpoint directory to a Tune trial's driver."""


class CheckpointReporter:
    def __init__(self, run_dir: RunDir, cfg: Config, rank: int, *, notify: str | None = None, group: str | None = None):
        self.run_dir, self.cfg, self.rank, self.notify, self.group = run_dir, cfg, rank, notify, group
        self.trackers = None
        """The run's experiment trackers (run.loggers), opened by rank 0 at its first epoch."""

    def __call__(self, epoch: ckpt.Epoch) -> None:
        name = checkpoint_name(epoch.index)
        if self.rank == 0:
            self.run_dir.begin_checkpoint(name)
        _barrier()
        ckpt.save(self.run_dir.saving_dir(name), epoch)
        _barrier()  # every rank's files and manifest are written
        path = self.run_dir.file(name)
        if self.rank == 0:
            self.run_dir.commit_checkpoint(name)
            self.run_dir.prune(self.cfg.run.checkpoints_to_keep)
            self._track(epoch)
        if self.notify == "train":
            import ray.train

            ray.train.report({**epoch.metrics, CHECKPOINT_KEY: path} if self.rank == 0 else {})
        elif self.notify == "tune":
            import ray.tune

            ray.tune.report(epoch.metrics, checkpoint=ray.tune.Checkpoint(path))


    def _track(self, epoch: ckpt.Epoch) -> None:
        if not self.cfg.run.loggers:
            return
        if self.trackers is None:
            from ..config import files as config_file
            from ..rundir.trackers import TrackerRun, open_trackers

            run = TrackerRun(self.run_dir.path, self.cfg.run.name, self.group, config_file.to_dict(self.cfg),
                             self.run_dir.read_json(TRACKERS) or {})
            self.trackers = open_trackers(self.cfg.run.loggers, run)
            self.run_dir.write_json(TRACKERS, self.trackers.ids)
        self.trackers.log_epoch(epoch.index + 1, epoch.metrics)
        if epoch.last:
            from ..rundir.tables import final_table, history_frame

            self.trackers.log_table("final", final_table(history_frame(epoch.history)))
            self.finish("finished")

    def finish(self, status: str) -> None:
        """Close the trackers (a failed or interrupted run says so to them)."""
        if self.trackers is not None:
            self.trackers.finish(status)
            self.trackers = None


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
