"""A claim's runs as `online-distill train` commands, a few at a time (benchmarks/hinton, benchmarks/lm).

Each job is one command line: a config file of the claim's folder and `--set` items. A job whose
run directory holds result.json is done and never runs again; a failed one is recorded in
failed.jsonl with its last line (a NaN, say) and not retried. Every command is written at the top
of its log, so each number in a table can be rerun by hand.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Job:
    """One run: an arm of a claim, on a seed, with its knobs; the command that runs it."""

    claim: str
    arm: str
    config: str
    """A config file, relative to the repository root."""
    seed: int
    sets: dict = field(default_factory=dict)
    knobs: dict = field(default_factory=dict)
    search_seed: int = 100
    label: str = ""
    """The arm its table rows are filed under, when not `arm`: one run serving two comparisons."""

    @property
    def stage(self) -> str:
        return "search" if self.seed == self.search_seed else "confirm"

    @property
    def name(self) -> str:
        knobs = "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(self.knobs.items()))
        return f"{self.arm}-s{self.seed}" + (f"-{knobs}" if knobs else "")

    def argv(self, work: str, extra: dict | None = None) -> list[str]:
        sets = {**self.sets, "train.seed": self.seed, "run.name": self.name, "run.storage_path": os.path.join(work, "runs"),
                **(extra or {})}
        return ["train", self.config] + [f"--set={k}={yaml_value(v)}" for k, v in sets.items()]

    def confirm(self, seeds, **over) -> list["Job"]:
        """The same setting on each of `seeds`."""
        return [Job(self.claim, self.arm, self.config, s, {**self.sets, **over}, self.knobs, self.search_seed) for s in seeds]


def yaml_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(yaml_value(x) for x in v) + "]"
    if isinstance(v, str) and any(c in v for c in "[]{},:#'\""):  # a model spec: quoted, or YAML splits it
        return json.dumps(v)
    return str(v)


def run_jobs(jobs: list[Job], work: str, parallel: int, extra: dict | None = None, tag: str = "jobs",
             skip: frozenset = frozenset()) -> None:
    """Each job's command in a process of its own, `parallel` at a time (`extra`: --set items for
    every job, e.g. a smoke test's; `skip`: names of jobs not to run, e.g. those already recorded)."""
    todo = list({j.name: j for j in jobs if not finished(j, work) and not failed(j, work) and j.name not in skip}.values())
    running: list[tuple[Job, subprocess.Popen, float]] = []
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    print(f"[{tag}] {len(jobs)} jobs, {len(jobs) - len(todo)} done before, {len(todo)} to run, {parallel} at a time",
          flush=True)
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            log = open(os.path.join(work, "logs", f"{job.name}.log"), "w")
            log.write("$ online-distill " + " ".join(job.argv(work, extra)) + "\n")
            log.flush()
            cmd = [sys.executable, "-m", "online_distill.cli", *job.argv(work, extra)]
            running.append((job, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), time.time()))
        time.sleep(2)
        for item in list(running):
            job, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode == 0:
                row = summary_of(job, work)
                shown = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_") or k.startswith("test_"))
                print(f"[{tag}] done {job.name}: {shown} ({time.time() - t0:.0f} s)", flush=True)
            else:
                why = last_line(os.path.join(work, "logs", f"{job.name}.log"))
                with open(os.path.join(work, "failed.jsonl"), "a") as f:
                    f.write(json.dumps({"job": job.name, "rc": proc.returncode, "why": why}) + "\n")
                print(f"[{tag}] FAILED {job.name} (rc {proc.returncode}): {why}", flush=True)


def run_dir(job: Job, work: str) -> str:
    return os.path.join(work, "runs", job.name)


def finished(job: Job, work: str) -> bool:
    return os.path.exists(os.path.join(run_dir(job, work), "result.json"))


def failed(job: Job, work: str) -> bool:
    path = os.path.join(work, "failed.jsonl")
    return os.path.exists(path) and any(json.loads(line)["job"] == job.name for line in open(path))


def failures(work: str) -> pd.DataFrame:
    path = os.path.join(work, "failed.jsonl")
    return pd.DataFrame([json.loads(line) for line in open(path)] if os.path.exists(path) else [])


def last_line(path: str) -> str:
    lines = [ln.strip() for ln in open(path, errors="replace") if ln.strip()]
    return lines[-1][:400] if lines else ""


def summary_of(job: Job, work: str) -> dict:
    """Mean over the job's peers of the last epoch's numbers (final.csv)."""
    final = pd.read_csv(os.path.join(run_dir(job, work), "final.csv"))
    peers = final[final["member"] != "ensemble"]
    return {k: float(peers[k].mean()) for k in peers.columns if k.startswith(("val_", "test_"))}


def pick(jobs: list[Job], work: str, key: str = "val_acc", mode: str = "max") -> Job | None:
    """The search job with the best mean validation number at the last epoch (a diverged or
    failed setting is never picked)."""
    done = [j for j in jobs if j.stage == "search" and finished(j, work)]
    if not done:
        return None
    sign = 1 if mode == "max" else -1
    return max(done, key=lambda j: sign * summary_of(j, work)[key])


def paired(runs: pd.DataFrame, method: str, baseline: str, column: str) -> pd.DataFrame:
    """Per confirm seed: the method's and the baseline's mean-over-peers number, and the delta."""
    def by_seed(arm):
        r = runs[(runs["arm"] == arm) & (runs["stage"] == "confirm") & (runs["member"] != "ensemble")]
        return r.groupby("seed")[column].mean()

    m, b = by_seed(method), by_seed(baseline)
    seeds = sorted(set(m.index) & set(b.index))
    return pd.DataFrame({"seed": seeds, method: [m[s] for s in seeds], baseline: [b[s] for s in seeds],
                         "delta": [m[s] - b[s] for s in seeds]})


def plot_paired(per_seed: pd.DataFrame, summary: pd.DataFrame, path: str, *, delta: str, xlabel: str, title: str,
                bars: dict | None = None) -> None:
    """Each comparison's paired deltas: a dot per seed, the mean as a bar (green: bar met, red:
    missed, grey: reported), each (claim, method)'s bar lines from `bars` dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def deltas(s):  # a method may meet two baselines: its rows against this one
        return per_seed[(per_seed["claim"] == s.claim) & (per_seed["method"] == s.method)
                        & (per_seed["baseline"] == s.baseline)][delta]

    rows = list(summary[summary["n_pairs"] > 0].itertuples(index=False))
    rows = [s for s in rows if len(deltas(s))]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.2))
    for y, s in enumerate(rows):
        d = deltas(s)
        ax.barh(y, d.mean(), color="C2" if s.met is True else "C3" if s.met is False else "C7", alpha=0.4)
        ax.scatter(d, [y] * len(d), color="k", s=14, zorder=3)
        for x in (bars or {}).get((s.claim, s.method, s.baseline), (bars or {}).get((s.claim, s.method), ())):
            ax.plot([x, x], [y - 0.4, y + 0.4], "k--", lw=1)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{s.claim} {s.method} vs {s.baseline}" for s in rows], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv, *, prog: str, doc: str, tag: str, plan, tables, smoke: dict, smoke_sets: dict, recorded=None) -> int:
    """The command line of a claim's script: `run` (every stage of `plan(work)`, planned again
    before each, since a stage reads the picks of the ones before; a rerun skips finished runs)
    and `tables` (`tables(work)`). `smoke`: the dict of extra --set items a --smoke run fills with
    `smoke_sets`. `recorded`: a function giving the names of the jobs the committed tables hold;
    with it, `run --new-only` runs just the others (a new arm, without the claim's hours again)."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="every stage; a rerun skips finished runs")
    r.add_argument("--work", required=True, help="where the runs and their logs go (not committed)")
    r.add_argument("--parallel", type=int, default=2)
    r.add_argument("--smoke", action="store_true", help="a few steps per run: check the pipeline, not the claims")
    if recorded is not None:
        r.add_argument("--new-only", action="store_true",
                       help="skip the runs the committed runs.csv holds (its picks plan the later stages)")
    t = sub.add_parser("tables", help="runs.csv, per_seed.csv, summary_rows.csv and table.md from the runs")
    t.add_argument("--work", required=True)
    args = ap.parse_args(argv)
    work = os.path.abspath(args.work)
    if args.command == "tables":
        tables(work)
        return 0
    if args.smoke:
        smoke.update(smoke_sets)
    for i in range(len(plan(work))):
        stage = plan(work)[i]
        print(f"[{tag}] stage {i + 1}: {len(stage)} runs", flush=True)
        run_jobs(stage, work, args.parallel, smoke, tag=tag,
                 skip=frozenset(recorded()) if getattr(args, "new_only", False) else frozenset())
    print(f"[{tag}] done; now: python {prog.split()[-1]} tables --work {args.work}", flush=True)
    return 0
