"""One teacher for many students, measured side by side (distill.teacher_service).

    python -m benchmarks.tools.service --trials 4 --repeats 3

1. A sweep of N offline-KD trials (the same student and teacher, N temperatures), run twice: with
   the teacher in every trial, and with one teacher service for all of them. Printed: the
   teacher's memory (its weights' bytes, times the copies held, and the resident memory of the
   service's process, read from /proc) and the examples the teacher ran on (forward passes), in each case.
2. A student's step time with the service (prefetching the next batch) over the same student
   with its teacher in its own process, alternating `repeats` times: the ratio's median and range.
The teacher is a wide CNN (370k parameters) trained for an epoch here; the student an MLP.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def base_config(storage: str, teacher_dir: str | None = None, **over):
    from online_distill.config import schema as C

    cfg = C.from_dict({
        "models": ["mlp"], "distill": {"mode": "independent"},
        "data": {"dataset": "fashion_mnist", "val_size": 1000, "train_subset": 8192, "test_subset": 1000},
        "loss": {"temperature": 4.0, "kd_weight": 0.7}, "optim": {"lr": 0.05},
        "train": {"epochs": 2, "batch_size": 128, "log_every_s": 3600}, "scale": {"cpus_per_worker": 1},
        "run": {"name": "x", "storage_path": storage, "max_failures": 0}})
    if teacher_dir:
        cfg = C.with_overrides(cfg, {"distill.mode": "offline", "distill.teacher_checkpoint": teacher_dir})
    return C.with_overrides(cfg, over)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tools.service", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)

    import torch

    from online_distill.config import schema as C
    from online_distill.run import train
    from online_distill.run.env import init_ray
    from online_distill.sweep.driver import run_sweep
    from online_distill.sweep.spec import SchedulerSpec, SweepSpec

    work = tempfile.mkdtemp(prefix="od-service-bench-")
    init_ray()
    teacher = train(base_config(work, models=["wide_cnn"], **{"run.name": "teacher", "train.epochs": 1}), verbose=False)
    t_bytes = sum(p.numel() * p.element_size() for p in
                  torch.load(os.path.join(teacher.run_dir, "checkpoint_epoch_0001", "peer0.pt"), weights_only=True)["model"].values())
    report: dict = {"trials": args.trials, "teacher_state_bytes": t_bytes}
    temps = [1.0 + i for i in range(args.trials)]
    for served in (False, True):
        base = base_config(work, teacher.run_dir, **{"distill.teacher_service": served, "run.in_process": "auto"})
        spec = SweepSpec(name=f"kd-{'served' if served else 'own'}", base=base,
                         points=tuple({"loss.temperature": t} for t in temps[1:]), seeds=(0,),
                         scheduler=SchedulerSpec(name="none"), storage_path=os.path.join(work, "sweeps"))
        res = run_sweep(spec, verbose=0)
        forwards = 0
        for tid in res.trials["trial_id"]:
            rows = [json.loads(line) for line in open(os.path.join(spec.sweep_dir, tid, "result.json"))]
            forwards += sum(r.get("teacher_forwards", 0) for r in rows)
        key = "service" if served else "in_trial"
        if served:
            svc = next(iter(json.load(open(os.path.join(spec.sweep_dir, "service.json"))).values()))
            report[key] = {"teacher_copies": 1, "teacher_bytes": t_bytes, "forwards": int(svc["service/forwards"]),
                           "requests": int(svc["service/requests"]), "forward_passes": int(svc["service/batches"]),
                           "service_rss_bytes": int(svc["service/rss_bytes"])}
        else:
            report[key] = {"teacher_copies": args.trials, "teacher_bytes": t_bytes * args.trials, "forwards": forwards}

    ratios = []
    for r in range(args.repeats):
        times = {}
        for served in (False, True):
            cfg = base_config(work, teacher.run_dir, **{"distill.teacher_service": served,
                                                        "run.name": f"step-{r}-{int(served)}", "train.epochs": 1})
            times[served] = train(cfg, verbose=False).metrics["step_time_s"]
        ratios.append(times[True] / times[False])
    report["step_time_ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                 "per_repeat": ratios}

    own, svc = report["in_trial"], report["service"]
    print(f"{args.trials} KD trials of one teacher (wide_cnn, {t_bytes / 1e6:.2f} MB of weights), side by side:")
    print(f"  {'':30s} {'teacher in each trial':>22s} {'one teacher service':>22s}")
    print(f"  {'teacher copies':30s} {own['teacher_copies']:>22d} {svc['teacher_copies']:>22d}")
    print(f"  {'teacher weights held (MB)':30s} {own['teacher_bytes'] / 1e6:>22.2f} {svc['teacher_bytes'] / 1e6:>22.2f}")
    print(f"  {'examples through the teacher':30s} {own['forwards']:>22d} {svc['forwards']:>22d}")
    print(f"  (the service merged {svc['requests']} requests into {svc['forward_passes']} forward passes; its "
          f"process's resident memory: {svc['service_rss_bytes'] / 1e6:.0f} MB, torch and Ray's worker included)")
    s = report["step_time_ratio"]
    print(f"student step time, service / teacher in the student's process: {s['median']:.3f} "
          f"(range {s['min']:.3f}-{s['max']:.3f}, {args.repeats} alternating repeats; bar <= 1.15)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
