"""Sweep files: a base run config, a search space over dotted config fields, and the sweep's
own settings. Unpacked here into frozen dataclasses and checked completely, so a bad field
name or range is refused on the driver, naming the field, before Ray starts anything.

The trials are resolved up front (grid points x random draws x seeds, plus explicit points and
the `independent` baseline), with the sweep's own seed: the same file always means the same
trials, every setting is run on exactly the same seeds (so a summary over seeds is a summary
of one setting), and the baseline runs once per seed rather than once per setting.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import files as config_file
from ..config import schema as config_mod
from ..config.schema import Config, ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")
OBJECTIVES = {"best_peer": "best_peer/val_acc", "mean": "mean/val_acc", "ensemble": "ensemble/val_acc"}
"""What a trial is judged by, always on the validation split: the best peer, the mean of the
peers, or the peers' ensemble (mean of their probabilities); the number is `metric`'s."""
METRICS = {"acc": "max", "nll": "min", "bpb": "min"}
"""metric: validation accuracy (higher is better), NLL or bits per byte (text: lower is better)."""
SCHEDULERS = ("asha", "pbt", "none")
NOT_SWEPT = {"train.seed": "use `seeds:` (seeds are paired across settings)",
             "run.name": "each trial gets its own run name", "run.storage_path": "set `storage_path:` of the sweep"}
PBT_MUTABLE = ("loss.temperature", "loss.kd_weight", "loss.multi_teacher", "distill.ema_decay")
"""Fields PBT may change in the middle of a trial: read afresh every step and not part of the
restored state. (optim.lr is not: the restored LR schedule keeps the old base LR.)"""
SWEEP_KEYS = ("name", "storage_path", "base", "space", "points", "num_samples", "seeds", "baseline",
              "objective", "metric", "scheduler", "max_concurrent", "search_seed", "checkpoints_to_keep", "loggers")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{name}: got {value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class Dist:
    """One dimension of the search space."""

    kind: str
    """'uniform' or 'loguniform' (values = (low, high)), 'choice' (drawn at random) or 'grid'
    (every value, crossed with the other grid dimensions)."""
    values: tuple

    @property
    def is_range(self) -> bool:
        return self.kind in ("uniform", "loguniform")

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "uniform":
            return _round(rng.uniform(*self.values))
        if self.kind == "loguniform":
            lo, hi = self.values
            return _round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return rng.choice(self.values)

    def clip(self, value: Any) -> Any:
        """Keep a value PBT perturbed (x0.8, x1.2) inside the range the file allows."""
        if not self.is_range:
            return value
        return _round(min(max(value, self.values[0]), self.values[1]))

    def to_tune(self):
        """The domain PBT resamples from."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return list(self.values)

    def to_dict(self) -> dict:
        return {self.kind: list(self.values)}


def _round(x: float) -> float:
    """4 significant digits: sampled settings stay readable in tables and file names."""
    return float(f"{x:.4g}")


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "asha"
    """'asha' (stop weak trials early), 'pbt' (population based training over the loss knobs)
    or 'none' (every trial runs all its epochs)."""
    grace_period: int = 1
    """asha: epochs every trial runs before it may be stopped."""
    reduction_factor: float = 2.0
    """asha: only the top 1/reduction_factor of trials go on at each rung."""
    perturbation_interval: int = 1
    """pbt: epochs between exploit (copy a better trial's checkpoint) and explore (perturb the knobs)."""
    quantile_fraction: float = 0.25
    """pbt: the bottom fraction copies the top fraction."""
    resample_probability: float = 0.25
    """pbt: chance a knob is drawn afresh from the space instead of scaled by 0.8 or 1.2."""

    def check(self, epochs: int) -> None:
        if self.name not in SCHEDULERS:
            _fail("scheduler.name", self.name, ", ".join(repr(s) for s in SCHEDULERS))
        if not 1 <= self.grace_period <= epochs:
            _fail("scheduler.grace_period", self.grace_period, f"an integer in [1, train.epochs={epochs}]")
        if not self.reduction_factor > 1:
            _fail("scheduler.reduction_factor", self.reduction_factor, "a number > 1")
        if not 1 <= self.perturbation_interval < max(2, epochs):
            _fail("scheduler.perturbation_interval", self.perturbation_interval,
                  f"an integer in [1, train.epochs={epochs}) so that PBT acts at least once")
        if not 0 < self.quantile_fraction <= 0.5:
            _fail("scheduler.quantile_fraction", self.quantile_fraction, "a number in (0, 0.5]")
        if not 0 <= self.resample_probability <= 1:
            _fail("scheduler.resample_probability", self.resample_probability, "a number in [0, 1]")


@dataclass(frozen=True)
class SweepSpec:
    name: str
    """Sweep directory name under storage_path; the same name resumes the sweep."""
    base: Config
    """The run config every trial starts from."""
    space: Mapping[str, Dist] = field(default_factory=dict)
    """Dotted config field -> distribution, e.g. loss.temperature: {uniform: [1, 8]}."""
    points: tuple[Mapping[str, Any], ...] = ()
    """Explicit settings (dotted overrides) run in addition to the space, e.g. a paper's values.
    A point that sets train.seed runs once, on that seed (e.g. a student whose teacher is the
    run of the same seed); the others run on every seed of `seeds`."""
    num_samples: int = 1
    """Random draws of the non-grid dimensions per grid point (1 when all dimensions are grids)."""
    seeds: tuple[int, ...] = (0,)
    """Every setting runs once per seed (train.seed); settings and baseline share the seeds."""
    baseline: bool = False
    """Also run distill.mode=independent once per seed, to compare every setting with."""
    objective: str = "best_peer"
    """'best_peer', 'mean' or 'ensemble' validation accuracy: what trials are judged by."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    max_concurrent: int | None = None
    """Trials at once; None: as many as the cluster can place whole (CPUs and GPUs)."""
    search_seed: int = 0
    """Seed of the random draws of settings (not of training)."""
    storage_path: str = "./runs/sweeps"
    checkpoints_to_keep: int | None = None
    """Tune checkpoints kept per trial; None: 2, or all under PBT (a donor's older checkpoint
    must still exist when a weaker trial copies it)."""

    metric_name: str = "acc"
    """`metric:` in a sweep file: 'acc' (validation accuracy), 'nll' or 'bpb' (bits per byte, for text)."""

    @property
    def metric(self) -> str:
        return OBJECTIVES[self.objective].replace("val_acc", f"val_{self.metric_name}")

    @property
    def mode(self) -> str:
        """'max' when higher is better (accuracy), 'min' for NLL and bits per byte."""
        return METRICS[self.metric_name]

    @property
    def storage_root(self) -> str:
        if "://" in self.storage_path:
            return self.storage_path
        return os.path.abspath(os.path.expanduser(self.storage_path))

    @property
    def sweep_dir(self) -> str:
        from ..rundir import storage

        return storage.join(self.storage_root, self.name)

    @property
    def keep(self) -> int | None:
        if self.checkpoints_to_keep is not None:
            return self.checkpoints_to_keep
        return None if self.scheduler.name == "pbt" else 2

    @property
    def mutations(self) -> dict[str, Dist]:
        """The knobs PBT explores: the swept fields that may change mid-trial."""
        return {k: d for k, d in self.space.items() if k in PBT_MUTABLE}

    def settings(self) -> list[dict[str, Any]]:
        """Grid points x random draws, then the explicit points (seeds not yet applied)."""
        rng = random.Random(self.search_seed)
        grid = [(k, d.values) for k, d in self.space.items() if d.kind == "grid"]
        drawn = [(k, d) for k, d in self.space.items() if d.kind != "grid"]
        out = []
        for _ in range(self.num_samples if drawn else 1):
            for combo in itertools.product(*(v for _, v in grid)):
                s = dict(zip((k for k, _ in grid), combo))
                s.update({k: d.sample(rng) for k, d in drawn})
                out.append(s)
        return out + [dict(p) for p in self.points]

    def trials(self) -> list[dict[str, Any]]:
        """Every trial's Tune config: the same keys for all (base values fill the gaps), plus
        `baseline` to tell the independent baseline apart from a swept distill.mode."""
        rows = [{**s, "train.seed": seed, "baseline": False} for s in self.settings() if "train.seed" not in s
                for seed in self.seeds]
        rows += [{**s, "baseline": False} for s in self.settings() if "train.seed" in s]  # points that pin a seed
        if self.baseline:  # learns from nobody: a frozen teacher's settings mean nothing outside 'offline'
            rows += [{"distill.mode": "independent", "train.seed": seed, "baseline": True} for seed in self.seeds]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        flat = config_mod.flatten(config_mod.to_dict(self.base))
        return [{k: r.get(k, to_tune_value(flat[k]) if k in flat else None) for k in keys} for r in rows]

    def trial_config(self, params: Mapping[str, Any], *, run_name: str | None = None, storage_path: str | None = None) -> Config:
        overrides = {k: v for k, v in params.items() if k != "baseline"}
        if run_name is not None:
            overrides["run.name"] = run_name
        if storage_path is not None:
            overrides["run.storage_path"] = storage_path
        return config_mod.with_overrides(self.base, overrides)

    def check(self, models=None, datasets=None, *, names: bool = True, teachers: bool = True) -> list[Config]:
        """Validate everything, each check once; returns the config of every trial (all of them
        checked). First what needs no registry: the sweep's own fields, the base, each value of the
        space, each point and every trial's config (pure Python: the CLI refuses them before
        importing anything heavy). Then, with `names`, the registry names in each (model and dataset
        builders: torch), and with `teachers`, what each trial's teacher source needs, once per
        teacher setting. A sweep's preflight (sweep/plan.py) checks the teachers itself, on the data
        its trials' plans share."""
        configs = self._each_config(lambda c: c.check_fields(), own_fields=True)
        epochs = max(c.train.epochs for c in configs)
        self.scheduler.check(epochs)
        if self.scheduler.name == "pbt":
            if self.baseline:
                _fail("baseline", True, "false with scheduler.name='pbt' (PBT copies weights and settings between "
                      "trials, so a baseline inside it would not stay a baseline; run it as its own sweep)")
            if not self.mutations:
                _fail("space", sorted(self.space), f"at least one of {', '.join(PBT_MUTABLE)} for PBT to explore")
        if names:
            from ..run.checks import check_names  # the registries: torch

            self._each_config(lambda c: check_names(c, models, datasets, teacher=False))
            if teachers:
                _check_teachers(configs, models, datasets)
        return configs

    def _each_config(self, check, own_fields: bool = False) -> list[Config]:
        """`check` the base, the base with each value of the space and with each point, and every
        trial's config, a refusal naming which; `own_fields`: the sweep's own fields too. Returns
        the trials' configs."""
        if own_fields and (not self.name or any(c in self.name for c in "/\\") or self.name.startswith(".")):
            _fail("name", self.name, "a non-empty name without '/' or a leading '.'")
        check(self.base)
        if own_fields:
            self._check_own_fields()
        for key, dist in self.space.items():
            for value in dist.values:  # every grid/choice value, or both ends of a range
                _check_value(self.base, f"space.{key}", key, value, check)
        for i, point in enumerate(self.points):
            _check_value(self.base, f"points[{i}]", None, point, check)
        configs = []
        for params in self.trials():
            try:
                configs.append(check(self.trial_config(params)))
            except ConfigError as e:
                shown = {k: v for k, v in params.items() if k != "baseline"}
                raise ConfigError(f"trial {shown}: {e}") from None
        return configs

    def _check_own_fields(self) -> None:
        if self.num_samples < 1:
            _fail("num_samples", self.num_samples, "an integer >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            _fail("seeds", list(self.seeds), "a non-empty list of distinct integers")
        if self.objective not in OBJECTIVES:
            _fail("objective", self.objective, ", ".join(repr(o) for o in OBJECTIVES))
        if self.metric_name not in METRICS:
            _fail("metric", self.metric_name, ", ".join(repr(m) for m in METRICS))
        if self.max_concurrent is not None and self.max_concurrent < 1:
            _fail("max_concurrent", self.max_concurrent, "null (derived from the cluster) or an integer >= 1")
        if self.checkpoints_to_keep is not None and self.checkpoints_to_keep < 1:
            _fail("checkpoints_to_keep", self.checkpoints_to_keep, "null or an integer >= 1")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["base"] = config_mod.to_dict(self.base)
        d["space"] = {k: v.to_dict() for k, v in self.space.items()}
        d["points"] = [dict(p) for p in self.points]
        d["seeds"] = list(self.seeds)
        d["scheduler"] = dataclasses.asdict(self.scheduler)
        d["metric"] = d.pop("metric_name")
        return d


def _check_teachers(configs: list[Config], models, datasets) -> None:
    """What each trial's teacher source needs, once per distinct teacher setting (a frozen
    teacher's checkpoint is read, and the data its check builds it on, once: run.plan.Shared)."""
    from ..run.plan import Shared

    shared = Shared()
    for c in configs:
        shared.teacher(c, models, datasets)


def _check_value(base: Config, where: str, key: str | None, value: Any, check) -> None:
    overrides = {key: value} if key is not None else dict(value)
    for k in overrides:
        if k in NOT_SWEPT and not (k == "train.seed" and key is None):  # a point may pin its seed
            raise ConfigError(f"{where}: {k} cannot be swept; {NOT_SWEPT[k]}")
    try:
        check(config_mod.with_overrides(base, overrides))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def to_tune_value(v: Any) -> Any:
    """Lists (the peers' models) travel through Tune as comma-joined strings: Tune reads a list in
    a config as more dimensions, and a string is what a table column can show."""
    return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v


# ---- reading a sweep file ----------------------------------------------------------------------

def _parse_dist(key: str, raw: Any) -> Dist:
    where = f"space.{key}"
    if not isinstance(raw, Mapping) or len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS:
        _fail(where, raw, "one of {uniform: [low, high]}, {loguniform: [low, high]}, {choice: [a, b, ...]}, "
              "{grid: [a, b, ...]}")
    kind, values = next(iter(raw.items()))
    if not isinstance(values, list) or not values:
        _fail(where, raw, f"{{{kind}: a non-empty list}}")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            _fail(where, raw, f"{{{kind}: [low, high]}} with two numbers")
        lo, hi = (float(v) for v in values)
        if not lo < hi:
            _fail(where, raw, f"{{{kind}: [low, high]}} with low < high")
        if kind == "loguniform" and lo <= 0:
            _fail(where, raw, "{loguniform: [low, high]} with low > 0")
        values = [lo, hi]
    return Dist(kind, tuple(to_tune_value(v) for v in values))


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    head, _, rest = dotted.partition(".")
    if head == "space" and rest:
        raw.setdefault("space", {})[rest] = value
    elif head == "scheduler" and rest:
        raw.setdefault("scheduler", {})[rest] = value
    elif rest:
        raise ConfigError(f"{dotted}: {head} has no sub-fields; valid: {', '.join(SWEEP_KEYS)} or a run config field")
    else:
        raw[head] = value


def from_dict(raw: Mapping[str, Any], *, base_dir: str = ".", overrides: Mapping[str, Any] | None = None,
              models=None, datasets=None, check: bool = True, names: bool = True) -> SweepSpec:
    """Build (and by default fully check) a sweep from a mapping. `overrides` are dotted: a run
    config field (loss.temperature) changes the base; anything else is a sweep field
    (num_samples, scheduler.name, space.loss.kd_weight, ...)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"sweep: expected a mapping with keys {', '.join(SWEEP_KEYS)}, got {type(raw).__name__}")
    raw = dict(raw)
    base_overrides = {}
    for dotted, value in (overrides or {}).items():
        if dotted.split(".")[0] in config_mod.SECTIONS:
            base_overrides[dotted] = value
        else:
            _set_dotted(raw, dotted, value)
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{key}: unknown sweep field; valid: {', '.join(SWEEP_KEYS)}")
    if "name" not in raw or "base" not in raw:
        raise ConfigError("sweep: `name` and `base` (a run config mapping, or a path to one) are required")

    base = raw["base"]
    try:
        if isinstance(base, str):
            cfg = config_file.load(base if os.path.isabs(base) else os.path.join(base_dir, base))
        elif isinstance(base, Mapping):
            cfg = config_mod.from_dict(base)
        else:
            raise ConfigError(f"got {base!r}; allowed: a run config mapping or a path to a run config YAML")
        cfg = config_mod.with_overrides(cfg, base_overrides) if base_overrides else cfg
        if raw.get("loggers") is not None:  # the sweep's trackers: one tracker run per trial, grouped by sweep
            cfg = config_mod.with_overrides(cfg, {"run.loggers": raw["loggers"]})
    except ConfigError as e:
        raise ConfigError(f"base.{e}" if not str(e).startswith("config file") else f"base: {e}") from None

    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, Mapping):
        _fail("space", space_raw, "a mapping of dotted config fields to distributions")
    points = raw.get("points") or []
    if not isinstance(points, list) or not all(isinstance(p, Mapping) for p in points):
        _fail("points", points, "a list of mappings of dotted config fields to values")
    sched_raw = raw.get("scheduler") or {}
    if isinstance(sched_raw, str):
        sched_raw = {"name": sched_raw}
    if not isinstance(sched_raw, Mapping):
        _fail("scheduler", sched_raw, "a mapping with name: asha | pbt | none")
    sched_fields = {f.name: f for f in dataclasses.fields(SchedulerSpec)}
    for k in sched_raw:
        if k not in sched_fields:
            raise ConfigError(f"scheduler.{k}: unknown field; valid: {', '.join(sched_fields)}")
    hints = {"name": str, "grace_period": int, "reduction_factor": float, "perturbation_interval": int,
             "quantile_fraction": float, "resample_probability": float}
    sched = SchedulerSpec(**{k: config_mod._coerce(f"scheduler.{k}", v, hints[k]) for k, v in sched_raw.items()})
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list):
        _fail("seeds", seeds, "a list of integers")

    spec = SweepSpec(
        name=config_mod._coerce("name", raw["name"], str),
        base=cfg,
        space={str(k): _parse_dist(str(k), v) for k, v in space_raw.items()},
        points=tuple({str(k): to_tune_value(v) for k, v in p.items()} for p in points),
        num_samples=config_mod._coerce("num_samples", raw.get("num_samples", 1), int),
        seeds=tuple(config_mod._coerce(f"seeds[{i}]", s, int) for i, s in enumerate(seeds)),
        baseline=config_mod._coerce("baseline", raw.get("baseline", False), bool),
        objective=config_mod._coerce("objective", raw.get("objective", "best_peer"), str),
        metric_name=config_mod._coerce("metric", raw.get("metric", "acc"), str),
        scheduler=sched,
        max_concurrent=config_mod._coerce("max_concurrent", raw.get("max_concurrent"), int | None),
        search_seed=config_mod._coerce("search_seed", raw.get("search_seed", 0), int),
        storage_path=config_mod._coerce("storage_path", raw.get("storage_path", "./runs/sweeps"), str),
        checkpoints_to_keep=config_mod._coerce("checkpoints_to_keep", raw.get("checkpoints_to_keep"), int | None),
    )
    if check:
        spec.check(models, datasets, names=names)
    return spec


def load(path: str, overrides: Mapping[str, Any] | None = None, *, models=None, datasets=None,
         names: bool = True) -> SweepSpec:
    """Read a sweep file (yaml.safe_load only); a relative `base:` path is read beside it.
    `names=False`: check all but the registry names (see SweepSpec.check)."""
    raw = config_file.read_yaml(path, "sweep file")
    return from_dict(raw, base_dir=os.path.dirname(os.path.abspath(path)), overrides=overrides,
                     models=models, datasets=datasets, names=names)


def dump(spec: SweepSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


def trial_resources(cfg: Config) -> dict:
    """What a trial's actor asks Ray for. A cohort of one worker trains in the trial's own process
    (Train's local mode), so the trial holds that worker's CPUs and its GPU share. Otherwise the
    driver only waits on its TorchTrainer, whose workers hold the real resources: Ray 2.60 refuses
    an all-zero request ({"cpu": 0}), and any CPU slice would make the last trial's workers miss
    their CPUs by that slice; one byte of memory reserves nothing real."""
    if cfg.in_one_process:
        return {"cpu": cfg.scale.cpus_per_worker, **({"gpu": cfg.scale.gpus_per_worker} if cfg.scale.use_gpu else {})}
    return {"cpu": 0, "memory": 1}


def describe(spec: SweepSpec) -> str:
    """`tune --dry-run`: every trial with its values and what it asks Ray for; the sweep's settings."""
    def fmt(resources: dict) -> str:
        return ", ".join(f"{v:g} {k}" for k, v in resources.items())

    trials = spec.trials()
    configs = [spec.trial_config(t) for t in trials]
    keys = list(trials[0])
    rows = [[str(t[k]) for k in keys] + [f"{c.world_size}", fmt(trial_resources(c)) if c.in_one_process
                                         else f"{c.world_size} x ({fmt(c.worker_resources)})"]
            for t, c in zip(trials, configs)]
    header = keys + ["workers", "resources"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    table = [" ".join(h.rjust(w) for h, w in zip(header, widths))] + \
            [" ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join([f"dry run: sweep {spec.name!r} -> {spec.sweep_dir}: {len(trials)} trials, scheduler "
                      f"{spec.scheduler.name}, objective {spec.metric}, {spec.base.train.epochs} epochs each",
                      *table])
