"""`--dry-run`: what a `train` command would run, resolved and checked, started nothing.

It is the run's own preflight plan (run/plan.py): the fields, the builders, the data read and
every model built on it, what the teacher source needs, whether this machine (or the joined
cluster's declared resources) can hold the cohort, and the run directory's state (finished,
another config, held by a live run, where it resumes). So a dry run refuses exactly what the
run refuses; it writes nothing and starts no Ray.
"""
from __future__ import annotations

from ..config.files import dump


def _fmt(resources: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())


def describe_run(plan) -> str:
    """The resolved config, the cohort's layout over Ray Train workers, and where the run stands."""
    cfg, layout = plan.cfg, plan.layout  # the layout the launch and the workers use
    ppw, n = layout.peers_per_worker, cfg.num_peers
    topos = [layout.topology(rank) for rank in range(layout.world_size)]
    workers = [f"  worker {t.rank}: peer{'s' if ppw > 1 else ''} {', '.join(map(str, t.peers))} "
               f"({', '.join(cfg.models[p] for p in t.peers)}), replica {t.replica}" for t in topos]
    if plan.in_process:
        where = (f"in this process (Ray Train's local mode, run.in_process={cfg.run.in_process!r}): no Ray cluster "
                 f"or worker process to start; {_fmt(layout.worker_resources)} of this machine")
    else:
        where = (f"{layout.world_size} Ray Train worker(s), each asking for {_fmt(layout.worker_resources)}; "
                 f"in all {_fmt(layout.total_resources)}")
    data = ""
    if plan.data is not None:
        d = plan.data
        data = (f"data: {len(d.train)} training, {len(d.val)} validation, {len(d.test)} test examples of shape "
                f"{d.input_shape}, {d.num_classes} classes")
    start = plan.resume.describe() if plan.resume.checkpoint else ("from scratch (an earlier attempt saved no "
                                                                      "checkpoint)" if plan.resuming else "from scratch")
    lines = [f"dry run: would train run {cfg.run.name!r} ({cfg.distill.mode} cohort of {n} peers on "
             f"{cfg.data.dataset}, {cfg.train.epochs} epochs) -> {plan.run_dir.path}, {start}",
             where, *workers, *([data] if data else []), *plan.notes,
             "resolved config:", *("  " + line for line in dump(cfg).splitlines())]
    return "\n".join(lines)
