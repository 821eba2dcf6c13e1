"""Two small_cnn peers as two threads of one process (what a packed CPU worker does) against two
processes (what a spread cohort does), in plain PyTorch without the framework.

    .venv/bin/python benchmarks/packing/threads_vs_processes.py --repeats 6 > benchmarks/packing/threads_vs_processes.txt

Each peer: one intra-op thread, channels-last, freed memory kept (online_distill.core.host), batch
128, forward + CE + backward + SGD step. Variants, alternating within each repeat, each in a
fresh process:
  processes       two processes side by side, each training its peer (no synchronisation)
  threads         two threads, one barrier per step (each thread runs its peer's whole step)
  threads, 2 barriers   the loop's way: every peer's forward, a barrier, every peer's update
  threads, 1 arena      `threads` with glibc's malloc on one arena (M_ARENA_MAX=1)
Printed: ms per step of the cohort (both peers) and the page faults per step of the process.
"""
from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

VARIANTS = ["processes", "threads", "threads, 2 barriers", "threads, 1 arena"]
STEPS = 40


def _peer_steps(variant: str, out) -> None:
    from online_distill.core.host import keep_freed_memory

    keep_freed_memory()
    if variant == "threads, 1 arena":
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import torch.nn.functional as F

    from online_distill.models.builders import small_cnn

    torch.set_num_threads(1)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))

    def make():
        m = small_cnn((1, 28, 28), 10).to(memory_format=torch.channels_last)
        return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)

    def forward(peer):
        return peer[0](x)

    def learn(peer, z):
        loss = F.cross_entropy(z, y)
        peer[1].zero_grad(set_to_none=True)
        loss.backward()
        peer[1].step()

    peers = [make()] if variant == "processes" else [make(), make()]
    pool = ThreadPoolExecutor(len(peers))
    if variant == "threads, 2 barriers":
        def step():
            zs = list(pool.map(forward, peers))
            list(pool.map(learn, peers, zs))
    else:
        def step():
            list(pool.map(lambda p: learn(p, forward(p)), peers))
    for _ in range(5):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(STEPS):
        step()
    out.put(((time.perf_counter() - t0) / STEPS, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / STEPS))


def measure(variant: str) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    n = 2 if variant == "processes" else 1
    procs = [ctx.Process(target=_peer_steps, args=(variant, q)) for _ in range(n)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return max(r[0] for r in res), max(r[1] for r in res)  # a cohort goes at its slowest peer's pace


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated, the first is the reference")
    a = p.parse_args(argv)
    variants = a.variants.split(";")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; allowed: {VARIANTS}")
    times: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(a.repeats):
        for v in variants:
            t, f = measure(v)
            times[v].append(t)
            faults[v].append(f)
            print(f"  repeat {r + 1}/{a.repeats}  {v:<20} {t * 1e3:6.1f} ms/step  {f:6.0f} page faults/step", flush=True)
    print(f"\n2 x small_cnn, batch 128, one thread per peer, {os.cpu_count()} CPUs, {a.repeats} repeats (medians):")
    base = times[variants[0]]
    for v in variants:
        ratios = [b / t for b, t in zip(base, times[v])]
        print(f"  {v:<20} {statistics.median(times[v]) * 1e3:6.1f} ms/step   throughput vs {variants[0]} "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f} .. {max(ratios):.2f})   "
              f"{statistics.median(faults[v]):.0f} page faults/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
