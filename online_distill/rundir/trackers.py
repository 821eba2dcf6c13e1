"""Send a run's numbers to experiment trackers: TensorBoard, MLflow, Weights & Biases.

The driver calls `check_trackers` once, before any worker starts, so a typo or a missing library
is a config error of one line. The process that logs (rank 0 of a run, a sweep trial) calls
`open_trackers(names, TrackerRun(...))` and gets one object with `log_epoch`, `log_table`,
`finish` and `ids` (each tracker's run id; store it and pass it back as `resume_ids` when the
same run resumes). Tracker libraries are imported only when a tracker is opened.

Trackers are a side channel: one that fails (disk full, server gone, a library bug) prints one
line to stderr and is switched off; training goes on. Several runs may log from one process at
once (sweep trials), so nothing here uses a library's global "active run".

Where things land, when `run_dir` is `<storage>/<run>` (run_dir must be a local path):
- tensorboard: `<run_dir>/tensorboard/` (runs of one sweep sit side by side under the sweep's
  folder, so `tensorboard --logdir <that folder>` groups them);
- mlflow: `$MLFLOW_TRACKING_URI` if set, else `sqlite:///<storage>/mlflow.db` with artifacts in
  `<storage>/mlartifacts/`; experiment = group. (MLflow 3.x refuses a file store `./mlruns`
  unless MLFLOW_ALLOW_FILE_STORE is set, so the local store is SQLite.) See it with
  `mlflow ui --backend-store-uri sqlite:///<storage>/mlflow.db`;
- wandb: `<run_dir>/wandb/`; offline unless WANDB_MODE says otherwise or an API key is configured
  (WANDB_API_KEY, or `wandb login`'s ~/.netrc entry); `wandb sync <run_dir>/wandb` uploads later.

Resume: tensorboard reopens its folder with purge_step = the first epoch logged again, so
rewritten epochs replace the old ones. MLflow reopens the same run id and skips (key, epoch)
pairs it already holds (its API cannot delete a metric value, and a step logged twice would show
twice). W&B resumes the same id; steps at or below the run's last one are dropped by W&B itself
(online at once, offline when `wandb sync` replays the attempts in order).
"""
from __future__ import annotations

import contextlib
import importlib
import math
import netrc
import numbers
import os
import sys
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from ..config.schema import ConfigError, flatten
from . import layout as names

if TYPE_CHECKING:
    import pandas as pd

TRACKERS = ("tensorboard", "mlflow", "wandb")
STATUSES = ("finished", "failed", "interrupted")
PIP_EXTRA = "pip install 'online_distill[trackers]'"
TB_DIR = names.TB_DIR
"""TensorBoard's folder inside the run directory."""
MLFLOW_DB = names.MLFLOW_DB
"""The local MLflow store, beside the run directories (one per storage path or sweep folder)."""
MLFLOW_ARTIFACTS = names.MLFLOW_ARTIFACTS
MLFLOW_PARAM_MAX = 6000
"""MLflow's limit on a param value's length (MAX_PARAM_VAL_LENGTH since 1.x; the full config is
also logged as config.yaml, so a cut param loses nothing)."""

# (module to import, pip package that provides it) per tracker. The import is the check: a
# half-broken install (a protobuf clash) fails here, on the driver, not on a worker mid-run.
_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "tensorboard": (("tensorboard", "tensorboard"), ("torch.utils.tensorboard", "tensorboard")),
    "mlflow": (("mlflow", "mlflow-skinny"),),
    "wandb": (("wandb", "wandb"),),
}
# The local SQLite store (no MLFLOW_TRACKING_URI) needs these too; mlflow-skinny leaves them out.
_MLFLOW_LOCAL_NEEDS = (("sqlalchemy", "sqlalchemy"), ("alembic", "alembic"))


def check_trackers(names: Sequence[str], field: str = "run.loggers") -> None:
    """On the driver, before any worker starts: an unknown name, a name given twice, or a library
    that is not installed raises ConfigError with one line (field, value, what is allowed, the
    pip command)."""
    allowed = ", ".join(TRACKERS)
    if isinstance(names, str):
        raise ConfigError(f"{field}: got {names!r}; allowed: a list of {allowed}", field)
    seen: set[str] = set()
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"{field}: got {name!r}; allowed: {allowed}", field)
        if name in seen:
            raise ConfigError(f"{field}: got {name!r} twice; allowed: each of {allowed} at most once", field)
        seen.add(name)
        needs = _NEEDS[name] + (_MLFLOW_LOCAL_NEEDS if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI") else ())
        for module, package in needs:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"{field}: got {name!r} but {module} cannot be imported ({_one_line(e)}); allowed: "
                                  f"{allowed} with their libraries installed: {PIP_EXTRA} (or pip install {package})",
                                  field) from None


@dataclass(frozen=True)
class TrackerRun:
    run_dir: str
    """The run's directory (a local path); tensorboard and wandb files go inside it."""
    name: str
    """The run's name."""
    group: str | None
    """Runs of one sweep share it: the mlflow experiment, the wandb project and group."""
    config: dict
    """The run's full config as a nested dict (flattened with dots where a tool wants flat)."""
    resume_ids: dict[str, str]
    """Tracker name -> its run id from an earlier attempt of this run; {} the first time."""

    def __post_init__(self) -> None:
        if "://" in self.run_dir:  # the libraries write local files; a URI would fail later, less clearly
            raise ValueError(f"TrackerRun.run_dir must be a local path, got {self.run_dir!r}")


class Tracker(Protocol):
    name: str
    run_id: str

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None: ...

    def log_table(self, name: str, table: pd.DataFrame) -> None: ...

    def finish(self, status: str = "finished") -> None: ...


class Trackers:
    """All of a run's trackers behind one object; a tracker that raises is switched off."""

    def __init__(self, trackers: Sequence[Tracker]):
        self._active = list(trackers)
        self._ids = {t.name: t.run_id for t in trackers}

    @property
    def ids(self) -> dict[str, str]:
        """Tracker name -> run id, for every tracker that opened (even one switched off since)."""
        return dict(self._ids)

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """step = epoch; values that are not numbers, and NaN, are left out."""
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)}
        self._each("log_epoch", epoch, clean)

    def log_table(self, name: str, table: pd.DataFrame) -> None:
        self._each("log_table", name, table)

    def finish(self, status: str = "finished") -> None:
        if status not in STATUSES:
            raise ValueError(f"status: got {status!r}; allowed: {', '.join(STATUSES)}")
        self._each("finish", status)
        self._active = []  # a second finish, or a log after it, does nothing

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        self.finish("finished" if kind is None else "interrupted" if issubclass(kind, KeyboardInterrupt) else "failed")

    def _each(self, method: str, *args: Any) -> None:
        for t in list(self._active):
            try:
                getattr(t, method)(*args)
            except Exception as e:  # a tracker must never stop training
                self._active.remove(t)
                _say(f"{t.name} tracker failed in {method} ({_one_line(e)}); no more {t.name} logging for this run")


def open_trackers(names: Sequence[str], run: TrackerRun) -> Trackers:
    """Open each named tracker for `run` (reopening resume_ids' runs); one that cannot open is
    reported in one line and left out."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:  # check_trackers on the driver should have said so already
        raise ConfigError(f"trackers: got {unknown[0]!r}; allowed: {', '.join(TRACKERS)}", "run.loggers")
    opened: list[Tracker] = []
    for name in dict.fromkeys(names):
        try:
            opened.append(_OPENERS[name](run))
        except Exception as e:
            _say(f"{name} tracker could not start ({_one_line(e)}); the run goes on without it")
    return Trackers(opened)


def _say(message: str) -> None:
    print(f"online-distill: {message}", file=sys.stderr, flush=True)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _markdown(table: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs tabulate, which we do not depend on)."""
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) else str(v)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run: TrackerRun):
        from torch.utils.tensorboard import SummaryWriter

        self._make = SummaryWriter
        # the folder is the run: a resumed run reopens the one in its run directory (wherever
        # that directory is now), so the stored id only says that there was an earlier attempt
        self.run_id = os.path.abspath(os.path.join(run.run_dir, TB_DIR))
        self._step = 0
        self._writer: Any = None
        if self.name in run.resume_ids:
            return  # opened at the first log_epoch, which says from which epoch to purge
        self._writer = SummaryWriter(self.run_id)
        # markdown: indented lines are a code block, so the YAML keeps its layout
        text = "    " + yaml.safe_dump(run.config, sort_keys=False).replace("\n", "\n    ")
        self._writer.add_text("config", text, 0)
        from torch.utils.tensorboard.summary import hparams

        # session start only: TensorBoard's HParams tab then finds the metrics among the scalars
        flat = {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in flatten(run.config).items()}
        self._writer.file_writer.add_summary(hparams(flat, {})[1])
        self._writer.flush()

    def _open(self, purge_from: int | None = None) -> Any:
        if self._writer is None:
            # a resumed run: events an earlier attempt wrote at steps >= purge_from are dropped
            self._writer = self._make(self.run_id, purge_step=purge_from)
        return self._writer

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        w = self._open(purge_from=epoch)
        for k, v in metrics.items():
            w.add_scalar(k, v, epoch)
        w.flush()  # once an epoch: `tensorboard` shows the run while it trains
        self._step = epoch

    def log_table(self, name: str, table: pd.DataFrame) -> None:
        w = self._open()
        w.add_text(name, _markdown(table), self._step)
        w.flush()

    def finish(self, status: str = "finished") -> None:
        self._open().close()


class _MLflow:
    name = "mlflow"

    def __init__(self, run: TrackerRun):
        import logging

        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if not os.environ.get("MLFLOW_LOGGING_LEVEL"):  # "Creating initial MLflow database tables..."
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        # SQLAlchemy 2.1 deprecates a loader MLflow's store uses: not ours to act on
        warnings.filterwarnings("ignore", message=r".*``noload`` loader strategy", category=DeprecationWarning)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        store = None if uri else os.path.dirname(os.path.abspath(run.run_dir))
        if store is not None:
            os.makedirs(store, exist_ok=True)
            uri = "sqlite:///" + os.path.join(store, MLFLOW_DB)
        self._client = client = MlflowClient(tracking_uri=uri)
        experiment = run.group or "online_distill"
        # sweep trials start together: one creates the tables and the experiment, the others wait
        with _file_lock(store and os.path.join(store, MLFLOW_DB + ".lock")):
            found = client.get_experiment_by_name(experiment)
            # without artifact_location a SQLite store puts artifacts in ./mlruns of the cwd
            exp_id = found.experiment_id if found else client.create_experiment(
                experiment, artifact_location=Path(store, MLFLOW_ARTIFACTS).as_uri() if store else None)
        self._resumed = False
        if old := run.resume_ids.get(self.name):
            try:
                client.update_run(old, status="RUNNING")
                self.run_id, self._resumed = old, True
            except MlflowException:  # not in this store (another tracking URI): start afresh
                pass
        if not self._resumed:
            self.run_id = client.create_run(exp_id, run_name=run.name).info.run_id
            from mlflow.entities import Param

            # params are write-once in MLflow, so only a new run logs them; 100 is log_batch's limit
            params = [Param(k, str(v) if len(str(v)) <= MLFLOW_PARAM_MAX else str(v)[:MLFLOW_PARAM_MAX - 3] + "...")
                      for k, v in flatten(run.config).items()]
            for chunk in _chunks(params, 100):
                client.log_batch(self.run_id, params=chunk)
        client.log_text(self.run_id, yaml.safe_dump(run.config, sort_keys=False), names.CONFIG)
        self._last: dict[str, int] = {}

    def _last_step(self, key: str) -> int:
        """The last step an earlier attempt logged for key (-1: none)."""
        if not self._resumed:
            return -1
        if key not in self._last:
            self._last[key] = max((m.step for m in self._client.get_metric_history(self.run_id, key)), default=-1)
        return self._last[key]

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, epoch) for k, v in metrics.items() if epoch > self._last_step(k)]
        for chunk in _chunks(batch, 1000):  # log_batch's limit
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_table(self, name: str, table: pd.DataFrame) -> None:
        self._client.log_text(self.run_id, table.to_csv(index=False), f"{name}.csv")

    def finish(self, status: str = "finished") -> None:
        self._client.set_terminated(self.run_id, {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))


@contextlib.contextmanager
def _file_lock(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # per open file: also orders threads of one process
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def wandb_mode() -> str | None:
    """None when WANDB_MODE is set (wandb reads it itself); else online only with an API key,
    so a machine without credentials or network still logs (offline)."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:  # where `wandb login` keeps the key
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        found = None
    return "online" if found else "offline"


class _Wandb:
    name = "wandb"

    def __init__(self, run: TrackerRun):
        import wandb

        self._wandb = wandb
        os.makedirs(run.run_dir, exist_ok=True)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or run.group or "online_distill", name=run.name,
            group=run.group, config=run.config, dir=run.run_dir, id=run.resume_ids.get(self.name), resume="allow",
            mode=wandb_mode(),  # type: ignore[arg-type]
            # create_new: several runs of one process (sweep trials) log side by side; silent and
            # console off: the terminal shows the framework's lines, and stdout is not wrapped
            settings=wandb.Settings(reinit="create_new", silent=True, console="off"))
        self.run_id = self._run.id

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=epoch)

    def log_table(self, name: str, table: pd.DataFrame) -> None:
        self._run.log({name: self._wandb.Table(dataframe=table)})  # joins the last epoch's step

    def finish(self, status: str = "finished") -> None:
        self._run.finish(exit_code={"finished": 0, "failed": 1}.get(status, 255))  # 255: as wandb marks a Ctrl-C


_OPENERS: dict[str, Callable[[TrackerRun], Tracker]] = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}
