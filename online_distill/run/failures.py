"""What a worker group does when a worker fails, and what the person watching is told.

Both run inside the Train controller (an actor of its own), where Ray Train decides; Ray's
hooks for them are adapted in core/ray_adapter.py:
- `OurFailurePolicy`: Ray's default policy (retry under run.max_failures), except that an error
  a retry cannot fix (errors.NotRetryable: a NaN loss, a bad label, a full disk) ends the run at
  once, with no retry spent.
- `SayWhatHappens`: one line when the worker group is lost and the run resumes (from which
  checkpoint, which attempt of run.max_failures), and one while the controller waits for the
  resources to start the new group (a lost node), instead of tracebacks and silence.
"""
from __future__ import annotations

import threading
import time

from ray.train import WorkerGroupError

from ..core.ray_adapter import ControllerWatch, FailureHooks, root_error
from ..errors import NotRetryable
from ..training.blame import lost_peer


def not_retryable(error: BaseException) -> NotRetryable | None:
    """The NotRetryable error a worker group failed with, if any worker's was one."""
    if isinstance(error, WorkerGroupError):
        for failure in error.worker_failures.values():
            root = root_error(failure)
            if isinstance(root, NotRetryable):
                return root
    root = root_error(error)
    return root if isinstance(root, NotRetryable) else None


def worker_summary(error: BaseException) -> str:
    """'rank 1: ActorDiedError (the worker process died)' for the failed workers of a group."""
    if not isinstance(error, WorkerGroupError):
        return type(error).__name__
    parts = []
    for rank, failure in sorted(error.worker_failures.items()):
        root = root_error(failure)
        first = (str(root).strip().splitlines() or [""])[0][:160]
        if "ActorDied" in type(root).__name__ or "died" in first.lower():
            first = "the worker process (or its node) was lost"
        elif lost_peer(root):
            first = "a collective failed: another rank was lost"
        parts.append(f"rank {rank}: {type(root).__name__} ({first})")
    return "; ".join(parts)


class OurFailurePolicy(FailureHooks):
    """What our runs add to Ray Train's default failure policy: no retry for NotRetryable, and a
    line before each retry naming the checkpoint the run resumes from."""

    def __init__(self, run_name: str, run_dir: str, num_peers: int):
        self.run_name, self.run_dir, self.num_peers = run_name, run_dir, num_peers

    def ends_run(self, error: BaseException) -> bool:
        return not_retryable(error) is not None

    def retrying(self, error: BaseException, retry: int, max_failures: int) -> None:
        from ..rundir.checkpoint import find_resume_point
        from ..rundir.layout import RunDir

        point = find_resume_point(RunDir(self.run_dir), self.num_peers, deep=False)
        limit = "unlimited" if max_failures == -1 else max_failures
        print(f"run {self.run_name!r}: worker lost ({worker_summary(error)}); resuming "
              f"{point.describe()}, retry {retry} of {limit} (run.max_failures)", flush=True)


class SayWhatHappens(ControllerWatch):
    """One line every WAIT_S while a worker group is not running yet: waiting for its resources
    (after a lost worker or node, until one comes back or is replaced) or for its processes to
    start. A first start says so only once it has taken longer than a start should."""

    WAIT_S = 30.0

    def __init__(self, run_name: str, workers: int, resources: dict):
        self.run_name, self.workers, self.resources = run_name, workers, resources
        self._stop: threading.Event | None = None
        self._starts = 0

    def group_starting(self) -> None:
        self._stopped()
        self._starts += 1
        stop, since, restart = threading.Event(), time.monotonic(), self._starts > 1
        self._stop = stop
        need = ", ".join(f"{v:g} {k}" for k, v in self.resources.items())
        first_after = self.WAIT_S if restart else 2 * self.WAIT_S

        def watch() -> None:
            if stop.wait(first_after):
                return
            while True:
                why = ("waiting for resources (a lost node must come back or be replaced) or for the workers to start"
                       if restart else "waiting for resources or for the workers to start")
                print(f"run {self.run_name!r}: the worker group ({self.workers} worker(s) of {need}) is not running yet "
                      f"after {time.monotonic() - since:.0f} s: {why}", flush=True)
                if stop.wait(self.WAIT_S):
                    return

        threading.Thread(target=watch, name="say-waiting", daemon=True).start()

    def group_settled(self) -> None:
        self._stopped()

    def _stopped(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
