"""The claims of benchmarks/ (E1-E4), measured as a careful paper would: each method's setting
is searched on the validation split, the pick is rerun on fresh seeds, and last-epoch test
accuracy is paired seed by seed with a baseline that had the same learning-rate search.

    python -m benchmarks.tools.claims run --profile cpu --out benchmarks/raw/cpu
    python -m benchmarks.tools.claims cost --profile cpu --out benchmarks/E3_kd/compression.csv
    python -m benchmarks.tools.tables benchmarks --runs benchmarks/raw/cpu/runs.csv

(`--claims E3` runs some claims only; `--profile gpu` is the same on a GPU, with CNNs.)

Every run is a trial of a Ray Tune sweep (sweep.driver.run_sweep): a cohort packed in one
worker trains in the trial's own process, with its slice of the GPU, so one GPU holds many
cohorts at once. Three sweeps, each taking what it needs from the ones before:

1. search (seed 100): E1 DML and independent peers, E4 plain / EMA / snapshot / DLB, E3 the
   student from scratch, and E3's teacher;
2. seeds 0-2: the picks of E1 (with 2 and with 4 peers), of E4 and of E3's student from
   scratch; on seed 100, the search of E3's taught student (teacher: step 1's) and of
   born-again (teacher: step 1's picked plain run);
3. seeds 0-2: E3's taught student, and born-again, whose teacher is step 2's plain run of the
   same seed (its second generation, as distill.mode=born_again trains it).

Distilling arms search the loss form and temperature (LOSSES) and the learning rate; baselines
search the learning rate. Each finished trial appends its last epoch, one row per member, to
runs.csv as it ends, so a run cut short keeps every trial that finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from online_distill.config import schema as config_mod
from online_distill.config.schema import Config, ConfigError

LOSSES = {"hinton": {"loss.kd_weight": 0.5, "loss.ce_weight": None},  # 0.5 CE + 0.5 T^2 KL (Hinton's mix)
          "sum": {"loss.kd_weight": 1.0, "loss.ce_weight": 1.0}}      # CE + T^2 KL (DML, ONE, MCL-OKD)
SEARCH_SEED = 100
QUIET_TUNE = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
"""Tune's progress tables and its warning that one kept checkpoint per trial forces many
experiment snapshots (true, and cheap at this size) would bury the [claims] lines."""
_LOCK = threading.Lock()  # module-level: Tune pickles its callbacks (and a lock does not pickle)


@dataclass(frozen=True)
class Profile:
    """What a machine can afford: the models, the budget, the data and one cohort's resources."""

    peer: str
    """E1/E2 peers and the E4 model."""
    student: str
    teacher: str
    """E3: a small student and the larger teacher it learns from."""
    epochs: int
    data: dict
    scale: dict
    lrs: tuple[float, ...] = (0.05, 0.1)
    losses: tuple[tuple[str, float], ...] = (("hinton", 4.0), ("sum", 1.0), ("sum", 4.0))
    """(form in LOSSES, temperature): Hinton's mix at T 4, the DML paper's CE + KL at T 1, and
    CE + T^2 KL at T 4 (MCL-OKD's form)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 128
    teacher_lr: float = 0.05
    big_cohort: int = 4
    cache_teacher: bool = False
    """distill.cache_teacher for the frozen teachers (E3, born-again): their logits of each
    training example are computed once, which makes a slow teacher affordable on a CPU."""


PROFILES = {
    # one GPU shared by up to 16 one-CPU cohorts: full Fashion-MNIST, 15 epochs
    "gpu": Profile("small_cnn", "tiny_cnn", "resnet18", 15, {"dataset": "fashion_mnist", "val_size": 5000},
                   {"use_gpu": True, "gpus_per_worker": 0.0625, "cpus_per_worker": 1}),
    # the 2-core box (about 35 min): MLPs, which a CPU trains 14x faster than tiny_cnn (2.2 vs
    # 30.9 ms a step; benchmarks/raw/cpu/step_times.txt), and Hinton et al.'s own setting for
    # E3: a 1200-1200 teacher, a smaller MLP student
    "cpu": Profile("mlp", "mlp_small", "mlp_large", 15, {"dataset": "fashion_mnist", "val_size": 5000},
                   {"cpus_per_worker": 1}),
    # the whole pipeline in about a minute on synthetic data (the test suite runs it)
    "smoke": Profile("tiny_cnn", "tiny_cnn", "small_cnn", 1,
                     {"dataset": "synthetic", "val_size": 256, "train_subset": 512, "test_subset": 256},
                     {"cpus_per_worker": 1}, lrs=(0.05,), losses=(("sum", 4.0),), seeds=(0, 1), batch_size=64,
                     big_cohort=3),
}


@dataclass(frozen=True)
class Arm:
    """One method of one claim: its run-config overrides, and whether it distils (then its loss
    is searched too) or is a baseline (only its learning rate is)."""

    claim: str
    name: str
    models: tuple[str, ...]
    mode: str
    distils: bool
    extra: dict = field(default_factory=dict)


def arms(p: Profile) -> dict[str, Arm]:
    two, many = (p.peer,) * 2, (p.peer,) * p.big_cohort
    snap = {"optim.schedule": "cyclic", "optim.cycles": 3}
    ema = {"distill.ema_decay": 0.999, "distill.ema_warmup_steps": 200}
    out = [Arm("E1", "dml2", two, "dml", True), Arm("E1", "independent2", two, "independent", False),
           Arm("E1", f"dml{p.big_cohort}", many, "dml", True),
           Arm("E1", f"independent{p.big_cohort}", many, "independent", False),
           Arm("E3", "teacher", (p.teacher,), "independent", False),
           Arm("E3", "scratch_student", (p.student,), "independent", False),
           Arm("E3", "kd_student", (p.student,), "offline", True),
           Arm("E4", "plain", (p.peer,), "independent", False), Arm("E4", "ema", (p.peer,), "ema", True, ema),
           Arm("E4", "snapshot", (p.peer,), "snapshot", True, snap), Arm("E4", "dlb", (p.peer,), "dlb", True),
           Arm("E4", "born_again", (p.peer,), "offline", True)]
    return {a.name: a for a in out}


@dataclass(frozen=True)
class Entry:
    """One trial: what it is (stage, arm, seed, knobs) and the run-config overrides it runs."""

    stage: str
    arm: Arm
    seed: int
    lr: float
    form: str = ""
    temperature: float | None = None
    teacher: str | None = None

    def label(self) -> dict:
        return {"stage": self.stage, "claim": self.arm.claim, "arm": self.arm.name, "seed": self.seed,
                "models": ",".join(self.arm.models), "mode": self.arm.mode, "lr": self.lr, "form": self.form,
                "temperature": self.temperature, "teacher": self.teacher or ""}

    def overrides(self, p: Profile) -> dict[str, Any]:
        loss = LOSSES[self.form] if self.form else LOSSES["hinton"]
        teacher = {}
        if self.arm.mode == "offline":
            teacher_model = p.teacher if self.arm.name == "kd_student" else p.peer
            teacher = {"distill.teacher_checkpoint": self.teacher, "distill.teacher_model": teacher_model,
                       "distill.cache_teacher": p.cache_teacher}
        return {"models": ",".join(self.arm.models), "distill.mode": self.arm.mode,
                "scale.peers_per_worker": len(self.arm.models), "optim.lr": self.lr,
                "optim.schedule": "cosine", "optim.cycles": 1, "loss.temperature": self.temperature or 4.0,
                "distill.ema_decay": 0.999, "distill.ema_warmup_steps": 0,
                "distill.teacher_checkpoint": None, "distill.teacher_model": None, "distill.cache_teacher": False,
                **loss, **self.arm.extra, **teacher, "train.seed": self.seed}


def base_config(p: Profile, data_root: str | None) -> Config:
    data = dict(p.data, **({"root": data_root, "download": False} if data_root else {}))
    return config_mod.from_dict({
        "models": [p.peer], "data": data, "distill": {"mode": "independent"},
        "optim": {"name": "sgd", "lr": p.lrs[0], "schedule": "cosine", "warmup_epochs": 0.2},
        "train": {"epochs": p.epochs, "batch_size": p.batch_size, "log_every_s": 3600},
        "scale": dict(p.scale), "run": {"name": "claims", "checkpoints_to_keep": 1, "max_failures": 1}})


# ---- the stages --------------------------------------------------------------------------------

def search_entries(stage: str, arm: Arm, p: Profile, teacher: str | None = None) -> list[Entry]:
    if not arm.distils:
        return [Entry(stage, arm, SEARCH_SEED, lr) for lr in p.lrs]
    return [Entry(stage, arm, SEARCH_SEED, lr, form, t, teacher) for form, t in p.losses for lr in p.lrs]


def confirm_entries(stage: str, arm: Arm, pick: dict, p: Profile, teachers: dict[int, str] | None = None) -> list[Entry]:
    return [Entry(stage, arm, s, pick["lr"], pick.get("form", ""), pick.get("temperature"),
                  (teachers or {}).get(s)) for s in p.seeds]


def pick(runs: pd.DataFrame, arm: str) -> dict:
    """The arm's best search setting by last-epoch validation accuracy (mean over its peers)."""
    rows = runs[(runs["stage"] == "search") & (runs["arm"] == arm) & (runs["member"] != "ensemble")]
    if rows.empty:
        raise RuntimeError(f"no finished search trial of {arm!r}: see the log for the errors")
    score = rows.groupby(["lr", "form", "temperature"], dropna=False)["val_acc"].mean()
    lr, form, t = score.idxmax()
    out = {"lr": float(lr), "form": form if isinstance(form, str) else "", "val_acc": float(score.max())}
    if out["form"]:
        out["temperature"] = float(t)
    return out


def checkpoint_of(runs: pd.DataFrame, arm: str, stage: str, seed: int, lr: float | None = None) -> str:
    rows = runs[(runs["arm"] == arm) & (runs["stage"] == stage) & (runs["seed"] == seed)]
    if lr is not None:
        rows = rows[rows["lr"] == lr]
    if rows.empty:
        raise RuntimeError(f"no finished {arm!r} run of stage {stage!r} on seed {seed} to teach from")
    return str(rows["checkpoint"].iloc[0])


def run(p: Profile, out: str, work: str, data_root: str | None = None,
        claims: tuple[str, ...] = ("E1", "E2", "E3", "E4")) -> pd.DataFrame:
    """The three stages, for `claims`; returns every finished trial's rows (also in out/runs.csv)."""
    from online_distill.run.launch import init_ray

    earlier = sorted(d for d in (os.listdir(work) if os.path.isdir(work) else []) if d.startswith("claims-"))
    if earlier:  # Tune would resume them, and trials finished before would never reach runs.csv
        raise ConfigError(f"--work: {work} holds the sweeps of an earlier run ({', '.join(earlier)}); "
                          f"allowed: a folder without claims-* sweeps (a new one, or delete those)")
    os.makedirs(out, exist_ok=True)
    for key, value in QUIET_TUNE.items():
        os.environ.setdefault(key, value)
    init_ray(workers_print=False)  # dozens of cohorts at once: only our [claims] lines here
    a = arms(p)
    base = base_config(p, data_root)
    writer = RowWriter(os.path.join(out, "runs.csv"))
    picks: dict[str, dict] = {}

    def wanted(*names: str) -> list[str]:  # E2 is read off E1's cohorts
        return [n for n in names if a[n].claim in claims or (a[n].claim == "E1" and "E2" in claims)]

    # the teacher first: the longest trial of the stage starts with it
    first = wanted("teacher", "dml2", "independent2", "plain", "ema", "snapshot", "dlb", "scratch_student")
    s1 = [e for n in first for e in ([Entry("search", a[n], SEARCH_SEED, p.teacher_lr)] if n == "teacher"
                                     else search_entries("search", a[n], p))]
    runs = run_stage("search", s1, p, base, work, writer)
    for n in first:
        if n != "teacher":
            picks[n] = pick(runs, n)
    if "dml2" in picks:
        picks[f"dml{p.big_cohort}"], picks[f"independent{p.big_cohort}"] = picks["dml2"], picks["independent2"]
    teacher = checkpoint_of(runs, "teacher", "search", SEARCH_SEED) if "E3" in claims else None
    plain_teacher = checkpoint_of(runs, "plain", "search", SEARCH_SEED, picks["plain"]["lr"]) if "E4" in claims else None

    second = wanted("dml2", "independent2", f"dml{p.big_cohort}", f"independent{p.big_cohort}", "plain", "ema",
                    "snapshot", "dlb", "scratch_student")
    s2 = [e for n in second for e in confirm_entries("confirm", a[n], picks[n], p)]
    s2 += search_entries("search", a["kd_student"], p, teacher) if teacher else []
    s2 += search_entries("search", a["born_again"], p, plain_teacher) if plain_teacher else []
    runs = pd.concat([runs, run_stage("confirm", s2, p, base, work, writer)], ignore_index=True)

    s3 = []
    if teacher:
        picks["kd_student"] = pick(runs, "kd_student")
        s3 += confirm_entries("confirm", a["kd_student"], picks["kd_student"], p, {s: teacher for s in p.seeds})
    if plain_teacher:
        picks["born_again"] = pick(runs, "born_again")
        plain_by_seed = {s: checkpoint_of(runs, "plain", "confirm", s) for s in p.seeds}
        s3 += confirm_entries("confirm", a["born_again"], picks["born_again"], p, plain_by_seed)
    if s3:
        runs = pd.concat([runs, run_stage("confirm-last", s3, p, base, work, writer)], ignore_index=True)

    write_picks(os.path.join(out, "picks.yaml"), picks, a, p, base)
    return runs


def write_picks(path: str, picks: dict, a: dict[str, Arm], p: Profile, base: Config) -> None:
    """Each arm's pick and the ready-to-run config it stands for (teacher paths as they were)."""
    doc = {}
    for name, chosen in picks.items():
        e = Entry("confirm", a[name], p.seeds[0], chosen["lr"], chosen.get("form", ""), chosen.get("temperature"),
                  "TEACHER_RUN_DIR" if a[name].mode == "offline" else None)
        cfg = config_mod.with_overrides(base, e.overrides(p))
        doc[name] = {"claim": a[name].claim, "pick": dict(chosen), "config": config_mod.to_dict(cfg)}
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


# ---- one stage: one Tune sweep -------------------------------------------------------------------

def run_stage(stage: str, entries: list[Entry], p: Profile, base: Config, work: str, writer: "RowWriter") -> pd.DataFrame:
    from online_distill.sweep.driver import run_sweep
    from online_distill.sweep.spec import SchedulerSpec, SweepSpec

    # an arm that is another arm's twin (on the cpu profile the E4 model is E3's student) runs once
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for e in entries:
        point = e.overrides(p)
        groups.setdefault(_key(point), (point, []))[1].append(e.label())
    points = [point for point, _ in groups.values()]
    first = {k: v for k, v in points[0].items() if k != "train.seed"}
    spec = SweepSpec(name=f"claims-{stage}", base=config_mod.with_overrides(base, first), points=tuple(points[1:]),
                     seeds=(points[0]["train.seed"],), objective="mean", scheduler=SchedulerSpec(name="none"),
                     storage_path=work, checkpoints_to_keep=1)
    # the trials are the base on points[0]'s seed, then each point (each pins its seed), in order
    labels = {_key(t): group[1] for t, group in zip(spec.trials(), groups.values())}
    print(f"[claims] {stage}: {len(entries)} trials", flush=True)
    before = len(writer.rows)
    run_sweep(spec, callbacks=[writer.callback(labels)], verbose=0)
    rows = pd.DataFrame(writer.rows[before:])
    done = rows.drop_duplicates(["arm", "seed", "lr", "form", "temperature"]).shape[0] if len(rows) else 0
    print(f"[claims] {stage}: {done}/{len(entries)} trials finished", flush=True)
    return rows


def _key(params: dict) -> str:
    return json.dumps({k: params[k] for k in sorted(params) if k != "baseline"}, sort_keys=True, default=str)


class RowWriter:
    """Appends each finished trial's last epoch (one row per member) to a CSV as the trial ends."""

    def __init__(self, path: str):
        self.path, self.rows = path, []

    def add(self, label: dict, history: list[dict], checkpoint: str, time_s: float) -> None:
        last = max(r["epoch"] for r in history)
        new = [{**label, "member": r["member"], "model": r.get("model"), "epochs": last,
                "val_acc": r.get("val_acc"), "test_acc": r.get("test_acc"), "time_s": round(time_s, 1),
                "checkpoint": checkpoint} for r in history if r["epoch"] == last]
        with _LOCK:
            self.rows.extend(new)
            pd.DataFrame(self.rows).to_csv(self.path, index=False)

    def callback(self, labels: dict[str, dict]):
        from ray.tune import Callback

        class Record(Callback):
            """Tune's callbacks run on the driver: the rows land in this process's writer."""

            def on_trial_complete(self, iteration, trials, trial, **info):
                _record(writer, labels, trial)

            def on_trial_error(self, iteration, trials, trial, **info):
                group = labels.get(_key(dict(trial.config))) or [{}]
                print(f"[claims] FAILED {group[0].get('arm')} seed {group[0].get('seed')}: {trial.error_file}", flush=True)

        writer = self
        return Record()


def _record(writer: RowWriter, labels: dict[str, dict], trial) -> None:
    from online_distill.sweep.results import _history

    group = labels.get(_key(dict(trial.config)))
    history = _history(trial)
    if not group or not history:
        print(f"[claims] trial {trial.trial_id}: no label or history; left out", flush=True)
        return
    time_s = (trial.last_result or {}).get("time_total_s", float("nan"))
    for label in group:
        writer.add(label, history, trial.checkpoint.path, time_s)
    label = group[0]
    last = max(h["epoch"] for h in history)
    acc = [r["test_acc"] for r in history if r["epoch"] == last and r["member"] != "ensemble"]
    print(f"[claims] done {label['arm']} seed {label['seed']} lr {label['lr']} {label['form']} "
          f"T {label['temperature']}: test acc {sum(acc) / len(acc):.4f} ({time_s:.0f} s)", flush=True)


# ---- what the student saves -----------------------------------------------------------------------

def cost(p: Profile, path: str) -> pd.DataFrame:
    """Size and CPU speed of E3's student and teacher and of the peers' model, measured side by
    side on this machine (1 thread; weights do not change either, so fresh models will do)."""
    import torch

    from online_distill.models.builders import build_model
    from online_distill.run.compression import cpu_latency, size_bytes

    torch.manual_seed(0)
    sample = torch.randn(8, 1, 28, 28)  # Fashion-MNIST's shape; the speed does not depend on the values
    roles = {"E3 student": p.student, "E3 teacher": p.teacher, "E1/E4 model": p.peer}
    models = [build_model(name, sample, 10) for name in roles.values()]
    speed = cpu_latency(models, sample)
    df = pd.DataFrame([{"role": role, "model": name, "params": sum(t.numel() for t in m.parameters()),
                        "size_kb": round(size_bytes(m) / 1024, 1), **{k: round(v, 4) for k, v in s.items()}}
                       for (role, name), m, s in zip(roles.items(), models, speed)])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    df.to_csv(path, index=False)
    return df


# ---- the command line ----------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tools.claims", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="search, then confirm on fresh seeds: writes OUT/runs.csv and OUT/picks.yaml")
    r.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    r.add_argument("--out", required=True)
    r.add_argument("--work", default=None, help="where the sweeps keep trials and checkpoints (default OUT/work)")
    r.add_argument("--data-root", default=None, help="folder holding the dataset's files (no download)")
    r.add_argument("--epochs", type=int, default=None, help="instead of the profile's epochs")
    r.add_argument("--lrs", default=None, help="learning rates searched, e.g. 0.05,0.1")
    r.add_argument("--losses", default=None, help="loss settings searched, FORM:T,..., e.g. hinton:4,sum:1")
    r.add_argument("--teacher", default=None, help="E3's teacher model instead of the profile's")
    r.add_argument("--cache-teacher", action="store_true", help="frozen teachers' logits computed once per example")
    r.add_argument("--claims", default="E1,E2,E3,E4", help="which claims to run, e.g. E3")
    c = sub.add_parser("cost", help="size and 1-thread CPU latency of the profile's models -> a CSV")
    c.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    c.add_argument("--out", required=True, help="the CSV to write, e.g. benchmarks/E3_kd/compression.csv")
    c.add_argument("--teacher", default=None, help="E3's teacher model instead of the profile's")
    args = ap.parse_args(argv)
    p = PROFILES[args.profile]
    if args.teacher:
        p = dataclasses.replace(p, teacher=args.teacher)
    if args.command == "cost":
        print(cost(p, args.out).to_string(index=False))
        return 0
    if args.epochs:
        p = dataclasses.replace(p, epochs=args.epochs)
    if args.lrs:
        p = dataclasses.replace(p, lrs=tuple(float(v) for v in args.lrs.split(",")))
    if args.losses:
        losses = tuple((f, float(t)) for f, t in (item.split(":") for item in args.losses.split(",")))
        bad = [f for f, _ in losses if f not in LOSSES]
        if bad:
            ap.error(f"--losses: got form {bad[0]!r}; allowed: {', '.join(LOSSES)}")
        p = dataclasses.replace(p, losses=losses)
    if args.cache_teacher:
        p = dataclasses.replace(p, cache_teacher=True)
    chosen = tuple(name.strip() for name in args.claims.split(","))
    if not set(chosen) <= {"E1", "E2", "E3", "E4"}:
        ap.error(f"--claims: got {args.claims!r}; allowed: a comma-separated subset of E1,E2,E3,E4")
    work = os.path.abspath(args.work or os.path.join(args.out, "work"))
    try:
        runs = run(p, os.path.abspath(args.out), work, args.data_root and os.path.abspath(args.data_root), chosen)
    except ConfigError as e:
        print(f"bench.claims: {e}", file=sys.stderr)
        return 2
    print(f"[claims] {len(runs)} rows -> {os.path.join(args.out, 'runs.csv')}", flush=True)
    return 0


if __name__ == "__main__":
    # run from the importable module, not __main__: Tune pickles the callbacks, and classes of
    # __main__ would travel by value with this module's globals
    from benchmarks.tools import claims

    sys.exit(claims.main())
