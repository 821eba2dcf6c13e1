"""A sweep's preflight: the sweep file checked once, then one run plan (run/plan.py make_plan) per
distinct trial config, the plans sharing what they read (each dataset once per data config, each
teacher source checked once per teacher setting). `tune` runs from it and `tune --dry-run`
prints it, so a dry run refuses what the sweep would refuse: a field, a name, a teacher, the
data, and a cohort the cluster (a dry run: this machine) cannot place.

This module imports nothing heavy until the sweep file's fields have passed (SweepSpec.check):
the CLI refuses a bad field in Python's start-up time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config.schema import Config
from .spec import SweepSpec


@dataclass
class SweepPlan:
    spec: SweepSpec
    """The sweep, its paths made absolute (trials run in their own working directories)."""
    configs: list[Config]
    """Every trial's config, checked, in the order of spec.trials()."""
    plans: dict[Config, Any] = field(default_factory=dict)
    """Each distinct trial config's run plan (run.plan.Plan): its data, teacher and layout."""
    shared: Any = None
    """What the plans read, shared (run.plan.Shared): each dataset once."""

    def plan_of(self, cfg: Config):
        return self.plans[cfg]

    @property
    def notes(self) -> list[str]:
        """What the plans have to say (resources a dry run could not check, ...), each line once."""
        return list(dict.fromkeys(n for p in self.plans.values() for n in p.notes))


def plan_sweep(spec: SweepSpec, models=None, datasets=None, *, dry_run: bool = False) -> SweepPlan:
    """Every check of a sweep, each made once, in the order a refusal costs least: the spec (its
    fields first: pure Python), each teacher setting's teacher source, the trackers it logs to,
    then (Ray started or joined here, unless `dry_run`) a plan per distinct trial config, whose
    cohort is checked against the cluster before any more data are read. `dry_run`: start
    nothing; the resources are this machine's as an embedded Ray would have them, unless a
    cluster would be joined."""
    configs = spec.check(models, datasets, teachers=False)  # the teachers: below, on the data the plans share

    from ..run.plan import Shared, make_plan
    from ..teachers import with_absolute_checkpoint

    # trials run in their own working directories: paths are made absolute here, where they were written
    spec = dataclasses.replace(spec, storage_path=spec.storage_root, base=with_absolute_checkpoint(spec.base))
    configs = [with_absolute_checkpoint(c) for c in configs]
    plan = SweepPlan(spec, configs, shared=Shared())
    for cfg in configs:  # once per teacher setting, before Ray starts; each plan finds its teacher checked
        plan.shared.teacher(cfg, models, datasets)
    if spec.base.run.loggers:
        from ..rundir.trackers import check_trackers

        check_trackers(spec.base.run.loggers, "loggers")
    if not dry_run:
        from ..run.env import init_ray, use_sweep_env

        use_sweep_env()
        init_ray(workers_print=False)  # each trial's own lines stay in its worker's log: the console says ours
    for cfg in dict.fromkeys(configs):
        plan.plans[cfg] = make_plan(cfg, models=models, datasets=datasets, dry_run=dry_run, shared=plan.shared,
                                    trial=True)
    return plan
