"""The per-repeat step times of an `online-distill bench` output as a CSV (repeat, measurement, step_ms).

    python3 benchmarks/packing/repeats_to_csv.py benchmarks/packing/bench7_cpu_overlap.txt > benchmarks/packing/bench7_cpu_overlap.csv
"""
import re
import sys

LINE = re.compile(r"^\s+repeat (\d+)/\d+\s+(.+?)\s+([\d.]+) ms/step$")

print("repeat,measurement,step_ms")
for line in open(sys.argv[1]):
    m = LINE.match(line.rstrip("\n"))
    if m:
        print(f"{m.group(1)},{m.group(2)},{m.group(3)}")
