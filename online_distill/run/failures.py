"""What a worker group does when a worker fails, and what the person watching is told.

Both run inside the Train controller (an actor of its own), where Ray Train decides:
- `OurFailurePolicy`: Ray's default policy (retry under run.max_failures), except that an error
  a retry cannot fix (errors.NotRetryable: a NaN loss, a bad label, a full disk) ends the run at
  once, with no retry spent.
- `SayWhatHappens`: one line when the worker group is lost and the run resumes (from which
  checkpoint, which attempt of run.max_failures), and one while the controller waits for the
  resources to start the new group (a lost node), instead of tracebacks and silence.
"""
from __future__ import annotations

import sys
import threading
import time

from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from ..errors import NotRetryable


def root_error(e: BaseException) -> BaseException:
    """The user's exception inside what Ray wraps around it (UserExceptionWithTraceback,
    RayTaskError), or e itself."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "_base_exc", None) or getattr(e, "cause", None)
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


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
        parts.append(f"rank {rank}: {type(root).__name__} ({first})")
    return "; ".join(parts)


class OurFailurePolicy(DefaultFailurePolicy):
    def __init__(self, failure_config, run_name: str, run_dir: str, num_peers: int):
        super().__init__(failure_config)
        self.run_name, self.run_dir, self.num_peers = run_name, run_dir, num_peers

    def make_decision(self, training_failed_error) -> FailureDecision:
        if not_retryable(training_failed_error) is not None:
            return FailureDecision.RAISE
        decision = super().make_decision(training_failed_error)
        if decision == FailureDecision.RETRY:
            from ..rundir.checkpoint import find_resume_point
            from ..rundir.layout import RunDir

            point = find_resume_point(RunDir(self.run_dir), self.num_peers, deep=False)
            limit = self.failure_config.max_failures
            limit = "unlimited" if limit == -1 else limit
            print(f"run {self.run_name!r}: worker lost ({worker_summary(training_failed_error)}); resuming "
                  f"{point.describe()}, retry {self._worker_group_failures} of {limit} (run.max_failures)",
                  file=sys.stderr, flush=True)
        return decision


class SayWhatHappens(ControllerCallback):
    """One line every WAIT_S while a worker group is not running yet: waiting for its resources
    (after a lost worker or node, until one comes back or is replaced) or for its processes to
    start. A first start says so only once it has taken longer than a start should."""

    WAIT_S = 30.0

    def __init__(self, run_name: str, workers: int, resources: dict):
        self.run_name, self.workers, self.resources = run_name, workers, resources
        self._stop: threading.Event | None = None
        self._starts = 0

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
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
                      f"after {time.monotonic() - since:.0f} s: {why}", file=sys.stderr, flush=True)
                if stop.wait(self.WAIT_S):
                    return

        threading.Thread(target=watch, name="say-waiting", daemon=True).start()

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if type(current_state).__name__ in ("RunningState", "ErroredState", "FinishedState", "AbortedState",
                                             "ShuttingDownState"):
            self._stopped()

    def _stopped(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
