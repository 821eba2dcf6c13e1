"""`--dry-run`: what a `train` or `tune` command would run, resolved and checked, started nothing.

Everything the driver checks before Ray starts is checked (fields, model and dataset names,
what the teacher source needs); the data is not loaded and no Ray is started, so the
resources printed are what the run will ask for, not whether a cluster has them, and where it
would run (in this process, or on Ray Train workers).
"""
from __future__ import annotations

from ..config import Config, dump
from ..topology import Topology
from .in_process import runs_in_process


def _fmt(resources: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


def describe_run(cfg: Config) -> str:
    """The resolved config and the cohort's layout over Ray Train workers."""
    ppw, n = cfg.scale.peers_per_worker, cfg.num_peers
    topos = [Topology(rank, n, cfg.scale.replicas, ppw) for rank in range(cfg.world_size)]
    workers = [f"  worker {t.rank}: peer{'s' if ppw > 1 else ''} {', '.join(map(str, t.peers))} "
               f"({', '.join(cfg.models[p] for p in t.peers)}), replica {t.replica}" for t in topos]
    if runs_in_process(cfg):
        where = (f"in this process (Ray Train's local mode, run.in_process={cfg.run.in_process!r}): no Ray cluster "
                 f"or worker process to start; {_fmt(cfg.worker_resources)} of this machine")
    else:
        where = (f"{cfg.world_size} Ray Train worker(s), each asking for {_fmt(cfg.worker_resources)}; "
                 f"in all {_fmt({k: v * cfg.world_size for k, v in cfg.worker_resources.items()})}")
    lines = [f"dry run: would train run {cfg.run.name!r} ({cfg.distill.mode} cohort of {n} peers on "
             f"{cfg.data.dataset}, {cfg.train.epochs} epochs) -> {cfg.run.storage}/{cfg.run.name}",
             where, *workers, "resolved config:", *("  " + line for line in dump(cfg).splitlines())]
    return "\n".join(lines)


def describe_sweep(spec) -> str:
    """Every trial with its values and what it asks Ray for; the sweep's settings."""
    from ..sweep.spec import trial_resources

    trials = spec.trials()
    configs = [spec.trial_config(t) for t in trials]
    keys = list(trials[0])
    rows = [[str(t[k]) for k in keys] + [f"{c.world_size}", _fmt(trial_resources(c)) if c.in_one_process
                                         else f"{c.world_size} x ({_fmt(c.worker_resources)})"]
            for t, c in zip(trials, configs)]
    header = keys + ["workers", "resources"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    table = [" ".join(h.rjust(w) for h, w in zip(header, widths))] + \
            [" ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join([f"dry run: sweep {spec.name!r} -> {spec.sweep_dir}: {len(trials)} trials, scheduler "
                      f"{spec.scheduler.name}, objective {spec.metric}, {spec.base.train.epochs} epochs each",
                      *table])
