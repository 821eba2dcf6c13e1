"""Does channels-last change what the quick start learns? The quick start's cohort on several
seeds with scale.channels_last on and off, paired seed by seed (the same cohort, the same
batches; only the convolutions' float rounding differs).

    .venv/bin/python benchmarks/quickstart/layout_seeds.py --seeds 0 1 2 --out benchmarks/quickstart/layout_seeds.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    storage = tempfile.mkdtemp(prefix="od-layout-")
    rows = []
    for seed in a.seeds:
        for cl in (True, False):
            name = f"seed{seed}-{'cl' if cl else 'nchw'}"
            subprocess.run([os.path.join(REPO, ".venv", "bin", "online-distill"), "train", "configs/fmnist_dml.yaml",
                            "--set", f"train.seed={seed}", "--set", f"scale.channels_last={str(cl).lower()}",
                            "--set", f"run.name={name}", "--set", f"run.storage_path={storage}"],
                           cwd=REPO, check=True, capture_output=True)
            with open(os.path.join(storage, name, "final.csv")) as f:
                final = {r["member"]: float(r["test_acc"]) for r in csv.DictReader(f)}
            rows.append({"seed": seed, "channels_last": cl, **{f"{m}_test_acc": final[m] for m in final}})
            print(f"  seed {seed}  channels_last {str(cl):5}  test acc peer0 {final['peer0']:.4f}  peer1 "
                  f"{final['peer1']:.4f}  ensemble {final['ensemble']:.4f}", flush=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for m in ("peer0", "peer1", "ensemble"):
        d = [100 * (x[f"{m}_test_acc"] - y[f"{m}_test_acc"]) for x, y in zip(rows[::2], rows[1::2])]
        sd = statistics.stdev(d) if len(d) > 1 else float("nan")
        print(f"{m}: channels-last - default layout = {statistics.mean(d):+.2f} +- {sd:.2f} pt over {len(d)} seeds "
              f"({', '.join(f'{v:+.2f}' for v in d)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
