"""Ray behind one door (online_distill/core/ray_adapter.py): every private or version-specific
Ray API the package uses is there and nowhere else, the version check says in one line which Ray
it supports, and the adapted private APIs still do what the package relies on in the installed
Ray (checked without a cluster: a Ray upgrade that moves them fails here, not in a run)."""
from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys

import pytest

import online_distill
from online_distill.core import ray_adapter
from online_distill.errors import NotRetryable

PKG_DIR = os.path.dirname(online_distill.__file__)
ADAPTER = os.path.join("core", "ray_adapter.py")
PRIVATE_RAY = re.compile(r"\bray(?:[./]\w+)*?[./]_(?:private|internal)\b")
"""`ray._private...`, `ray.train._internal...`, `ray.train.v2._internal...`, and the same as a path."""
VERSION_SPECIFIC = ("__mixins__", "should_recover", "ControllerCallback", "DefaultFailurePolicy", "FailureDecision",
                    "_initialize_and_run_controller", "_create_default_callbacks", "_worker_group_failures",
                    "_base_exc", "_traceback_str")
"""Tune's and Train's private hooks, classes and attributes the adapter builds on."""


def package_files() -> dict[str, str]:
    """Path relative to the package -> source, for every module of the package."""
    out = {}
    for dp, _, files in os.walk(PKG_DIR):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dp, f)
                out[os.path.relpath(path, PKG_DIR)] = open(path, encoding="utf-8").read()
    return out


def ray_references(source: str) -> list[str]:
    """What a module names of Ray: each module it imports (with the names it imports from it)
    and each string constant (logger names, docstrings), function-level ones included."""
    refs = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            refs += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            refs += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            refs.append(node.value)
    return refs


def test_private_ray_is_named_in_the_adapter_only():
    files = package_files()
    naming = {path for path, source in files.items() if any(PRIVATE_RAY.search(r) for r in ray_references(source))}
    assert naming == {ADAPTER}


def test_tune_and_train_private_hooks_are_used_in_the_adapter_only():
    files = package_files()
    for name in VERSION_SPECIFIC:
        using = {path for path, source in files.items() if name in source}
        assert using == {ADAPTER}, name


def test_the_walk_sees_private_names_wherever_they_are():
    assert PRIVATE_RAY.search("ray._private.utils")
    assert PRIVATE_RAY.search("ray.train.v2._internal.execution.callback.ControllerCallback")
    assert PRIVATE_RAY.search("see ray/train/v2/_internal/execution/local_mode/")
    assert not PRIVATE_RAY.search("ray.train.v2.api.config") and not PRIVATE_RAY.search("wandb_internal_pb2")
    code = "import logging\ndef f():\n    from ray.train.v2 import _internal\n    logging.getLogger('ray._private.x')\n"
    assert [r for r in ray_references(code) if PRIVATE_RAY.search(r)] == ["ray.train.v2._internal", "ray._private.x"]


# ---- the version check ------------------------------------------------------------------------

LINE = ("online_distill supports Ray 2.60.x (found 2.61.0); the private Ray APIs it adapts are in "
        "online_distill/core/ray_adapter.py")


def test_the_supported_series_is_the_pinned_one():
    import ray

    pyproject = open(os.path.join(os.path.dirname(PKG_DIR), "pyproject.toml"), encoding="utf-8").read()
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    assert ray_adapter.unsupported(pinned) is None
    assert ray_adapter.unsupported(ray.__version__) is None  # the installed Ray is the supported one


@pytest.mark.parametrize("version", ["2.60.0", "2.60.3", "2.60.1rc1", "2.60"])
def test_a_2_60_release_is_supported(version):
    assert ray_adapter.unsupported(version) is None


@pytest.mark.parametrize("version", ["2.61.0", "2.6.0", "2.600.1", "3.0.0", "2.59.9"])
def test_another_release_gets_the_one_line(version):
    line = ray_adapter.unsupported(version)
    assert line == LINE.replace("2.61.0", version) and "\n" not in line


def test_on_another_ray_the_first_private_use_says_one_line_once(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.61.0")
    monkeypatch.setattr(ray_adapter, "_SAID", [])
    out = io.StringIO()
    assert ray_adapter.check_ray_version(out=out) == LINE
    assert ray_adapter.check_ray_version(out=out) == LINE
    assert out.getvalue() == LINE + "\n"  # one line, once per process
    monkeypatch.setattr(ray, "__version__", "2.60.0")
    assert ray_adapter.check_ray_version(out=out) is None


def test_a_private_api_that_is_gone_is_a_not_retryable_error_with_the_line(monkeypatch, capsys):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.61.0")
    monkeypatch.setattr(ray_adapter, "_SAID", [])
    monkeypatch.setitem(sys.modules, "ray._private.utils", None)  # as if that Ray had moved it: import fails
    with pytest.raises(ray_adapter.UnsupportedRay) as e:
        ray_adapter.read_ray_address()
    assert str(e.value) == LINE and isinstance(e.value, NotRetryable) and isinstance(e.value, ImportError)
    assert capsys.readouterr().err == LINE + "\n"  # the warning came first, once
    ray_adapter.quiet_report_logs()  # only quieter: a missing logger module is no error


def test_importing_the_adapter_imports_no_ray():
    """The CLI sets Ray's environment before anything imports Ray (run/env.py)."""
    code = "import sys, online_distill.core.ray_adapter as a; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.path.dirname(PKG_DIR)})


# ---- the adapted APIs, against the installed Ray ----------------------------------------------

class Hooks(ray_adapter.FailureHooks):
    def __init__(self):
        self.retries = []

    def ends_run(self, error):
        return isinstance(ray_adapter.root_error(error.worker_failures[0]), NotRetryable)

    def retrying(self, error, retry, max_failures):
        self.retries.append((retry, max_failures))


def worker_group_error(e: Exception):
    from ray.train import WorkerGroupError

    return WorkerGroupError("rank 0 failed", {0: e})


def test_the_failure_policy_asks_the_hooks_then_ray_decides():
    from ray.train import FailureConfig

    policy_cls = ray_adapter._made("HookedFailurePolicy")
    hooks = Hooks()
    policy = policy_cls(FailureConfig(max_failures=2), hooks)
    decisions = [policy.make_decision(worker_group_error(RuntimeError("lost"))).name for _ in range(3)]
    assert decisions == ["RETRY", "RETRY", "RAISE"] and hooks.retries == [(1, 2), (2, 2)]
    fresh = policy_cls(FailureConfig(max_failures=2), hooks)
    assert fresh.make_decision(worker_group_error(NotRetryable("nan"))).name == "RAISE"  # no retry spent
    assert hooks.retries == [(1, 2), (2, 2)]


def test_the_failure_policy_and_watches_pickle_by_reference():
    import cloudpickle

    from online_distill.run.failures import OurFailurePolicy, SayWhatHappens

    for cls in (ray_adapter._made("HookedFailurePolicy"), ray_adapter.ControllerWatch, SayWhatHappens):
        assert cloudpickle.loads(cloudpickle.dumps(cls)) is cls
    hooks = cloudpickle.loads(cloudpickle.dumps(OurFailurePolicy("r", "/tmp/r", 2)))
    assert hooks.ends_run(worker_group_error(NotRetryable("x"))) and not hooks.ends_run(worker_group_error(OSError()))


def test_a_controller_watch_hears_the_controller_in_our_words():
    from ray.train.v2._internal.execution.controller.state import (ErroredState, InitializingState, RunningState,  # noqa
                                                                   SchedulingState)

    heard = []

    class Watch(ray_adapter.ControllerWatch):
        def controller_started(self):
            heard.append("started")

        def group_starting(self):
            heard.append("starting")

        def group_settled(self):
            heard.append("settled")

    w = Watch()
    w.after_controller_start(None)
    w.before_controller_execute_resize_decision(None)
    for state in (SchedulingState, RunningState, ErroredState):
        w.after_controller_state_update(None, state.__new__(state))
    assert heard == ["started", "starting", "settled", "settled"]
    assert set(ray_adapter.SETTLED_STATES) <= {c.__name__ for c in _state_classes()}


def _state_classes() -> list[type]:
    from ray.train.v2._internal.execution.controller import state

    return [v for v in vars(state).values() if isinstance(v, type)]


def test_the_trainer_keeps_or_drops_the_placement_group_cleaner():
    import ray.train

    def loop(config):
        pass

    for keep in (True, False):
        trainer = ray_adapter.torch_trainer(loop, failure_hooks=Hooks(), placement_group_cleaner=keep,
                                            scaling_config=ray.train.ScalingConfig(num_workers=1))
        names = [type(c).__name__ for c in trainer._create_default_callbacks()]
        assert ("PlacementGroupCleanerCallback" in names) == keep


def test_tune_cleans_up_first_and_stops_retrying_while_the_guard_holds():
    from ray.tune.experiment.trial import Trial

    called = []

    def trainable(config):
        pass

    assert ray_adapter.cleans_up_first(trainable, lambda: called.append("cleanup")) is trainable

    class Base:
        def cleanup(self):
            called.append("base")

    class Trainable(*trainable.__mixins__, Base):
        pass

    Trainable().cleanup()
    assert called == ["cleanup", "base"]

    original = Trial.should_recover

    class Failed:
        def __init__(self, error):
            self.error = error

        def get_pickled_error(self):
            return self.error

    with ray_adapter.no_trial_retry_when(lambda e: isinstance(e, NotRetryable)):
        assert Trial.should_recover is not original
        assert Trial.should_recover(Failed(NotRetryable("nan"))) is False
        with pytest.raises(AttributeError):  # any other error: Tune's own rule (reads run_metadata)
            Trial.should_recover(Failed(RuntimeError("lost")))
    assert Trial.should_recover is original


def test_workers_stderr_goes_aside_and_their_stdout_to_the_terminal(monkeypatch):
    """Through Ray's own log dispatcher and raylet printer: a worker's stdout reaches Ray's
    handler, its stderr and the raylet's messages reach `aside`, once split, however often asked."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed, kept = [], []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", lambda data: printed.append(data["lines"]))])
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data["lines"]))
    ray_adapter.workers_stderr_to(lambda text: kept.append("first: " + text))
    ray_adapter.workers_stderr_to(kept.append)  # a later run's log; still one split
    dispatcher.emit({"lines": ["epoch   1/2  val acc ..."], "pid": 7, "is_err": False, "actor_name": "RayTrainWorker"})
    dispatcher.emit({"lines": ["Traceback (most recent call last):", "RuntimeError: x"], "pid": 7, "is_err": True,
                     "actor_name": "RayTrainWorker", "ip": "10.0.0.1"})
    ray_worker.print_to_stdstream({"lines": ["A worker died or was killed"], "pid": "raylet", "is_err": False},
                                  ignore_prefix=False)
    assert printed == [["epoch   1/2  val acc ..."]]
    assert kept == ["(RayTrainWorker pid=7, ip=10.0.0.1) Traceback (most recent call last):\n"
                    "(RayTrainWorker pid=7, ip=10.0.0.1) RuntimeError: x\n",
                    "(pid=raylet, ip=?) A worker died or was killed\n"]
