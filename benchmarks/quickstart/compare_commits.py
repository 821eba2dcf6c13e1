"""The quick start's main job at several commits, side by side on one machine.

    .venv/bin/python benchmarks/quickstart/compare_commits.py --repeats 3 \
        --commit 1df3cb7=before-packing --commit 4cb202b=packing --commit HEAD=this \
        --out benchmarks/quickstart/compare_cpu.csv
    .venv/bin/python benchmarks/quickstart/compare_commits.py --repeats 3 --commit HEAD=packed \
        --commit HEAD=spread --set spread=scale.peers_per_worker=1 --set spread=scale.cpus_per_worker=1 \
        --out benchmarks/quickstart/layouts_cpu.csv

Each commit is checked out in a temporary git worktree and its own `configs/fmnist_dml.yaml`
runs as the quick start runs it (`online-distill train configs/fmnist_dml.yaml`, its package
first on PYTHONPATH, this checkout's .venv), into a fresh run directory; the commits alternate
within each repeat, so a machine that drifts slows them alike. `--set LABEL=KEY=VALUE` adds a
`--set KEY=VALUE` to that label's command (one commit, two layouts). Wall time is the whole command,
Python's start-up to its exit; accuracies come from the run's own final.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commit", action="append", metavar="REV=LABEL")
    p.add_argument("--summary-of", metavar="CSV", help="only print the summary of an earlier run's CSV")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="LABEL=KEY=VALUE")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="the CSV to write (required unless --summary-of)")
    a = p.parse_args(argv)
    if a.summary_of:
        with open(a.summary_of) as f:
            summarize(list(csv.DictReader(f)))
        return 0
    if not a.commit or not a.out:
        p.error("--commit REV=LABEL (at least one) and --out are required")
    work = tempfile.mkdtemp(prefix="od-qs-")
    trees = {}
    for item in a.commit:
        rev, _, label = item.partition("=")
        sha = subprocess.check_output(["git", "-C", REPO, "rev-parse", "--short", rev], text=True).strip()
        tree = os.path.join(work, label)  # a worktree per label, even for one commit twice
        subprocess.check_call(["git", "-C", REPO, "worktree", "add", "--detach", "-q", tree, sha])
        trees[label] = (sha, tree)
    rows = []
    try:
        for r in range(a.repeats):
            for label, (sha, tree) in trees.items():
                name = f"{label}-{r}"
                storage = os.path.join(work, "runs")
                cmd = [os.path.join(REPO, ".venv", "bin", "python"), "-m", "online_distill.cli", "train",
                       "configs/fmnist_dml.yaml", "--set", f"run.name={name}", "--set", f"run.storage_path={storage}"]
                for item in a.sets:
                    who, _, kv = item.partition("=")
                    if who == label:
                        cmd += ["--set", kv]
                env = {**os.environ, "PYTHONPATH": tree}
                t0 = time.perf_counter()
                out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if out.returncode != 0:
                    print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{label} ({sha}) failed with rc {out.returncode}")
                with open(os.path.join(storage, name, "final.csv")) as f:
                    final = {row["member"]: row for row in csv.DictReader(f)}
                extra = " ".join(kv.partition("=")[2] for kv in a.sets if kv.partition("=")[0] == label)
                row = {"repeat": r + 1, "label": label, "commit": sha, "sets": extra, "wall_s": round(wall, 2),
                       **{f"{m}_test_acc": final[m]["test_acc"] for m in ("peer0", "peer1", "ensemble")}}
                rows.append(row)
                print(f"  repeat {r + 1}/{a.repeats}  {label:<16} {sha}  {wall:7.1f} s  test acc "
                      f"{row['peer0_test_acc']} / {row['peer1_test_acc']}, ensemble {row['ensemble_test_acc']}",
                      flush=True)
    finally:
        for _, tree in trees.values():
            subprocess.call(["git", "-C", REPO, "worktree", "remove", "--force", tree])
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summarize(rows)
    return 0


def summarize(rows: list[dict]) -> None:
    """Median wall time per label, and each label's speed against the first, paired by repeat."""
    import statistics

    labels = list(dict.fromkeys(r["label"] for r in rows))
    wall = {lab: [float(r["wall_s"]) for r in rows if r["label"] == lab] for lab in labels}
    print("\nmedian wall time: " + ", ".join(f"{lab} {statistics.median(wall[lab]):.1f} s" for lab in labels))
    first = labels[0]
    for lab in labels[1:]:
        speed = [x / y for x, y in zip(wall[first], wall[lab])]  # > 1: lab is faster than the first
        print(f"  {lab} is {statistics.median(speed):.2f}x as fast as {first} (per repeat {min(speed):.2f} .. "
              f"{max(speed):.2f})")


if __name__ == "__main__":
    raise SystemExit(main())
