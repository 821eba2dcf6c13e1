"""What distillation bought: size, speed and accuracy of each student and of its teacher.

Written at the end of every run as `compression.csv`, next to `final.csv`. A teacher appears
when the run's teacher source holds a model (EMA, snapshot, born-again and offline teachers
keep `model` and `model_name` in their checkpoint state); peers of a cohort are students.

- params: number of parameters.
- size_kb: bytes of the fp32 state dict as torch.save writes it (what a checkpoint costs).
- latency_ms: median wall time of one forward pass on one sample, on 1 CPU thread.
- us_per_sample_b256: median time of a batch of 256 divided by 256, on 1 CPU thread.
  Both are measured once per architecture (peers of one architecture differ in weights only,
  which dense arithmetic does not wait on), in the run's memory layout (scale.channels_last).
- test_acc: accuracy on the run's test split: the run's own last-epoch figure for a peer,
  evaluated here on the driver for a teacher.
"""
from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch
from torch import nn

from ..config.schema import Config
from ..core.host import to_format
from ..rundir.layout import COMPRESSION, TEACHER, RunDir
from ..teachers import copy_members


def size_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


@torch.no_grad()
def seconds_per_call(fn: Callable[[], object], *, min_calls: int = 10, max_calls: int = 100,
                     budget_s: float = 0.1) -> float:
    """Median wall time of fn() after two warm-up calls, over at least min_calls calls."""
    fn(), fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _OneThread:
    """Measure on one CPU thread: comparable across machines that differ in cores."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


@torch.no_grad()
def cpu_latency(models: list[nn.Module], sample: torch.Tensor, rounds: int = 3,
                fmt: torch.memory_format = torch.contiguous_format) -> list[dict[str, float]]:
    """Per-sample CPU time of each model at batch 1 and batch 256, on one thread, on real
    examples (`sample`: a batch of the dataset, repeated to 256 rows; token ids stay ids), in
    memory layout `fmt` (host.memory_format). The models are measured side by side in
    alternating rounds and each keeps its fastest round: on a shared machine, other processes
    only ever add time."""
    sample = sample.cpu()
    one, many = to_format(sample[:1], fmt), to_format(sample[torch.arange(256) % len(sample)], fmt)
    models = [m.cpu().eval() for m in models]
    best = [{"latency_ms": float("inf"), "us_per_sample_b256": float("inf")} for _ in models]
    with _OneThread():
        for _ in range(rounds):
            for m, b in zip(models, best):
                b["latency_ms"] = min(b["latency_ms"], seconds_per_call(lambda: m(one)) * 1e3)
                b256 = seconds_per_call(lambda: m(many), min_calls=3, max_calls=10, budget_s=0.15)
                b["us_per_sample_b256"] = min(b["us_per_sample_b256"], b256 / 256 * 1e6)
    return best


@torch.no_grad()
@torch.no_grad()
def accuracy(model: nn.Module, batches) -> float:
    """Share of examples (or of real tokens, for sequences) whose label is the model's argmax."""
    model = model.cpu().eval()
    correct = n = 0
    for x, y in batches:
        mask = y != -100
        correct += ((model(x).argmax(-1) == y) & mask).sum().item()
        n += int(mask.sum())
    return correct / n if n else float("nan")


def compression_table(cfg: Config, checkpoint_dir: str, *, run: RunDir | None = None, data=None, models=None,
                      datasets=None, test_acc: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per student (each peer) and per teacher that holds a model, from a checkpoint
    (a frozen teacher from the run's own copy). `data`: the dataset as the driver read it (None:
    read here). `test_acc`: the accuracies the run already measured, by member (peer0, ...); the
    others are evaluated here."""
    from ..core.host import memory_format
    from ..data.datasets import Batches, load_data
    from ..models.builders import build_model
    from ..rundir.checkpoint import load_peer

    data = data if data is not None else load_data(cfg.data, datasets)
    fmt = memory_format(data.sample, cfg.scale.channels_last)

    def build(name: str, state: dict) -> nn.Module:
        m = build_model(name, data.sample, data.num_classes, models, memory_format=fmt, label_shape=data.label_shape)
        m.load_state_dict(state)
        return m.eval()

    frozen = copy_members(run.read_bytes(TEACHER) if run is not None else None)  # the run's frozen teacher
    rows, nets = [], []
    for p, name in enumerate(cfg.models):
        state = load_peer(checkpoint_dir, p)
        rows.append({"member": f"peer{p}", "role": "student", "model": name})
        nets.append(build(name, state["model"]))
        t = state.get("teacher") or {}
        members = [t] if isinstance(t.get("model"), dict) else frozen
        for k, m in enumerate(members):
            if isinstance(m.get("model"), dict) and isinstance(m.get("model_name"), str):
                role = f"teacher ({cfg.distill.mode}{', ensemble member' if len(members) > 1 else ''})"
                rows.append({"member": f"peer{p}/teacher" + (f"{k}" if len(members) > 1 else ""), "role": role,
                             "model": m["model_name"]})
                nets.append(build(m["model_name"], m["model"]))
    first = {}  # one net per architecture to time
    for row, net in zip(rows, nets):
        first.setdefault(row["model"], net)
    speed = dict(zip(first, cpu_latency(list(first.values()), data.sample, fmt=fmt)))
    known = test_acc or {}
    for row, net in zip(rows, nets):
        acc = known.get(row["member"])
        if acc is None:
            acc = accuracy(net, Batches(data.test, 512, torch.device("cpu"), shuffle=False, drop_last=False,
                                        memory_format=fmt))
        row.update(params=sum(p.numel() for p in net.parameters()), size_kb=size_bytes(net) / 1024,
                   **speed[row["model"]], test_acc=acc)
    return pd.DataFrame(rows)


def write_report(cfg: Config, run: RunDir, checkpoint_dir: str, data=None, *, models=None, datasets=None,
                 test_acc: dict[str, float] | None = None) -> pd.DataFrame:
    """compression.csv for a finished run, from its last checkpoint."""
    table = compression_table(cfg, checkpoint_dir, run=run, data=data, models=models, datasets=datasets,
                              test_acc=test_acc)
    run.write(COMPRESSION, table.to_csv(index=False))
    return table


def format_report(table: pd.DataFrame) -> str:
    """The table, then one line per student that has a teacher: what the smaller model costs."""
    lines = [table.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    by_member = table.set_index("member")
    for member in table.loc[table["role"] == "student", "member"]:
        if f"{member}/teacher" not in by_member.index:
            continue
        s, t = by_member.loc[member], by_member.loc[f"{member}/teacher"]
        lines.append(f"{member}: teacher/student params {t['params'] / s['params']:.3g}x, "
                     f"size {t['size_kb'] / s['size_kb']:.3g}x, "
                     f"latency {t['latency_ms'] / s['latency_ms']:.3g}x, time per sample at b256 "
                     f"{t['us_per_sample_b256'] / s['us_per_sample_b256']:.3g}x; "
                     f"test acc student {s['test_acc']:.4f} vs teacher {t['test_acc']:.4f}")
    return "\n".join(lines)
