"""The driver's preflight: everything a run needs settled before anything starts, built once.

`make_plan` checks the config (fields, builders, what the teacher source needs), reads the
dataset once and builds every model of the cohort on its real first examples, works out where
the cohort runs (its Layout: workers, shards, resources) and whether this machine or cluster can
hold it, and where the run directory stands (finished, another config, another live run holding
it, where it resumes). The launch (`launch.train_cohort`), the dry run, a born-again chain
(generations.py) and the sweeps (sweep/plan.py) take a Plan, so a dry run refuses exactly what
the run refuses, and no check is made twice. Plans made together (a chain's generations, a
sweep's trials) share what they read (`Shared`): each dataset is read once. Nothing is written
until `Plan.prepare`, which takes the run's lock and writes the config, the teacher copy, and
sets aside what a crashed attempt left.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..config import files as config_file
from ..config import schema as config_mod
from ..config.schema import Config, ConfigError, with_overrides
from ..core.topology import Layout, layout_of
from ..rundir.checkpoint import ResumePoint, find_resume_point
from ..rundir.layout import CONFIG, RESULT, TEACHER, RunDir, generation_name
from .resume import refusal, set_aside

# Fields that may change when a run is resumed; any other change would make the resumed
# run a different experiment than the one its checkpoints came from.
RESUMABLE_CHANGES = {"train.epochs", "train.log_every_s", "run.max_failures", "run.checkpoints_to_keep",
                     "run.storage_path", "run.fail_once_at_epoch", "run.in_process", "run.loggers",
                     # where peers run, not what they learn (tests/test_packing.py): a run started on
                     # two GPUs may go on packed on one
                     "scale.peers_per_worker"}


@dataclass
class Shared:
    """What plans made together share (a born-again chain's generations, a sweep's trials), filled
    as they are made: each dataset read once, by its data config; each teacher source checked once,
    by what its check depends on; each model built once on each dataset."""
    data: dict = field(default_factory=dict)
    teachers: dict = field(default_factory=dict)
    built: set = field(default_factory=set)

    def read(self, cfg: Config, datasets=None):
        """The dataset of cfg.data, read the first time it is asked for (data.datasets.load_data)."""
        if cfg.data not in self.data:
            from ..data.datasets import load_data

            self.data[cfg.data] = load_data(cfg.data, datasets)
        return self.data[cfg.data]

    def teacher(self, cfg: Config, models=None, datasets=None, data=None):
        """What cfg's teacher source needs (teachers.check_teacher), checked once per teacher
        setting; a frozen teacher is built on the dataset (read here, once, if `data` is None)."""
        key = (cfg.distill, cfg.data, cfg.models, cfg.optim.schedule, cfg.optim.cycles)
        if key not in self.teachers:
            from ..teachers import check_teacher

            if data is None and cfg.distill.mode == "offline":
                data = self.read(cfg, datasets)
            self.teachers[key] = check_teacher(cfg, models, datasets, data=data)
        return self.teachers[key]


@dataclass
class Plan:
    cfg: Config
    run_dir: RunDir
    in_process: bool
    """The cohort trains in this process (Train's local mode), else in a Ray Train worker group.
    A sweep trial's: in its trial's process."""
    layout: Layout | None = None
    """Where the cohort runs (core.topology.layout_of): the launch and every worker use this one."""
    data: Any = None
    """The dataset as the driver read it (data.Data); None where the data live on the cluster only."""
    resume: ResumePoint = field(default_factory=ResumePoint)
    resuming: bool = False
    """The run directory holds an earlier attempt of this run (its config.yaml)."""
    teacher: Any = None
    """A frozen teacher's [(TeacherSource, state dict), ...] (one, or an ensemble's), resolved once."""
    models: dict | None = None
    datasets: dict | None = None
    notes: list[str] = field(default_factory=list)
    """Lines the plan has to say (resources it could not check, ...)."""
    lock: Any = None
    service: list[str] | None = None
    """The teacher service's actor names (distill.teacher_service), once started."""
    shared: Shared = field(default_factory=Shared)
    """What this plan read, for the plans made after it to share (the dataset: read once)."""
    chain: Plan | None = None
    """Born-again: the chain's own plan (its config and run directory); this plan is generation 0's
    (generations.py makes each later generation's with this one's `shared`)."""

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = layout_of(self.cfg)

    def prepare(self) -> list[str]:
        """Take the run's lock, then write what the run starts from. Returns lines to print."""
        lines = []
        if self.lock is None:  # the CLI takes it first thing (cli._hold_the_run)
            self.lock = self.run_dir.lock()
            taken = self.lock.acquire()
            if taken:
                lines.append(taken)
        try:
            removed = self.run_dir.clean_partial()
            if removed:
                lines.append(f"run {self.cfg.run.name!r}: removed what an interrupted write left: {', '.join(removed)}")
            moved = set_aside(self.run_dir, self.resume)
            if moved:
                lines.append(moved)
            self.run_dir.write(CONFIG, config_file.dump(self.cfg))
            from .. import teachers

            if self.teacher is not None and not self.run_dir.exists(TEACHER):
                teachers.write_copy(self.run_dir, self.teacher)
            if self.teacher is not None and self.cfg.distill.teacher_cache_dir and self.data is not None:
                lines.append(teachers.fill_cache(self.cfg, self.data, self.teacher, self.models))
            if self.teacher is not None and self.cfg.distill.teacher_service:
                self.service = start_teacher_service(self.cfg, self.data, self.teacher, self.run_dir.file(TEACHER))
                lines.append(f"teacher service: {len(self.service)} replica(s) of {self.cfg.distill.service_cpus:g} CPU, "
                             f"{self.cfg.distill.service_gpus:g} GPU hold the teacher; the students call it")
        except BaseException:
            self.release()
            raise
        return lines

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.service:
            from .. import teachers

            teachers.stop_service(self.service)  # the run's own teacher service: its resources go back
            self.service = None

    def header(self) -> str:
        cfg, workers = self.cfg, self.layout.world_size
        where = "in this process" if self.in_process else \
            f"on {workers} Ray Train worker{'s' if workers > 1 else ''}"
        if self.resume.checkpoint:
            what = f"resuming run {cfg.run.name!r} {self.resume.describe()}"
        elif self.resuming:
            what = f"restarting run {cfg.run.name!r} from scratch (its earlier attempt saved no checkpoint)"
        else:
            what = f"starting run {cfg.run.name!r}"
        return (f"{what}: {cfg.distill.mode} cohort of {cfg.num_peers} peers ({', '.join(cfg.models)}) x "
                f"{cfg.scale.replicas} replica(s) on {cfg.data.dataset}, {cfg.train.epochs} epochs, {where} -> "
                f"{self.run_dir.path}")


def make_plan(cfg: Config, *, models=None, datasets=None, dry_run: bool = False, run_dir: RunDir | None = None,
              check_run_dir: bool = True, shared: Shared | None = None, trial: bool = False) -> Plan:
    """Every check of a run, made once (see the module docstring). `dry_run`: start nothing and
    write nothing (a worker group's resources are checked against this machine unless a cluster
    is joined). `check_run_dir=False`: the caller owns the directory's state. `shared`: what
    plans made before this one read (a chain's generations, a sweep's trials): not read again.
    `trial`: a sweep trial's plan (sweep/plan.py): its spec has checked the config's fields,
    names and loggers; the directory is the trial's; the cohort runs in a trial's process or
    worker group anywhere in the cluster, which the sweep has joined (a dry run: this machine),
    and a sweep that cannot be placed is refused before its data are read."""
    from ..teachers import with_absolute_checkpoint
    from .checks import check_names
    from .in_process import runs_in_process

    if not trial:
        cfg = check_names(cfg.check_fields(), models, datasets, teacher=False)
    cfg = with_absolute_checkpoint(cfg)  # workers do not share the driver's working directory
    shared = shared if shared is not None else Shared()
    if cfg.distill.mode == "born_again":
        return _born_again_plan(cfg, models, datasets, dry_run, run_dir, check_run_dir, shared)
    plan = Plan(cfg, run_dir or RunDir.of(cfg), in_process=cfg.in_one_process if trial else runs_in_process(cfg),
                models=models, datasets=datasets, shared=shared)
    if trial:
        _check_resources(plan, dry_run, trial=True)
    if not os.environ.get("RAY_ADDRESS"):  # a cluster's data may live only where its workers run
        plan.data = read_data(cfg, models, datasets, shared=shared)
    plan.teacher = shared.teacher(cfg, models, datasets, data=plan.data)
    if cfg.run.loggers and not trial:
        from ..rundir.trackers import check_trackers

        check_trackers(cfg.run.loggers)  # their libraries, here, before any worker starts
    if not trial:
        _check_resources(plan, dry_run)
    if check_run_dir and not trial:
        check_run_directory(plan, dry_run=dry_run)
    return plan


def _check_resources(plan: Plan, dry_run: bool, trial: bool = False) -> None:
    """Refuse a cohort that cannot be placed: on this machine (a cohort in this process), on an
    embedded Ray with this machine's CPUs and GPUs (a dry run that joins no cluster), or on the
    cluster (joined, or started, here). A sweep trial runs in a trial's process anywhere in the
    cluster: the cluster's resources, never this process's."""
    from .env import cluster_address

    if plan.in_process and not trial:
        check_machine(plan.cfg)
    elif dry_run and cluster_address() is None:
        check_resources(plan.cfg, *local_resources())
    elif dry_run:
        plan.notes.append(f"resources not checked: a dry run does not join the cluster at {cluster_address()}")
    else:
        from .env import init_ray

        init_ray()
        check_resources(plan.cfg, *cluster_resources())


def _born_again_plan(cfg: Config, models, datasets, dry_run: bool, run_dir: RunDir | None, check_run_dir: bool,
                     shared: Shared) -> Plan:
    """A born-again chain is a run of runs (generations.py): its own directory is checked here,
    and the plan is generation 0's, its `chain` the chain's own; each later generation, the same
    cohort taught by the one before, makes its plan when it starts (its teacher is the generation
    before it), with this one's `shared`: the data are read once for the whole chain."""
    shared.teacher(cfg, models, datasets)  # what born-again needs: generations >= 2, one model, ...
    outer = Plan(cfg, run_dir or RunDir.of(cfg), in_process=True, shared=shared)
    if check_run_dir:
        check_run_directory(outer, dry_run=dry_run)
    first = make_plan(generation_config(cfg, 0, outer.run_dir), models=models, datasets=datasets, dry_run=dry_run,
                      check_run_dir=False, shared=shared)
    first.notes.append(f"born-again: {cfg.distill.generations} generations, each this cohort in "
                       f"{outer.run_dir.path}/gen<g>; generation g > 0 is taught by frozen generation g - 1")
    first.chain = outer
    return first


def read_data(cfg: Config, models=None, datasets=None, *, shared: Shared | None = None):
    """Load the data once on the driver and build every model of the cohort on its real first
    examples: a missing dataset, a split that does not fit, labels outside [0, num_classes), or
    a model builder that fails or returns logits of the wrong shape is a ConfigError now, not a
    worker retry later (and downloads happen once). `shared`: the data and models read and
    built for earlier plans, not read or built again."""
    import torch

    from ..core.host import memory_format
    from ..models.builders import build_model

    shared = shared if shared is not None else Shared()
    data = shared.read(cfg, datasets)
    layout = layout_of(cfg)
    disjoint = layout.disjoint_peers  # codistilling peers may each take their own shard
    shard = len(data.train) // layout.num_shards  # disjoint: one peer per worker
    if cfg.train.batch_size > shard:
        raise ConfigError(f"train.batch_size: got {cfg.train.batch_size}; allowed: at most {shard}, "
                          f"the training examples per {'worker' if disjoint else 'replica'}", "train.batch_size")
    if cfg.onpolicy.on and not data.is_sequence:
        raise ConfigError(f"onpolicy.lmbda: got {cfg.onpolicy.lmbda} (mask_prompts {cfg.onpolicy.mask_prompts}); allowed: "
                          f"0 and false for {cfg.data.dataset!r}, whose examples are not token sequences (on-policy "
                          "training continues prompts: a language model's data)", "onpolicy.lmbda")
    if data.is_sequence and (cfg.data, cfg.models) not in shared.built:  # a vocabulary per model: say which disagree
        _same_output_size(cfg, data, models)  # (classes: build_model names the model)
        shared.built.add((cfg.data, cfg.models))
    for _i, name in enumerate(dict.fromkeys(cfg.models)):  # one build per architecture (a resnet costs a second)
        if (cfg.data, name, cfg.scale.channels_last) in shared.built:
            continue
        with torch.random.fork_rng():  # the driver's RNG is not the workers' business
            build_model(name, data.sample, data.num_classes, models, field=f"models[{cfg.models.index(name)}]",
                        memory_format=memory_format(data.sample, cfg.scale.channels_last), label_shape=data.label_shape)
        shared.built.add((cfg.data, name, cfg.scale.channels_last))
    return data


def _same_output_size(cfg: Config, data, models=None) -> None:
    """Language models whose vocabularies differ cannot teach each other: refused in one line
    naming every model and its size. A model that fails to build is left to build_model, whose
    message says why."""
    import torch

    from ..models.builders import resolve_model

    size_of = {}
    for name in dict.fromkeys(cfg.models):  # one build per architecture
        try:
            with torch.no_grad(), torch.random.fork_rng():
                out = resolve_model(name, models)(tuple(data.sample.shape[1:]), data.num_classes).eval()(data.sample)
            size_of[name] = int(out.shape[-1])
        except Exception:  # noqa: BLE001 - build_model names what went wrong
            continue
    sizes = {i: size_of[name] for i, name in enumerate(cfg.models) if name in size_of}
    if len(set(sizes.values())) > 1 or any(v != data.num_classes for v in sizes.values()):
        named = ", ".join(f"models[{i}] {cfg.models[i]!r} predicts {v}" for i, v in sizes.items())
        raise ConfigError(f"models: {named}; allowed: every model predicting the dataset's {data.num_classes} classes "
                          "(tokens of its vocabulary), or a mapping between vocabularies in the model", "models")


def check_run_directory(plan: Plan, *, dry_run: bool) -> None:
    """Refuse a finished run, a run of another config under the same name, a run another live
    process holds, and a run none of whose checkpoints loads; find where it resumes."""
    cfg, run = plan.cfg, plan.run_dir
    if run.exists(RESULT):
        raise ConfigError(f"run.name: run {cfg.run.name!r} already finished in {run.path}; its results are kept. "
                          f"Allowed: a new name, e.g. --set run.name={cfg.run.name}-2", "run.name")
    holder = run.lock().holder() if dry_run else None
    if holder is not None:
        raise ConfigError(run.lock().refusal(holder), "run.name")
    old = run.read_text(CONFIG)
    if old is not None:
        import yaml

        before, now = config_mod.flatten(yaml.safe_load(old)), config_mod.flatten(config_mod.to_dict(cfg))
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ConfigError(f"run.name: {cfg.run.name!r} exists in {run.path} with another config ({diffs}). "
                              f"Allowed: the same config to resume it, or a new run.name", "run.name")
    plan.resuming = old is not None
    plan.resume = find_resume_point(run, cfg.num_peers)
    if plan.resume.refused:
        raise refusal(cfg, run, plan.resume)



def check_machine(cfg: Config) -> None:
    """What check_resources is for a worker group: refuse what this process cannot give."""
    cpus = os.cpu_count() or 1
    if cfg.scale.cpus_per_worker > cpus:
        raise ConfigError(f"scale.cpus_per_worker: got {cfg.scale.cpus_per_worker:g}; allowed: at most {cpus}, the CPUs "
                          "of this machine (the cohort trains in this process: run.in_process)", "scale.cpus_per_worker")
    if cfg.scale.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("scale.use_gpu: true, but this machine has no GPU that torch can use (the cohort trains "
                              "in this process: run.in_process). Allowed: false, or a cluster with GPUs (RAY_ADDRESS)",
                              "scale.use_gpu")


def local_resources() -> tuple[dict, list[dict]]:
    """What an embedded local Ray would have: this machine's CPUs and GPUs, as one node."""
    import torch

    total = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    return total, [total]


def cluster_resources() -> tuple[dict, list[dict]]:
    import ray

    return ray.cluster_resources(), [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def check_resources(cfg: Config, total: dict, nodes: list[dict]) -> None:
    """Refuse a cohort that the cluster can never place: all workers must run at once, and each
    worker's CPUs and GPUs must fit on one node."""
    layout = layout_of(cfg)
    ppw, need = cfg.scale.peers_per_worker, layout.total_resources
    where = (f"{cfg.num_peers} models / scale.peers_per_worker={ppw} x scale.replicas={cfg.scale.replicas} = "
             f"{layout.world_size} worker{'s' if layout.world_size > 1 else ''}")
    packed_hint = (f", or more peers per worker (scale.peers_per_worker: a divisor of {cfg.num_peers})"
                   if ppw < cfg.num_peers else "")
    biggest = max((n.get("CPU", 0) for n in nodes), default=total.get("CPU", 0))
    if cfg.scale.cpus_per_worker > biggest + 1e-9:
        raise ConfigError(f"scale.cpus_per_worker: got {cfg.scale.cpus_per_worker:g}; allowed: at most {biggest:g}, "
                          "the CPUs of the largest node (a worker runs on one node)", "scale.cpus_per_worker")
    need_cpu = need["CPU"]
    if need_cpu > total.get("CPU", 0) + 1e-9:
        raise ConfigError(f"scale: {where} at scale.cpus_per_worker={cfg.scale.cpus_per_worker:g} need "
                          f"{need_cpu:g} CPUs; the cluster has {total.get('CPU', 0):g}. Allowed: fewer replicas, "
                          f"a smaller scale.cpus_per_worker{packed_hint}", "scale")
    if cfg.scale.use_gpu:
        gpus = need["GPU"]
        if gpus > total.get("GPU", 0) + 1e-9:
            raise ConfigError(f"scale.use_gpu: {where} need {gpus:g} GPUs; the cluster has {total.get('GPU', 0):g}. "
                              f"Allowed: use_gpu=false, fewer replicas{packed_hint}", "scale.use_gpu")


def concurrency(configs: list[Config], resources: dict) -> int:
    """How many cohorts fit at once when each needs all its workers at the same time: the
    cluster's CPUs (and GPUs) over the biggest cohort's demand, at least 1."""
    needs = [layout_of(c).total_resources for c in configs]
    cpu = max(n["CPU"] for n in needs)
    n = math.floor(resources.get("CPU", 0) / cpu + 1e-9)
    gpu = max((need.get("GPU", 0) for need in needs), default=0)
    if gpu:
        n = min(n, math.floor(resources.get("GPU", 0) / gpu + 1e-9))
    return max(1, n)


def say(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def generation_config(cfg: Config, g: int, run: RunDir) -> Config:
    """Generation g of a born-again run, as an ordinary run inside the born-again run directory."""
    over: dict = {"run.storage_path": run.path, "run.name": generation_name(g)}
    if g == 0:
        over["distill.mode"] = "independent"
    else:
        over.update({"distill.mode": "offline", "distill.teacher_checkpoint": run.generation(g - 1).path,
                     "distill.teacher_peer": 0, "distill.teacher_model": None})
    return with_overrides(cfg, over)


def start_teacher_service(cfg: Config, data, members: list, copy: str) -> list[str]:
    """The teacher's actor pool (teachers.start_service), on Ray, started here if need be."""
    from .env import init_ray

    if data is None:
        from ..data.datasets import load_data

        data = load_data(cfg.data)
    init_ray()
    from .. import teachers

    return teachers.start_service(cfg, data, members, copy)
