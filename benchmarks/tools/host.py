"""What the two host settings of online_distill.core.host buy a CPU training step, side by side.

    python -m benchmarks.tools.host --model small_cnn --repeats 5

One training step (forward, CE, backward, SGD with momentum) of one model on a batch of 28 x 28
images, on one thread, in four settings: PyTorch's default layout or channels-last
(scale.channels_last), and glibc's malloc as it comes or keeping freed memory
(host.keep_freed_memory). An allocator setting holds for a whole process, so each measurement
runs in a fresh process; the four alternate within a repeat, and each ratio is the median over
repeats of the ratio within one (a shared machine drifts between repeats, by 20% and more here).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

SETTINGS = [("default layout, glibc as is", False, False), ("channels-last", True, False),
            ("freed memory kept", False, True), ("both (what a run does)", True, True)]


def _step_time(model: str, batch_size: int, steps: int, channels_last: bool, keep: bool, out) -> None:
    if keep:
        from online_distill.core.host import keep_freed_memory

        keep_freed_memory()  # first, before torch allocates anything
    import torch
    import torch.nn.functional as F

    from online_distill.core.host import memory_format, to_format
    from online_distill.models.builders import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (batch_size,))
    fmt = memory_format(x, channels_last)
    net = build_model(model, x[:2], 10, memory_format=fmt)
    x = to_format(x, fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    out.put(statistics.median(times))


def measure(model: str = "small_cnn", batch_size: int = 128, steps: int = 20, repeats: int = 5) -> dict:
    ctx = mp.get_context("spawn")
    times: dict[str, list[float]] = {label: [] for label, *_ in SETTINGS}
    for r in range(repeats):
        for label, channels_last, keep in SETTINGS:
            q = ctx.Queue()
            p = ctx.Process(target=_step_time, args=(model, batch_size, steps, channels_last, keep, q))
            p.start()
            times[label].append(q.get())
            p.join()
        print(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{label} {v[-1] * 1e3:.1f} ms" for label, v in times.items()),
              flush=True)
    base = SETTINGS[0][0]
    out = {}
    for label, v in times.items():
        ratios = [b / t for b, t in zip(times[base], v)]
        out[label] = {"ms": 1e3 * statistics.median(v), "speedup": statistics.median(ratios),
                      "min": min(ratios), "max": max(ratios)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.host", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    res = measure(a.model, a.batch_size, a.steps, a.repeats)
    print(f"\n{a.model}, batch {a.batch_size}, one CPU thread, {a.repeats} repeats: step time and speed-up over "
          f"the first (median of per-repeat ratios, range)")
    for label, r in res.items():
        print(f"  {label:<30} {r['ms']:7.1f} ms   {r['speedup']:.2f}x   ({r['min']:.2f} .. {r['max']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
