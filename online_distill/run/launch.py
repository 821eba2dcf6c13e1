"""Driver side: check the config, find or start Ray, run the cohort with a TorchTrainer, and
write the tables. Everything that can be refused is refused here, before a worker starts."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import pandas as pd

from . import compression
from .. import config as config_mod
from .. import storage
from ..checks import check
from ..config import Config, ConfigError
from .env import use_local_ray_env, use_our_lines_env
from .in_process import check_machine, cluster_address, finished_at, fit_in_process, prune_checkpoints, runs_in_process
from .resume import check_resume
from .results import final_table, format_table, history_frame, write_run_tables
from ..teachers.frozen import with_absolute_checkpoint

# Fields that may change when a run is resumed; any other change would make the resumed
# run a different experiment than the one its checkpoints came from.
RESUMABLE_CHANGES = {"train.epochs", "train.log_every_s", "run.max_failures", "run.checkpoints_to_keep",
                     "run.storage_path", "run.fail_once_at_epoch", "run.in_process",
                     # where peers run, not what they learn (tests/test_packing.py): a run started on
                     # two GPUs may go on packed on one
                     "scale.peers_per_worker"}


@dataclass
class RunResult:
    run_dir: str
    history: pd.DataFrame
    metrics: dict[str, Any]
    checkpoint: Any

    @property
    def final(self) -> pd.DataFrame:
        return final_table(self.history)


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None, *, workers_print: bool = True) -> None:
    """Join the cluster in RAY_ADDRESS, or the one a `ray start` on this machine left its address
    for (on a head node; ray.init() would join it too, and refuses local resources then), or
    start an embedded local Ray with this machine's CPUs and GPUs. `workers_print=False` keeps
    the workers' own lines (every trial's epoch lines) out of this terminal."""
    use_our_lines_env()
    import ray

    if ray.is_initialized():
        return
    quiet = dict(logging_level=logging.WARNING, log_to_driver=workers_print)
    address = cluster_address()
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=workers_print)
        return
    if num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count()
    use_local_ray_env()
    ray.init(num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, **quiet)


def check_resources(cfg: Config) -> None:
    """Refuse a cohort that the cluster can never place: all workers must run at once, and each
    worker's CPUs and GPUs must fit on one node."""
    import ray

    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    ppw = cfg.scale.peers_per_worker
    where = (f"{cfg.num_peers} models / scale.peers_per_worker={ppw} x scale.replicas={cfg.scale.replicas} = "
             f"{cfg.world_size} worker{'s' if cfg.world_size > 1 else ''}")
    packed_hint = (f", or more peers per worker (scale.peers_per_worker: a divisor of {cfg.num_peers})"
                   if ppw < cfg.num_peers else "")
    biggest = max((n.get("CPU", 0) for n in nodes), default=total.get("CPU", 0))
    if cfg.scale.cpus_per_worker > biggest + 1e-9:
        raise ConfigError(f"scale.cpus_per_worker: got {cfg.scale.cpus_per_worker:g}; allowed: at most {biggest:g}, "
                          "the CPUs of the largest node (a worker runs on one node)")
    need_cpu = cfg.world_size * cfg.scale.cpus_per_worker
    if need_cpu > total.get("CPU", 0) + 1e-9:
        raise ConfigError(f"scale: {where} at scale.cpus_per_worker={cfg.scale.cpus_per_worker:g} need "
                          f"{need_cpu:g} CPUs; the cluster has {total.get('CPU', 0):g}. Allowed: fewer replicas, "
                          f"a smaller scale.cpus_per_worker{packed_hint}")
    if cfg.scale.use_gpu:
        gpus = cfg.world_size * cfg.scale.gpus_per_worker
        if gpus > total.get("GPU", 0) + 1e-9:
            raise ConfigError(f"scale.use_gpu: {where} need {gpus:g} GPUs; the cluster has {total.get('GPU', 0):g}. "
                              f"Allowed: use_gpu=false, fewer replicas{packed_hint}")


def prepare_run_dir(cfg: Config, run_dir: str) -> bool:
    """Refuse to touch a finished run, or to resume a run under a different config.
    Writes the resolved config beside the results. Returns True when resuming."""
    if storage.exists(storage.join(run_dir, "result.json")):
        raise ConfigError(f"run.name: run {cfg.run.name!r} already finished in {run_dir}; its results are kept. "
                          f"Allowed: a new name, e.g. --set run.name={cfg.run.name}-2")
    old = storage.read_text(storage.join(run_dir, "config.yaml"))
    if old is not None:
        import yaml

        before = _flatten(yaml.safe_load(old))
        now = _flatten(config_mod.to_dict(cfg))
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ConfigError(f"run.name: {cfg.run.name!r} exists in {run_dir} with another config ({diffs}). "
                              f"Allowed: the same config to resume it, or a new run.name")
    storage.write_text(storage.join(run_dir, "config.yaml"), config_mod.dump(cfg))
    return old is not None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def preflight_data(cfg: Config, datasets=None, models=None) -> None:
    """Load the data once on the driver of a local run and build every model of the cohort on
    its real first examples: a missing dataset, a split that does not fit, labels outside
    [0, num_classes), or a model builder that fails or returns logits of the wrong shape is a
    ConfigError now, not a worker retry later (and downloads happen once)."""
    import torch

    from ..data import load_data
    from ..host import memory_format
    from ..models import build_model

    data = load_data(cfg.data, datasets)
    disjoint = cfg.distill.peer_data == "disjoint"  # codistilling peers may each take their own shard
    shard = len(data.train) // (cfg.world_size if disjoint else cfg.scale.replicas)  # disjoint: one peer per worker
    if cfg.train.batch_size > shard:
        raise ConfigError(f"train.batch_size: got {cfg.train.batch_size}; allowed: at most {shard}, "
                          f"the training examples per {'worker' if disjoint else 'replica'}")
    from ..models import MODELS

    known = {**MODELS, **(models or {})}
    checked = set()
    for i, name in enumerate(cfg.models):
        # one build per architecture (a resnet costs a second); a caller that did not pass the
        # user's builders (cfg.check has seen them) leaves those to the workers
        if name not in checked and name in known:
            checked.add(name)
            with torch.random.fork_rng():  # the driver's RNG is not the workers' business
                build_model(name, data.sample, data.num_classes, models, field=f"models[{i}]",
                            memory_format=memory_format(data.sample, cfg.scale.channels_last))


def make_trainer(cfg: Config, *, models=None, datasets=None, callbacks=None, resume_from_checkpoint=None,
                 local_reporter=None):
    """The TorchTrainer of one cohort (also built by each Tune trial's driver).
    `resume_from_checkpoint` starts a new run from a checkpoint (a Tune trial's, or a PBT donor's);
    Train V2 refuses the TorchTrainer argument of that name, so it travels in the loop's config.
    `local_reporter`: run in Train's local mode (ScalingConfig(num_workers=0): the loop runs in
    this process, no worker group) for a cohort of one worker; local mode keeps only the last
    report in memory, so the loop reports through this function instead (a Tune trial's)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..loop import train_loop_per_worker

    local = local_reporter is not None
    if local and cfg.world_size != 1:
        raise ValueError(f"Train's local mode runs one worker; this cohort has {cfg.world_size}")
    # ScalingConfig announces local mode at INFO on every trial; that it runs so is our design
    logging.getLogger("ray.train.v2.api.config").setLevel(logging.WARNING)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "models": models, "datasets": datasets, "resume_from": resume_from_checkpoint,
                           "reporter": local_reporter},
        scaling_config=ray.train.ScalingConfig(num_workers=0 if local else cfg.world_size, use_gpu=cfg.scale.use_gpu,
                                               resources_per_worker=None if local else cfg.worker_resources),
        torch_config=TorchConfig(backend="nccl" if cfg.scale.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=callbacks, logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # progress lines are printed by rank 0 as they are, not re-logged through Train's logger
            worker_runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )


def _measured(table: pd.DataFrame, column: str) -> dict[str, float]:
    """member -> value of a final-table column, where the run measured it."""
    if column not in table.columns:
        return {}
    return {m: float(v) for m, v in zip(table["member"], table[column]) if pd.notna(v)}


def history_from_checkpoint(checkpoint) -> list[dict]:
    from ..checkpoint import read_history

    with checkpoint.as_directory() as d:
        return read_history(d)


def train_cohort(cfg: Config, *, models: dict | None = None, datasets: dict | None = None,
                 verbose: bool = True) -> RunResult:
    """Train one cohort with a TorchTrainer (`online_distill.train` also runs born-again chains
    of them). `models` / `datasets` add user builders by name (Python API)."""
    check(cfg, models, datasets)
    cfg = with_absolute_checkpoint(cfg)  # workers do not share the driver's working directory
    if cfg.distill.mode == "born_again":
        raise ConfigError("distill.mode: got 'born_again'; allowed: a mode of one run (online_distill.train runs "
                          "born-again generations as a chain of runs)", "distill.mode")
    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    if not os.environ.get("RAY_ADDRESS"):  # a cluster's data may live only where its workers run
        preflight_data(cfg, datasets, models)  # before Ray starts: bad data or models cost no start-up, no retry
    here = runs_in_process(cfg)  # one worker and no cluster: this process, no Ray cluster to start
    if here:
        check_machine(cfg)
    else:
        init_ray()
        check_resources(cfg)
    resuming = prepare_run_dir(cfg, run_dir)
    fallback, start = check_resume(cfg, run_dir)  # the newest checkpoint that loads, whoever wrote it
    if fallback:
        print(fallback, file=sys.stderr, flush=True)
    if verbose:
        where = "in this process" if here else f"on {cfg.world_size} Ray Train worker{'s' if cfg.world_size > 1 else ''}"
        print(f"{'resuming' if resuming else 'starting'} run {cfg.run.name!r}: {cfg.distill.mode} cohort of "
              f"{cfg.num_peers} peers ({', '.join(cfg.models)}) x {cfg.scale.replicas} replica(s) on "
              f"{cfg.data.dataset}, {cfg.train.epochs} epochs, {where} -> {run_dir}", flush=True)
    if here:
        metrics, checkpoint = fit_in_process(cfg, run_dir, start, make_trainer, models=models, datasets=datasets)
    else:
        from ray.train import Checkpoint

        result = make_trainer(cfg, models=models, datasets=datasets,
                              resume_from_checkpoint=Checkpoint(start) if start else None).fit()
        metrics, checkpoint = result.metrics, result.checkpoint
        if checkpoint is None and start:  # every epoch was trained already: stopped before its tables
            metrics, checkpoint = finished_at(start)
        prune_checkpoints(run_dir, cfg.run.checkpoints_to_keep)  # an earlier attempt's: Ray keeps only its own
    history = history_frame(history_from_checkpoint(checkpoint))
    write_run_tables(run_dir, history)
    final = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
    storage.write_text(storage.join(run_dir, "result.json"), json.dumps({"complete": True, "metrics": final}, indent=1))
    final_rows = final_table(history)
    sizes = compression.write_report(cfg, run_dir, checkpoint, models=models, datasets=datasets,
                                     test_acc=_measured(final_rows, "test_acc"))
    if verbose:
        print(f"\nfinished {cfg.run.name!r} ({run_dir}):\n{format_table(final_rows)}", flush=True)
        print(f"\nsize and CPU speed (compression.csv):\n{compression.format_report(sizes)}", flush=True)
    return RunResult(run_dir, history, metrics, checkpoint)
