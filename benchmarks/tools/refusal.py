"""How long the CLI takes to refuse a bad config: `python -m benchmarks.tools.refusal [-n 10]`.

Runs `python -m online_distill.cli train FILE --set loss.temperature=-1` (a field error) as a fresh
subprocess N times and prints the median wall time; every run must exit 2 with one stderr line.
The bar is 2 s on a 2-core machine: a field error is refused before torch and Ray are imported.

Standard library only, so it can also time another checkout of the package, e.g.
`PYTHONPATH=/path/to/old/tree python online_distill/bench_refusal.py`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "field": ("models: [small_cnn, small_cnn]\ntrain: {epochs: 1}\n", ["--set", "loss.temperature=-1"]),
    "yaml": ("loss: {temperature: 2\ntrain: {epochs: 1}\n", []),
    "duplicate": ("loss: {temperature: 2}\nloss: {kd_weight: 0.3}\n", []),
}


def time_refusal(text: str, sets: list[str], n: int) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bad.yaml")
        with open(path, "w") as f:
            f.write(text)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "online_distill.cli", "train", path, *sets],
                                 capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if out.returncode != 2 or len(out.stderr.splitlines()) != 1 or "Traceback" in out.stderr:
                sys.exit(f"not a one-line refusal (exit {out.returncode}):\n{out.stderr}")
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.refusal", description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=10, help="refusals timed per case")
    p.add_argument("--cases", default="field", help=f"comma-separated, of: {', '.join(CASES)}")
    args = p.parse_args(argv)
    for case in args.cases.split(","):
        times = time_refusal(*CASES[case], max(1, args.n))
        print(f"{case}: {len(times)} runs, min {min(times):.2f} s, max {max(times):.2f} s", flush=True)
        print(f"median refusal time: {statistics.median(times):.2f} s (bar < 2 s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
