"""Driver side of one run: its preflight plan (plan.py), then the cohort in this process or in a
Ray Train worker group, then the tables. Everything that can be refused is refused before a
worker starts; an error a retry cannot fix ends the run with one paragraph (errors.py)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..config.schema import Config
from ..core.topology import Layout, layout_of
from ..errors import NotRetryable
from ..rundir import checkpoint as ckpt
from ..rundir import storage
from ..rundir.layout import COMPRESSION, LOG, PREDICTIONS, RAY_TRAIN, RESULT, RunDir
from . import compression
from .env import cluster_address, init_ray  # noqa: F401 (init_ray: the place callers have always found it)
from .in_process import fit_in_process
from .plan import Plan, make_plan, say
from .results import final_table, format_table, history_frame, write_predictions, write_run_tables


@dataclass
class RunResult:
    run_dir: str
    history: pd.DataFrame
    metrics: dict[str, Any]
    checkpoint: str
    """The last checkpoint's directory."""

    @property
    def final(self) -> pd.DataFrame:
        return final_table(self.history)


def make_trainer(cfg: Config, run_dir: RunDir, *, models=None, datasets=None, callbacks=None,
                 resume_from: str | None = None, local: bool = False, notify: str | None = None, group: str | None = None,
                 verbose: bool = True, data=None, service: list[str] | None = None, layout: Layout | None = None):
    """The TorchTrainer of one cohort (also built by each Tune trial's driver). Every rank saves
    its checkpoints into `run_dir` itself (reporting.py); `resume_from` is a checkpoint directory
    to start from when the run directory holds none of its own (a Tune trial's, a PBT donor's).
    `local`: Train's local mode (ScalingConfig(num_workers=0): the loop runs in this process, no
    worker group) for a cohort of one worker. `layout`: the cohort's (the plan's; None: layout_of(cfg),
    the same), which sizes the worker group and which every worker builds its topology from."""
    import ray.train
    from ray.train.torch import TorchConfig

    from ..core.ray_adapter import quiet_local_mode_notice, torch_trainer
    from ..training.loop import train_loop_per_worker
    from .failures import OurFailurePolicy, SayWhatHappens

    layout = layout or layout_of(cfg)
    if local and layout.world_size != 1:
        raise ValueError(f"Train's local mode runs one worker; this cohort has {layout.world_size}")
    quiet_local_mode_notice()

    said = [] if local else [SayWhatHappens(cfg.run.name, layout.world_size, layout.worker_resources)]
    return torch_trainer(
        train_loop_per_worker,
        # no retry for what a retry cannot fix; an embedded Ray ends with this process, placement groups and all
        failure_hooks=OurFailurePolicy(cfg.run.name, run_dir.path, cfg.num_peers),
        placement_group_cleaner=cluster_address() is not None,
        train_loop_config={"cfg": cfg, "models": models, "datasets": datasets, "run_dir": run_dir.path,
                           "resume_from": resume_from, "local": local, "notify": notify, "group": group,
                           "verbose": verbose, "data": data if local else None,  # in this process: read once
                           "teacher_service": service, "layout": layout},
        scaling_config=ray.train.ScalingConfig(num_workers=0 if local else layout.world_size, use_gpu=cfg.scale.use_gpu,
                                               resources_per_worker=None if local else layout.worker_resources),
        torch_config=TorchConfig(backend="nccl" if cfg.scale.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            # Ray Train's own records, apart from ours: the run directory is rundir.py's
            name=RAY_TRAIN, storage_path=run_dir.path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[*said, *(callbacks or [])], logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # progress lines are printed by rank 0 as they are, not re-logged through Train's logger
            worker_runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                             **_pythonpath()}},
        ),
    )


def _pythonpath() -> dict[str, str]:
    """Workers import what the driver imports: models and datasets given by import path
    (online_distill.config.specs) are looked up from the directory the run was started in, as here."""
    here = os.getcwd()
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(p for p in (here, path) if p)}


def train_cohort(cfg: Config, *, models: dict | None = None, datasets: dict | None = None,
                 verbose: bool = True, plan: Plan | None = None) -> RunResult:
    """Train one cohort (`online_distill.train` also runs born-again chains of them). `models` /
    `datasets` add user builders by name (Python API); `plan`: a preflight already made."""
    plan = plan or make_plan(cfg, models=models, datasets=datasets)
    cfg, run = plan.cfg, plan.run_dir
    said = plan.prepare()  # the lock, config.yaml, the teacher copy; what a crash left, set aside
    try:
        say(said)
        if verbose:
            print(plan.header(), flush=True)
        start = plan.resume.checkpoint
        try:
            if plan.in_process:
                fit_in_process(cfg, run, start, make_trainer, models=models, datasets=datasets, verbose=verbose,
                               data=plan.data, service=plan.service, layout=plan.layout)
            else:
                from ..core.ray_adapter import workers_stderr_to

                workers_stderr_to(_to_log(run))  # the terminal keeps our lines; Ray's tracebacks go to run.log
                make_trainer(cfg, run, models=models, datasets=datasets, resume_from=start, notify="train",
                             verbose=verbose, service=plan.service, layout=plan.layout).fit()
        except Exception as e:
            run.clean_partial()  # a save cut short leaves nothing half-named
            error = unwrapped_error(e)
            _log_traceback(run, e, error)
            raise error from e
        last = run.latest()
        history = history_frame(ckpt.read_history(last))
        metrics = ckpt.read_metrics(last)
        write_run_tables(run, history)
        predictions = ckpt.read_predictions(last)
        if predictions is not None:
            run.write(PREDICTIONS, storage.read_bytes(storage.join(last, PREDICTIONS)))
            write_predictions(run, predictions, cfg.models)
        final = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
        final_rows = final_table(history)
        sizes = None
        if cfg.run.compression_report:
            sizes = compression.write_report(cfg, run, last, plan.data, models=models, datasets=datasets,
                                             test_acc=_measured(final_rows, "test_acc"))
        served = {}
        if plan.service:
            from .. import teachers

            served = teachers.service_summary(plan.service)
        final.update(served)
        metrics = {**metrics, **served}
        run.write_json(RESULT, {"complete": True, "metrics": final})  # last: the run finished
    finally:
        plan.release()
    if verbose:
        print(f"\nfinished {cfg.run.name!r} ({run.path}):\n{format_table(final_rows)}", flush=True)
        if served:
            s = served
            print(f"\nteacher service: {s['service/forwards']:.0f} examples through the teacher, {s['service/requests']:.0f} "
                  f"requests in {s['service/batches']:.0f} forward passes, mean queue {1e3 * s['service/mean_queue_s']:.1f} ms, "
                  f"{s['service/bytes_out'] / 1e6:.1f} MB sent", flush=True)
        if sizes is not None:
            print(f"\nsize and CPU speed ({COMPRESSION}):\n{compression.format_report(sizes)}", flush=True)
    return RunResult(run.path, history, metrics, last)


def unwrapped_error(e: Exception) -> Exception:
    """A worker group's error as the user's own: an error a retry could not fix, unwrapped from
    Ray's WorkerGroupError, so the CLI can print its one paragraph."""
    from .failures import not_retryable

    if isinstance(e, NotRetryable):
        return e
    root = not_retryable(e)
    return root if root is not None else e


def _to_log(run: RunDir):
    """A writer of text into the run's log file (rundir.LOG) that never raises: what Ray's
    processes print on stderr is kept there, and a full disk must not end the run for it."""
    def aside(text: str) -> None:
        try:
            run.append(LOG, text)
        except Exception:  # noqa: BLE001 - the log is a courtesy; the run's own errors are what matter
            pass

    return aside


def _log_traceback(run: RunDir, e: BaseException, error: BaseException) -> None:
    """The whole story of a failed run into its log file (rundir.LOG), so the terminal can say
    one paragraph and point there. Nothing more is lost when the disk is full."""
    import time
    import traceback

    from ..core.ray_adapter import worker_traceback

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    if error is not e:  # the worker's own traceback, as Ray kept it
        text += f"\n--- in the worker ---\n{worker_traceback(e) or error}\n"
    try:
        error.log_path = run.append(LOG, f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {type(error).__name__}\n{text}")
    except Exception:  # noqa: BLE001 - the log is a courtesy; the error itself is what matters
        pass


def _measured(table: pd.DataFrame, column: str) -> dict[str, float]:
    """member -> value of a final-table column, where the run measured it."""
    if column not in table.columns:
        return {}
    return {m: float(v) for m, v in zip(table["member"], table[column]) if pd.notna(v)}


def history_from_checkpoint(checkpoint: str) -> list[dict]:
    return ckpt.read_history(checkpoint)
