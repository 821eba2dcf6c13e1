"""Ray Tune sweeps: many cohorts, each one a Ray Train run, searched over the distillation knobs.

The Ray 2.60 (Train V2) way: Tune runs a light *driver* function per trial (it holds no CPU;
its TorchTrainer's workers hold the real resources), and the driver builds and fits the
trial's TorchTrainer. What Train V2's own TuneReportCallback does not do is hand the
checkpoints to Tune: it forwards metrics and a checkpoint *path*, so Tune holds no checkpoint
of the trial, PBT has nothing to copy ("no checkpoint for trial ... skip exploit") and a resumed
sweep would restart its unfinished trials from scratch. So the driver relays each report itself:
a callback in the Train controller puts (metrics, checkpoint) on a queue, the driver takes it
off and calls `ray.tune.report(metrics, checkpoint=...)`, which copies the checkpoint into the
trial's directory. Every start of a driver (first start, PBT exploit, resumed sweep, retried
trial) starts a *new* Train run from `ray.tune.get_checkpoint()`, so a trial never picks up its
own stale Train run after PBT gave it another trial's weights. And a trial that Tune stops
aborts its Train run before its actor goes, so its workers' CPUs come back (abort_cohort).
"""
from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import ray
from ray.train import UserCallback

from ..config import files as config_file
from ..config.schema import Config, ConfigError, flatten
from ..core.ray_adapter import (
    ControllerWatch,
    cleans_up_first,
    no_trial_retry_when,
    quiet_checkpoint_notices,
    root_error,
    workers_stderr_to,
)
from ..distill.form import LogitForm
from ..errors import NotRetryable
from ..rundir import storage
from ..rundir.layout import CONFIG
from . import spec as sweep_config
from .console import SweepConsole, quiet_tune
from .plan import SweepPlan, plan_sweep
from .spec import SweepSpec, trial_resources


def load_sweep(path: str, overrides: Mapping[str, Any] | None = None, *, models=None, datasets=None) -> SweepSpec:
    """Read and fully check a sweep file (see tune_configs/)."""
    return sweep_config.load(path, overrides, models=models, datasets=datasets)


@dataclass
class SweepResult:
    sweep_dir: str
    trials: pd.DataFrame
    """One row per trial: config values, status, final and best objective, epochs, time."""
    summary: pd.DataFrame
    """One row per setting: objective mean, std and count over seeds; delta to the baseline."""
    best_config: str | None
    """A ready-to-run run config of the best setting (None when no trial finished)."""
    complete: bool
    """False when the sweep was interrupted: rerun the same command to resume it."""
    wall_s: float


# ---- the trial driver -----------------------------------------------------------------------

class RelayReports(UserCallback):
    """Runs in the trial's Train controller: hands each report of rank 0 (metrics and the
    persisted checkpoint) to the trial's driver. A queue of one makes training wait while the
    driver is still handing the previous report to Tune, as TuneReportCallback does."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(("report", (dict(metrics[0]), checkpoint)))


class AnnounceController(ControllerWatch):
    """Runs in the trial's Train controller as it starts: gives the driver the controller's
    handle, so a trial that Tune stops can abort its Train run (see abort_cohort)."""

    def __init__(self, queue):
        self.queue = queue

    def controller_started(self):
        self.queue.put(("controller", ray.get_runtime_context().current_actor))


_COHORT: dict = {}
"""The Train run of the trial running in this (trial actor) process: its controller and queue."""


def abort_cohort(timeout_s: float = 30.0) -> None:
    """Abort the Train run of the trial in this actor, if any (Tune calls it before it ends the
    trial: cleans_up_first below).

    When Tune stops a trial (ASHA, PBT pausing it to exploit, an interrupted sweep), it ends
    the trial's actor, and with it the Train controller the actor owns. Train V2 then relies on
    a detached cleaner that asks the state API whether the controller died; where that fails
    (several Ray instances on one machine, as on a shared dev box), the trial's workers'
    placement group outlives it and later trials wait for CPUs that never come back. So the
    trial aborts its Train run itself, before its actor goes."""
    from ray.util.queue import Empty

    # the controller announces itself first thing, before it asks for workers; one that has not
    # yet started dies with this actor, which owns it
    deadline = time.monotonic() + 3.0
    while "queue" in _COHORT and "controller" not in _COHORT and time.monotonic() < deadline:
        time.sleep(0.1)
    controller, queue = _COHORT.pop("controller", None), _COHORT.pop("queue", None)
    if controller is None:
        return
    try:
        queue.get_nowait()  # a controller blocked handing over a report would never see the abort
    except Empty:
        pass
    try:
        ray.get(controller.abort.remote(), timeout=timeout_s)
    except Exception:  # abort ends with the controller exiting; its caller sees an actor error
        pass


def _trial_driver(params: dict, *, spec: SweepSpec, models=None, datasets=None, services=None) -> None:
    """One Tune trial: build the cohort's config from the trial's params, fit its TorchTrainer
    (resuming from the checkpoint Tune gives this start, if any) and relay its reports. A cohort
    of one worker runs in Train's local mode, in this process: no controller, no worker group,
    no process group to start, so the trial's first epoch starts within seconds. Either way the
    cohort's ranks write each epoch's checkpoint into the cohort's run directory
    (reporting.py), and Tune gets a copy of it with the epoch's metrics."""
    import ray.tune
    from ray.util.queue import Empty, Queue

    from ..run.launch import make_trainer
    from ..rundir.layout import RunDir
    from ..training.reporting import CHECKPOINT_KEY

    quiet_checkpoint_notices()
    trial_id = ray.tune.get_context().get_trial_id()
    start = _local_checkpoint(ray.tune.get_checkpoint())  # None, this trial's last one, or a PBT donor's
    # the date stamp makes a trial's Train runs sort in the order they started
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = spec.trial_config(params, run_name=f"{trial_id}-{stamp}-{uuid.uuid4().hex[:4]}",
                            storage_path=storage.join(spec.sweep_dir, "cohorts"))
    run = RunDir.of(cfg)
    run.write(CONFIG, config_file.dump(cfg))  # a frozen teacher is read from its source (no copy per trial)
    service = (services or {}).get(service_key(cfg)) if _served(cfg) else None  # the sweep's one teacher, when it serves it
    if cfg.in_one_process:
        make_trainer(cfg, run, models=models, datasets=datasets, resume_from=start, local=True, notify="tune",
                     group=spec.name, verbose=False, service=service).fit()
        return
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    _COHORT["queue"] = queue
    trainer = make_trainer(cfg, run, models=models, datasets=datasets, resume_from=start, notify="train",
                           group=spec.name, verbose=False, service=service,
                           callbacks=[RelayReports(queue), AnnounceController(queue)])
    outcome: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised below, in the driver, so Tune records the trial's error
            outcome["error"] = e

    worker = threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True)
    worker.start()
    while True:
        try:
            kind, item = queue.get(timeout=0.5)
        except Empty:
            if worker.is_alive() or not queue.empty():  # every put happens before fit() returns
                continue
            break
        if kind == "controller":
            _COHORT["controller"] = item
            continue
        metrics, _ = item
        path = metrics.pop(CHECKPOINT_KEY, None)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint(path) if path else None)
    _COHORT.clear()
    queue.shutdown()
    if "error" in outcome:
        from ..run.launch import unwrapped_error

        raise unwrapped_error(outcome["error"])


def _local_checkpoint(checkpoint) -> str | None:
    """A Tune checkpoint as a local directory the cohort can start from (copied down from
    remote storage; on a local disk, the directory itself)."""
    if checkpoint is None:
        return None
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory(tempfile.mkdtemp(prefix="od-start-"))


cleans_up_first(_trial_driver, abort_cohort)


def _fill_teacher_caches(plan: SweepPlan, models, verbose) -> None:
    """Before any trial starts: each distinct frozen teacher's outputs into its disk cache, so
    every trial reads them and runs the teacher zero times (distill.teacher_cache_dir). The
    teacher and the data are the trial plans' (read and checked once)."""
    from ..teachers import fill_cache

    done = set()
    for c, p in plan.plans.items():
        key = (c.distill, c.data, LogitForm.of(c))
        if c.distill.mode != "offline" or not c.distill.teacher_cache_dir or key in done or p.data is None:
            continue
        done.add(key)
        line = fill_cache(c, p.data, p.teacher, models)
        if verbose:
            print(line, flush=True)


def _served(c: Config) -> bool:
    """A trial whose frozen teacher is the sweep's teacher service (a baseline's never is)."""
    return c.distill.mode == "offline" and c.distill.teacher_service


def service_key(c: Config) -> str:
    """Which trials share one teacher service: the same frozen teacher, data and logits form."""
    form = sorted(LogitForm.of(c).key().items())
    return repr((c.distill.teacher_checkpoint, c.distill.teacher_peer, c.distill.teacher_ensemble, c.distill.teacher_model,
                 c.data.dataset, c.data.seq_len, form, c.distill.service_replicas))


def _start_teacher_services(plan: SweepPlan, sweep_dir: str, verbose) -> dict[str, list[str]]:
    """One teacher service per distinct teacher of the sweep, started before any trial (every
    trial of that teacher calls it: one copy of the teacher, not one per trial). The teacher and
    the data are the trial plans'."""
    from ..run.plan import start_teacher_service
    from ..teachers import copy_bytes

    out: dict[str, list[str]] = {}
    for c in plan.configs:
        if not _served(c) or service_key(c) in out:
            continue
        p = plan.plan_of(c)
        copy = storage.join(sweep_dir, f"teacher-{len(out)}.pt")  # what the service's replicas read, restarts too
        storage.write_bytes(copy, copy_bytes(p.teacher))
        out[service_key(c)] = start_teacher_service(c, p.data, p.teacher, copy)
        if verbose:
            print(f"teacher service for {c.distill.teacher_checkpoint}: {c.distill.service_replicas} replica(s), "
                  f"shared by every trial of this teacher", flush=True)
    return out


def no_retry_for_not_retryable():
    """Tune retries a failed trial (FailureConfig.max_failures) whatever it failed with; a trial
    that failed on an error a retry cannot fix (errors.NotRetryable: a NaN loss, a bad label, a
    full disk) is not retried while this holds (in the driver, for the length of the sweep)."""
    return no_trial_retry_when(lambda error: isinstance(root_error(error), NotRetryable))


# ---- schedulers, concurrency ----------------------------------------------------------------

def _scheduler(spec: SweepSpec, epochs: int, n_trials: int, n_at_once: int):
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler

    s = spec.scheduler
    if s.name == "asha":
        class ASHAKeepingBaselines(ASHAScheduler):
            """ASHA among the settings only. The independent baseline is a reference, not a
            contender: it always runs to the end (every setting is compared with a baseline that
            had all its epochs), and its results set no cut-offs (a strong baseline would
            otherwise stop every setting, and the sweep would end with no setting finished)."""

            def on_trial_add(self, tune_controller, trial):
                if not trial.config.get("baseline"):
                    super().on_trial_add(tune_controller, trial)

            def on_trial_result(self, tune_controller, trial, result):
                if trial.config.get("baseline"):
                    return TrialScheduler.CONTINUE
                return super().on_trial_result(tune_controller, trial, result)

            def on_trial_complete(self, tune_controller, trial, result):
                if not trial.config.get("baseline"):
                    super().on_trial_complete(tune_controller, trial, result)

            def on_trial_remove(self, tune_controller, trial):
                if not trial.config.get("baseline"):
                    super().on_trial_remove(tune_controller, trial)

        return ASHAKeepingBaselines(time_attr="epoch", max_t=epochs, grace_period=s.grace_period,
                                    reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        mutations = spec.mutations

        def explore(config: dict) -> dict:
            # PBT scales by 0.8/1.2 without bounds; keep knobs where the file (and the config) allow
            return {**config, **{k: d.clip(config[k]) for k, d in mutations.items()}}

        class PBTPausingOnlyToShare(PopulationBasedTraining):
            """Asynchronous PBT pauses a trial at each perturbation point while any other trial
            is pending or paused, to share resources. A paused cohort costs a Train restart
            (new workers, new process groups); when the whole population runs at once there is
            nothing to share, and an exploited trial, paused for a moment, would make every
            trial that reaches a perturbation point meanwhile pause and restart too."""

            def on_trial_result(self, tune_controller, trial, result):
                decision = super().on_trial_result(tune_controller, trial, result)
                if decision == TrialScheduler.PAUSE and n_trials <= n_at_once and trial.status != Trial.PAUSED:
                    return TrialScheduler.CONTINUE
                return decision

        return PBTPausingOnlyToShare(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations={k: d.to_tune() for k, d in mutations.items()},
                                       quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
                                       custom_explore_fn=explore, log_config=True, synch=False)
    return FIFOScheduler()


def _check_same_sweep(spec: SweepSpec, sweep_dir: str) -> None:
    """Resume only the same sweep: a changed file under the same name would mix two experiments."""
    import yaml

    old = storage.read_text(storage.join(sweep_dir, "sweep.yaml"))
    if old is None:
        return
    before, now = flatten(yaml.safe_load(old)), flatten(spec.to_dict())
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k != "max_concurrent")
    if changed:
        diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ConfigError(f"name: sweep {spec.name!r} exists in {sweep_dir} with another spec ({diffs}). "
                          f"Allowed: the same file to resume it, or a new name (--set name={spec.name}-2)")


# ---- the sweep ------------------------------------------------------------------------------

def _appending(path: str):
    """A writer of text at the end of a local log file that never raises (the log is a courtesy)."""
    def append(text: str) -> None:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            pass

    return append


def run_sweep(spec: SweepSpec, *, retry_errored: bool = False, models=None, datasets=None, callbacks=None,
              verbose: int = 1, plan: SweepPlan | None = None) -> SweepResult:
    """Run (or resume) a sweep and write its tables and plots. `models` / `datasets` add user
    builders by name; `callbacks` are Ray Tune callbacks. `plan`: the sweep's preflight, already
    made (sweep.plan.plan_sweep, not a dry run's); made here if None."""
    import ray
    from ray import tune
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ..run.plan import concurrency
    from . import results as sweep_results

    # the spec checked once, Ray started, each trial's cohort placed, each dataset read once
    plan = plan or plan_sweep(spec, models, datasets)
    spec, configs = plan.spec, plan.configs
    _fill_teacher_caches(plan, models, verbose)
    services = _start_teacher_services(plan, spec.sweep_dir, verbose)
    n_at_once = spec.max_concurrent or concurrency(configs, ray.cluster_resources())
    trials = spec.trials()
    sweep_dir = spec.sweep_dir
    trainable = tune.with_resources(
        tune.with_parameters(_trial_driver, spec=spec, models=models, datasets=datasets, services=services),
        lambda params: resource_dict_to_pg_factory(trial_resources(spec.trial_config(params))))
    # every key in the space Tune sees; each trial's values come as a preset point
    param_space = {k: tune.choice(list(dict.fromkeys(t[k] for t in trials))) for k in trials[0]}

    log_path = quiet_tune(sweep_dir)  # Tune's tables, dumps and hints: into the sweep's log file
    workers_stderr_to(_appending(log_path))  # and what Ray's processes say on stderr, the raylet's notices
    settings = [t for t in trials if not t.get("baseline")] or trials  # what the baseline differs in is its role
    keys = [k for k in trials[0] if len({str(t[k]) for t in settings}) > 1 and k != "baseline"]
    epochs = max(c.train.epochs for c in configs)
    console = [SweepConsole(trials, keys, spec.metric, epochs, n_at_once, mode=spec.mode)] if verbose else []
    # a trial lost with its node (or its worker, beyond the cohort's own retries) is retried from its
    # last checkpoint, as a run is (run.max_failures); an error a retry cannot fix is not (no_retry_for)
    max_failures = max(c.run.max_failures for c in configs)
    resuming = tune.Tuner.can_restore(sweep_dir)
    if resuming:
        _check_same_sweep(spec, sweep_dir)
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=retry_errored,
                                   param_space=param_space)
    else:
        storage.write_text(storage.join(sweep_dir, "sweep.yaml"), sweep_config.dump(spec))
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, scheduler=_scheduler(spec, epochs, len(trials), n_at_once),
                num_samples=len(trials),
                # the generator itself limits concurrency: Tune ignores max_concurrent_trials for it
                search_alg=BasicVariantGenerator(points_to_evaluate=trials, max_concurrent=n_at_once),
                trial_dirname_creator=lambda t: t.trial_id,
                # cohorts that train in the trial's own process (local mode) reuse it: the next
                # trial skips a process start and the imports of torch and Ray. A trial with a
                # worker group keeps its own actor, whose clean-up aborts the group's Train run.
                reuse_actors=all(c.in_one_process for c in configs)),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=spec.storage_root,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.keep),
                # a trial's workers already retry under run.max_failures; a trial that still fails is
                # reported as an error, and the sweep goes on with the others
                failure_config=tune.FailureConfig(max_failures=max_failures),
                callbacks=[*console, *(callbacks or [])], verbose=0),
        )
    if verbose:
        per = trial_resources(configs[0])
        print(f"{'resuming' if resuming else 'starting'} sweep {spec.name!r}: {len(trials)} trials "
              f"({spec.scheduler.name}, objective {spec.metric}), {n_at_once} at once, each "
              f"{', '.join(f'{v:g} {k}' for k, v in per.items())} -> {sweep_dir} (Tune's log: {log_path})", flush=True)
    t0 = time.perf_counter()
    try:
        with no_retry_for_not_retryable():
            grid = tuner.fit()
    finally:
        from ..teachers import service_summary, stop_service

        if services:  # what the sweep's teachers did, for the record (and the service bench)
            storage.write_text(storage.join(sweep_dir, "service.json"), json.dumps(
                {key: service_summary(names) for key, names in services.items()}, indent=1))
        for names in services.values():
            stop_service(names)
    wall = time.perf_counter() - t0
    tables = sweep_results.write(sweep_dir, spec)
    # from the saved experiment state: an interrupted sweep saves its unfinished trials as pending
    complete = len(grid) > 0 and bool(tables.trials["status"].isin(["TERMINATED", "ERROR"]).all())
    if verbose:
        print(sweep_results.describe(tables, spec), flush=True)
        if not complete:
            print("\nsweep interrupted: finished trials are kept; rerun the same command to resume "
                  "(--retry-errored to rerun errored trials too)", flush=True)
    return SweepResult(sweep_dir, tables.trials, tables.summary, tables.best_config, complete, wall)
