"""The chaos sweep at a larger scale (benchmarks/chaos): on a local 3-node cluster, a sweep run
once without faults, then `--runs` times with trial processes and worker nodes killed at seeded
random times; per chaos run, the faults injected, the retries they cost, the time lost, and
whether every trial's final numbers equal the fault-free sweep's.

    .venv/bin/python -m benchmarks.tools.chaos --runs 3 --out benchmarks/chaos

Writes runs.csv (one row per chaos run) and faults.csv (one row per fault) into --out. The
machinery (the cluster, the faults, the comparison) is the chaos test's, tests/chaos.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from chaos import Chaos, final_numbers, plan_faults, run_sweep, three_nodes, write_sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="chaos runs of the sweep, seeds 0..runs-1")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds of every setting")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=4096)
    p.add_argument("--processes", type=int, default=3, help="trial processes killed per chaos run")
    p.add_argument("--nodes", type=int, default=2, help="worker nodes killed (and replaced) per chaos run")
    p.add_argument("--window-s", type=float, default=40.0, help="faults fall in this many seconds after the first epoch")
    p.add_argument("--down-s", type=float, default=3.0, help="seconds a killed node stays down before it is replaced")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "chaos"))
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="od-chaos-")
    sweep = dict(temperatures=args.temperatures, seeds=args.seeds, epochs=args.epochs, train_subset=args.train_subset)
    runs, faults = [], []
    cluster = three_nodes(os.path.join("/tmp", f"odx-{os.getpid()}"))
    cluster.start()
    try:
        calm = run_sweep(cluster, write_sweep(os.path.join(work, "calm.yaml"), "calm", work, **sweep))
        reference = final_numbers(calm.sweep_dir)
        print(f"fault-free: exit {calm.rc}, {len(reference)} trials, {calm.wall_s:.0f} s", flush=True)
        for seed in range(args.runs):
            chaos = Chaos(cluster, plan_faults(seed, processes=args.processes, nodes=args.nodes, window_s=args.window_s),
                          seed=seed, down_s=args.down_s)
            rough = run_sweep(cluster, write_sweep(os.path.join(work, f"chaos{seed}.yaml"), f"chaos{seed}", work, **sweep),
                              chaos=chaos)
            numbers = final_numbers(rough.sweep_dir)
            row = {"seed": seed, "trials": len(numbers), "exit": rough.rc,
                   "completed": int(numbers["complete"].sum()),
                   "processes_killed": sum(f.kind == "process" for f in rough.injected),
                   "nodes_killed": sum(f.kind == "node" for f in rough.injected),
                   "faults_missed": len(chaos.missed), "retries": rough.retries,
                   "wall_s": round(rough.wall_s, 1), "fault_free_wall_s": round(calm.wall_s, 1),
                   "time_lost_s": round(rough.wall_s - calm.wall_s, 1),
                   "identical": numbers.equals(reference), "errors": "; ".join(chaos.errors)}
            runs.append(row)
            faults += [{"seed": seed, "at_s": round(f.at_s, 1), "kind": f.kind, "target": f.target,
                        "node_down_s": f.down_s if f.kind == "node" else None} for f in rough.injected]
            print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    finally:
        cluster.stop()
        cluster.remove()
    os.makedirs(args.out, exist_ok=True)
    pd.DataFrame(runs).to_csv(os.path.join(args.out, "runs.csv"), index=False)
    pd.DataFrame(faults).to_csv(os.path.join(args.out, "faults.csv"), index=False)
    print(f"wrote {os.path.join(args.out, 'runs.csv')} and faults.csv", flush=True)
    return 0 if runs and all(r["identical"] and r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
