"""ASHA against the same sweep without early stopping, side by side in one run, and what Tune
costs on top of its trials.

    python -m benchmarks.tools.sweep tune_configs/fmnist_dml.yaml --set data.train_subset=4000

Both sweeps run the same trials (same settings, same seeds), one trial at a time, one sweep
after the other on the same Ray; the second differs only in `scheduler.name: none`. Printed per sweep: trials, training
epochs spent, the best objective found (the best trial's best epoch, and the mean of the best
setting over seeds), wall time; then where the wall time went: Tune's own time outside any
trial, each trial's start-up (its first report minus one steady epoch: for a cohort of several
workers, the Train controller, worker group and process groups; for a cohort packed in one
worker, Train's local mode in the trial's own process), and the epochs themselves.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import pandas as pd

from online_distill.config import schema as config_mod
from online_distill.config import files as config_file
from online_distill.sweep.spec import SchedulerSpec


def _trial_times(sweep_dir: str, trial_id: str) -> tuple[float, float, float, int]:
    """(first report s, steady epoch s, total s, reports) of one trial from Tune's result.json."""
    rows = [json.loads(line) for line in open(os.path.join(sweep_dir, trial_id, "result.json"))]
    iters = [r["time_this_iter_s"] for r in rows]
    steady = statistics.median(iters[1:]) if len(iters) > 1 else float("nan")
    return iters[0], steady, sum(iters), len(rows)


def measure(result, spec) -> dict:
    t = result.trials
    first, steady, total, reports = zip(*(_trial_times(result.sweep_dir, tid) for tid in t["trial_id"]))
    epoch_s = statistics.median(s for s in steady if s == s)  # one steady epoch of this sweep
    startup = [f - epoch_s for f in first]
    best_setting = result.summary[(result.summary["role"] == "setting") & (result.summary["n_complete"] > 0)]
    return {
        "trials": len(t), "stopped_early": int(t["stopped_early"].sum()), "epochs_spent": int(t["epochs"].sum()),
        "best_trial_objective": float(t["objective_best"].max()),
        "best_setting_mean": float(best_setting["objective_mean"].iloc[0]) if len(best_setting) else float("nan"),
        "wall_s": result.wall_s, "sum_trial_s": sum(total), "train_startup_s": sum(startup),
        "epochs_s": sum(total) - sum(startup), "median_startup_s": statistics.median(startup), "epoch_s": epoch_s,
    }


def main(argv=None) -> int:
    from online_distill.run.env import use_our_lines_env

    use_our_lines_env()  # before the sweep driver imports Ray: trial lines without Ray's prefix
    from online_distill.sweep.driver import load_sweep, run_sweep

    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    spec = load_sweep(args.config, config_file.parse_sets(args.sets))
    stamp = time.strftime("%H%M%S")
    rows = {}
    for label, sched in (("asha", dataclasses.replace(spec.scheduler, name="asha")),
                         ("no early stopping", SchedulerSpec(name="none"))):
        # one trial at a time, so the wall time splits exactly into trials and Tune's own time
        s = dataclasses.replace(spec, name=f"{spec.name}-bench-{stamp}-{sched.name}", scheduler=sched, max_concurrent=1)
        res = run_sweep(s, verbose=0)
        rows[label] = measure(res, s)
        print(f"{label}: {rows[label]}", flush=True)
    df = pd.DataFrame(rows)
    print(df.to_string(float_format=lambda v: f"{v:.3f}"))
    a, n = rows["asha"], rows["no early stopping"]
    print(f"\nASHA / no early stopping: epochs {a['epochs_spent'] / n['epochs_spent']:.2f}x, wall "
          f"{a['wall_s'] / n['wall_s']:.2f}x, best trial {a['best_trial_objective'] - n['best_trial_objective']:+.4f}, "
          f"best setting mean {a['best_setting_mean'] - n['best_setting_mean']:+.4f}")
    startups = [r["median_startup_s"] for r in rows.values()]
    print(f"\ntrial start-up (first report - one steady epoch), median over both sweeps' trials: "
          f"{statistics.median(startups):.1f} s   bar <= 3 s (scale.peers_per_worker="
          f"{spec.base.scale.peers_per_worker}: {spec.base.world_size} worker(s) per trial)")
    for label, r in rows.items():
        print(f"{label}: Tune outside trials {r['wall_s'] - r['sum_trial_s']:.1f} s "
              f"of {r['wall_s']:.1f} s wall (trials {r['sum_trial_s']:.1f} s = Train start-up "
              f"{r['train_startup_s']:.1f} s + epochs {r['epochs_s']:.1f} s; start-up per trial "
              f"{r['median_startup_s']:.1f} s vs one epoch {r['epoch_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
