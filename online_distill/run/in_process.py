"""A cohort of one worker, trained in the driver's own process.

A cohort that fits one worker (one replica, all its peers packed in it) needs no worker group.
Where `train` joins no cluster, it trains such a cohort through Ray Train V2's local mode
(ScalingConfig(num_workers=0): the training function runs in the calling process), and no Ray
cluster, Train controller or worker process is started: on 2 CPU cores that is ~20 s less per
run, and on a one-GPU machine the GPU is this process's.

The loop writes its checkpoints into the run directory itself, as a worker group's ranks do
(reporting.py), so the files are the same either way and a run may move between the two. Local
mode retries nothing (where Ray's code shows it: core/ray_adapter.py), so this module does what
Train's controller does for a worker group: an exception in the loop is retried from the newest
checkpoint, run.max_failures times, except an error a retry cannot fix (errors.NotRetryable),
which ends the run at once. A crash of the process itself (a segfault, the kernel's OOM killer)
ends the run: rerun the command and it resumes, or choose a worker group (run.in_process: never).
"""
from __future__ import annotations

import sys

from ..config.schema import Config
from ..errors import NotRetryable
from ..rundir.checkpoint import find_resume_point
from ..rundir.layout import RunDir
from .env import cluster_address


def runs_in_process(cfg: Config) -> bool:
    """Whether `train` trains this cohort in the calling process (run.in_process)."""
    return cfg.in_one_process and (cfg.run.in_process == "always" or cluster_address() is None)


def fit_in_process(cfg: Config, run: RunDir, start: str | None, make_trainer, *, models=None, datasets=None,
                   notify: str | None = None, group: str | None = None, verbose: bool = True, data=None,
                   service: list[str] | None = None, layout=None) -> None:
    """Train the cohort in this process from checkpoint directory `start` (None: from scratch),
    retrying a failed attempt from the newest checkpoint; `make_trainer` is launch.make_trainer."""
    failures = 0
    while True:
        try:
            make_trainer(cfg, run, models=models, datasets=datasets, resume_from=start, local=True, notify=notify,
                         group=group, verbose=verbose, data=data, service=service, layout=layout).fit()
            return
        except NotRetryable:
            raise
        except Exception as e:  # what FailureConfig retries in a worker group: any other error of the loop
            if cfg.run.max_failures != -1 and failures >= cfg.run.max_failures:
                raise
            failures += 1
            point = find_resume_point(run, cfg.num_peers)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            limit = "unlimited" if cfg.run.max_failures == -1 else cfg.run.max_failures
            print(f"run {cfg.run.name!r}: training failed ({type(e).__name__}: {first}); retry {failures} of "
                  f"{limit} (run.max_failures), resuming {point.describe()}", file=sys.stderr, flush=True)
