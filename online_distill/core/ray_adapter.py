"""Ray behind one door: every private or version-specific Ray API the package uses, and nowhere else.

online_distill supports Ray 2.60.x (pyproject pins ray==2.60.0). Public Ray (ray.train, ray.tune,
ray.util) is used where it is needed; what public Ray does not offer is adapted here, each
behind a small function or class that says what it is for:

- `torch_trainer`: a TorchTrainer whose controller asks `FailureHooks` first (no retry for an
  error a retry cannot fix, a line before each retry) and, for an embedded Ray, starts without
  Train's cleaner of a dead driver's placement groups. Train V2 has no public failure-policy
  setting: its trainer's private `_initialize_and_run_controller` and
  `_create_default_callbacks` are overridden.
- `ControllerWatch`: callbacks that run in the Train controller (its start, each worker group
  it starts, the group running or the run ending); Train's ControllerCallback is private.
- `cleans_up_first`: Tune calls a function before it ends a trial's actor (Tune's `__mixins__`
  hook for function trainables).
- `no_trial_retry_when`: Tune does not retry a trial that failed on some errors
  (`Trial.should_recover`, wrapped for the length of a sweep).
- `root_error`, `worker_traceback`: the user's exception and traceback inside Ray's wrappers.
- `read_ray_address`: the address a `ray start` on this machine left for ray.init().
- `workers_stderr_to`: what Ray forwards from its processes to the driver, split: their stdout
  to the terminal, their stderr (tracebacks, Ray's loggers) and the raylet's notices to a run's
  log (Ray's log dispatcher and raylet printer are private).
- `quiet_*`: Ray loggers whose INFO lines our own output says better, by their (private) names.
- Train V2's local mode (`ScalingConfig(num_workers=0)`, ray/train/v2/_internal/execution/
  local_mode/ and train_fn_utils.LocalTrainFnUtils) runs the loop in the calling process and
  retries nothing; run/in_process.py retries it as the controller would.

Importing this module imports no Ray (the CLI sets Ray's environment first, run/env.py): each
private import happens at first use, and the classes built on Ray's private ones are made on
first access (`__getattr__`, PEP 562), under their own names here, so they pickle by reference
into the Train controller.

On another Ray version: a warning, not an error. Each process a person started (not Ray's own
actors) prints one line, `version_line`, at its first use of a private API, and goes on: a
private API that is still there may still work, and the line names this file as the place to
look when one does not. A private import that fails is an error, `UnsupportedRay` (a
NotRetryable: no retry is spent on it, and the CLI prints it as one paragraph).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import NotRetryable

SUPPORTED_RAY = "2.60"
"""The Ray release series (major.minor) whose private APIs this module adapts: 2.60.x."""
ADAPTER_PATH = "online_distill/core/ray_adapter.py"


# ---- the version check -----------------------------------------------------------------------

def version_line(found: str) -> str:
    """The one line that says which Ray versions are supported, and where to look on another."""
    return (f"online_distill supports Ray {SUPPORTED_RAY}.x (found {found}); "
            f"the private Ray APIs it adapts are in {ADAPTER_PATH}")


def unsupported(version: str) -> str | None:
    """`version_line(version)` when `version` is outside the supported series, else None."""
    if version == SUPPORTED_RAY or version.startswith(SUPPORTED_RAY + "."):
        return None
    return version_line(version)


class UnsupportedRay(NotRetryable, ImportError):
    """A private Ray API this package adapts is not in the installed Ray: its version line."""


_SAID: list[str] = []


def check_ray_version(version: str | None = None, out=None) -> str | None:
    """The version line when the installed Ray (or `version`) is unsupported, else None. Printed
    on stderr (or `out`) once per process, and only in a process a person started: in Ray's own
    actors (the Train controller, workers, Tune trials) the driver has said it already."""
    import ray

    line = unsupported(version or ray.__version__)
    if line is None or _SAID or _in_ray_actor():
        return line
    _SAID.append(line)
    print(line, file=out or sys.stderr, flush=True)
    return line


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


@contextlib.contextmanager
def _private_ray() -> Iterator[None]:
    """Around every private Ray import: the version line first; a failed import as UnsupportedRay."""
    check_ray_version()
    try:
        yield
    except ImportError as e:
        import ray

        raise UnsupportedRay(version_line(ray.__version__)) from e


# ---- errors as Ray wraps them ----------------------------------------------------------------

def root_error(e: BaseException) -> BaseException:
    """The user's exception inside what Ray wraps around it (UserExceptionWithTraceback keeps it
    in `_base_exc`, RayTaskError in `cause`), or e itself."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "_base_exc", None) or getattr(e, "cause", None)
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def worker_traceback(e: BaseException) -> str:
    """The worker's own traceback as Ray kept it with a worker's error, or with each failed
    worker's of a worker group's error ('' when it kept none)."""
    failures = getattr(e, "worker_failures", None) or {}
    kept = [f"rank {rank}:\n{getattr(f, '_traceback_str', '')}" for rank, f in sorted(failures.items())
            if getattr(f, "_traceback_str", "")]
    return "\n".join(kept) or getattr(e, "_traceback_str", "") or ""


# ---- the cluster a run joins, and Ray's log lines ----------------------------------------------

def read_ray_address(temp_dir: str | None = None) -> str | None:
    """The address a `ray start` on this machine left for ray.init() to join (in Ray's temp
    directory, or `temp_dir`); None when it left none."""
    with _private_ray():
        from ray._private.utils import read_ray_address as read

    return read(temp_dir)


def workers_stderr_to(aside: Callable[[str], None]) -> None:
    """From now on, what Ray forwards to this driver from its processes is split: their stdout
    (rank 0's epoch lines, the controller's lines of ours) is printed as Ray prints it; their
    stderr (Ray's loggers, the tracebacks of a failed rank, warnings) and the raylet's messages
    ("(raylet) A worker died ...") go to `aside(text)`, whole. A later call names another `aside`;
    lines that arrive late (a run's last tracebacks, after its fit() returned) go to the last one
    named, never to the terminal. Ray prints both through one handler of its log dispatcher (the
    workers' output) and one function (the raylet's), both private; without log_to_driver there
    is nothing to split and nothing is changed."""
    _ASIDE[:] = [aside]
    with _private_ray():
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def split(print_lines: Callable) -> Callable:
        def handle(data, *args, **kwargs):
            if not (data.get("is_err") or data.get("pid") in ("raylet", "autoscaler")):
                return print_lines(data, *args, **kwargs)
            who = data.get("actor_name") or data.get("task_name") or ""
            source = f"({who} pid={data.get('pid')}, ip={data.get('ip', '?')})".replace("( ", "(")
            lines = data.get("lines", [])
            if data.get("pid") == "autoscaler":  # its events only, not its status every 5 s
                lines = list(ray_worker.filter_autoscaler_events(lines))
            text = "".join(f"{source} {line}\n" for line in lines)
            if text:
                _ASIDE[0](text)
            return None

        if getattr(print_lines, "splits_stderr", False):  # split already (Ray keeps its handler across runs)
            return print_lines
        handle.splits_stderr = True
        return handle

    ray_worker.print_to_stdstream = split(ray_worker.print_to_stdstream)  # the raylet's messages come through it
    # the workers' output: its handler is registered by ray.init (again after a ray.shutdown)
    dispatcher.handlers = [(name, split(h) if name == "ray_print_logs" else h) for name, h in dispatcher.handlers]


_ASIDE: list[Callable[[str], None]] = []


def quiet_token_notice() -> None:
    """Ray announces, once per start, that the local cluster it makes has token authentication
    on: the secure default, which a run on this machine does not need to be told about."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def quiet_local_mode_notice() -> None:
    """ScalingConfig announces Train's local mode at INFO on every trial; that it runs so is our design."""
    logging.getLogger("ray.train.v2.api.config").setLevel(logging.WARNING)


def quiet_checkpoint_notices() -> None:
    """Tune logs every checkpoint it persists at INFO ("Checkpoint successfully created at ..."),
    a line per trial and epoch; the epoch lines and Tune's status table say it better."""
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)


def quiet_report_logs() -> None:
    """Ray Train logs every report (with all metrics) at INFO from loggers named by file path,
    which RunConfig's LoggingConfig does not reach; our own epoch line says it better. Only
    quieter: where these modules are gone, nothing is done."""
    try:
        with _private_ray():
            from ray.train.v2._internal.execution import context, storage
    except UnsupportedRay:
        return
    for module in (context, storage):
        logging.getLogger(module.__file__).setLevel(logging.WARNING)


# ---- Ray Train: the controller's failure policy and callbacks ----------------------------------

class FailureHooks:
    """What a run adds to Ray Train's default failure policy (retry under
    FailureConfig.max_failures). Runs in the Train controller: it must pickle."""

    def ends_run(self, error: BaseException) -> bool:
        """True: the run ends on this worker group error now, with no retry spent."""
        return False

    def retrying(self, error: BaseException, retry: int, max_failures: int) -> None:
        """Called before each retry the default policy allows; `retry` counts from 1, and
        `max_failures` is FailureConfig's (-1: unlimited)."""


def torch_trainer(train_loop: Callable, *, failure_hooks: FailureHooks | None = None,
                  placement_group_cleaner: bool = True, **kwargs: Any):
    """`ray.train.torch.TorchTrainer(train_loop, **kwargs)` whose controller asks `failure_hooks`
    before Ray's default failure policy decides. `placement_group_cleaner=False` (an embedded
    Ray, which ends with this process, placement groups and all) leaves out Train's cleaner of a
    dead driver's placement groups: it would have nothing to do, and it asks the state API for
    the controller and prints a traceback when another Ray runs on the machine."""
    check_ray_version()
    trainer = _made("HookedTorchTrainer")(train_loop, **kwargs)
    trainer.failure_hooks, trainer.placement_group_cleaner = failure_hooks, placement_group_cleaner
    return trainer


def _make_hooked_torch_trainer() -> type:
    from ray.train.torch import TorchTrainer

    class HookedTorchTrainer(TorchTrainer):
        """TorchTrainer with a failure policy of FailureHooks, and optionally no placement group cleaner."""

        failure_hooks: FailureHooks | None = None
        placement_group_cleaner = True

        def _initialize_and_run_controller(self, **kwargs):
            if self.failure_hooks is not None:
                kwargs["failure_policy"] = _made("HookedFailurePolicy")(self.run_config.failure_config,
                                                                       self.failure_hooks)
            return super()._initialize_and_run_controller(**kwargs)

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if not self.placement_group_cleaner:
                callbacks = [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]
            return callbacks

    return HookedTorchTrainer


def _make_hooked_failure_policy() -> type:
    with _private_ray():
        from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

    class HookedFailurePolicy(DefaultFailurePolicy):
        """Ray's default failure policy, with a FailureHooks' say before and after it decides."""

        def __init__(self, failure_config, hooks: FailureHooks):
            super().__init__(failure_config)
            self.hooks = hooks

        def make_decision(self, training_failed_error):
            if self.hooks.ends_run(training_failed_error):
                return FailureDecision.RAISE
            decision = super().make_decision(training_failed_error)
            if decision == FailureDecision.RETRY:
                self.hooks.retrying(training_failed_error, self._worker_group_failures,
                                    self.failure_config.max_failures)
            return decision

    return HookedFailurePolicy


SETTLED_STATES = ("RunningState", "ErroredState", "FinishedState", "AbortedState", "ShuttingDownState")
"""The Train controller's states in which a worker group no longer waits to start."""


def _make_controller_watch() -> type:
    with _private_ray():
        from ray.train.v2._internal.execution.callback import ControllerCallback

    class ControllerWatch(ControllerCallback):
        """Base of a callback that runs in the Train controller (pass it in RunConfig.callbacks;
        it must pickle). Override any of the three; each is called in the controller."""

        def controller_started(self) -> None:
            """The controller started, before it asks for a worker group."""

        def group_starting(self) -> None:
            """The controller is about to start a worker group (its first, or after a failure)."""

        def group_settled(self) -> None:
            """The worker group is running, or the run ended (errored, finished, aborted)."""

        def after_controller_start(self, train_run_context) -> None:
            self.controller_started()

        def before_controller_execute_resize_decision(self, resize_decision) -> None:
            self.group_starting()

        def after_controller_state_update(self, previous_state, current_state) -> None:
            if type(current_state).__name__ in SETTLED_STATES:
                self.group_settled()

    return ControllerWatch


# ---- Ray Tune: a trial's clean-up and its retries -----------------------------------------------

def cleans_up_first(trainable: Callable, cleanup: Callable[[], None]) -> Callable:
    """Make Tune call `cleanup()` in a trial's actor (of function trainable `trainable`) before
    it ends the trial (stopped by a scheduler, paused to exploit, an interrupted sweep), through
    Tune's `__mixins__` hook for function trainables. Returns `trainable`."""

    class CleansUpFirst:
        def cleanup(self):
            cleanup()
            super().cleanup()

    trainable.__mixins__ = (CleansUpFirst,)
    return trainable


@contextlib.contextmanager
def no_trial_retry_when(gives_up: Callable[[BaseException], bool]) -> Iterator[None]:
    """While this holds, Tune does not retry a trial whose error `gives_up` on (it retries the
    rest under tune.FailureConfig.max_failures). Tune has no hook for it, so Trial.should_recover
    (read in the Tune driver, where this must run) is wrapped."""
    with _private_ray():
        from ray.tune.experiment.trial import Trial

    original = Trial.should_recover

    def should_recover(self):
        try:
            error = self.get_pickled_error()
        except Exception:  # noqa: BLE001 - no readable error: Tune's own rule
            error = None
        if error is not None and gives_up(error):
            return False
        return original(self)

    Trial.should_recover = should_recover
    try:
        yield
    finally:
        Trial.should_recover = original


# ---- classes made on first access ---------------------------------------------------------------

_MAKERS: dict[str, Callable[[], type]] = {
    "ControllerWatch": _make_controller_watch,
    "HookedFailurePolicy": _make_hooked_failure_policy,
    "HookedTorchTrainer": _make_hooked_torch_trainer,
}


def _made(name: str) -> type:
    """The class `name` of _MAKERS, made once."""
    return globals().get(name) or __getattr__(name)


def __getattr__(name: str) -> type:
    """A class built on a private Ray class, made on first access and kept under `name`, so
    `online_distill.core.ray_adapter.<name>` finds it when the controller unpickles it."""
    make = _MAKERS.get(name)
    if make is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = make()
    cls.__module__, cls.__qualname__ = __name__, name
    globals()[name] = cls
    return cls
