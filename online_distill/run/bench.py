"""`online-distill bench`: what the framework costs, measured side by side in one run.

Six measurements of the same work (K peers, same model, same batches, K CPUs in all):
  (a) dml          our Ray Train loop, one peer per worker (1 thread each), all-gathering logits every step
  (b) independent  our Ray Train loop, the same peers with no exchange
  (c) plain dml    K plain PyTorch processes without Ray doing (a)'s work: forward, all-gather
                   of the detached logits over gloo, the same loss, backward, step
  (d) plain        K plain PyTorch processes without Ray doing (b)'s work: forward, CE, backward, step
  (e) packed dml   our Ray Train loop, all K peers in one worker (K threads): the exchange is a memory read
  (f) packed independent   (e) with no exchange
They are repeated in alternation (a b c d e f a b ...) so drift of the machine hits all alike.
A ratio is the median over repeats of the ratio within a repeat: the two sides of a pair ran back
to back, so a machine that is slower in one repeat than in another (on a shared 2-core box, by
20% and more) slows both sides of that pair. The range over repeats and the ratio of the
medians are printed beside it, so a reader sees how sure the number is. (c) is the floor of any
synchronous DML on this machine: what lockstep costs here, with no framework at all.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from ..config import schema as config_mod
from ..core.host import keep_freed_memory, memory_format
from ..core.optim import make_optimizer
from ..data.datasets import Batches, load_data
from ..distill.losses import distill_loss
from ..models.builders import build_model
from ..training.metrics import steady


def bench_config(mode: str, peers: int, model: str, batch_size: int, steps: int, storage: str, name: str,
                 packed: bool = False) -> config_mod.Config:
    """K peers; spread: one worker (one CPU, one thread) per peer; packed: one worker with K CPUs."""
    return config_mod.from_dict({
        "models": [model] * peers,
        "data": {"dataset": "synthetic", "val_size": 256, "test_subset": 256},
        "distill": {"mode": mode},
        "optim": {"schedule": "constant"},
        "train": {"epochs": 1, "batch_size": batch_size, "max_steps_per_epoch": steps, "log_every_s": 3600},
        "scale": {"cpus_per_worker": peers if packed else 1, "peers_per_worker": peers if packed else 1},
        "run": {"name": name, "storage_path": storage, "max_failures": 0},
    })


def _plain_worker(cfg: config_mod.Config, peer: int, rendezvous: str, out: mp.Queue) -> None:
    """The same work as one peer of the cohort, in plain PyTorch without Ray: forward, CE,
    backward, step; in DML mode also the all-gather of detached logits over gloo and the KD loss.
    In the loop's memory layout and with its allocator setting (online_distill.core.host), so that
    the comparison prices the framework, not those."""
    keep_freed_memory()
    torch.set_num_threads(1)
    dml = cfg.distill.mode == "dml"
    if dml:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=peer, world_size=cfg.num_peers)
    data = load_data(cfg.data)
    fmt = memory_format(data.sample, cfg.scale.channels_last)
    torch.manual_seed(cfg.train.seed * 1000 + peer)
    model = build_model(cfg.models[peer], data.sample, data.num_classes, memory_format=fmt)
    opt = make_optimizer(cfg.optim, model)
    batches = Batches(data.train, cfg.train.batch_size, torch.device("cpu"), seed=cfg.train.seed,
                      max_batches=cfg.train.max_steps_per_epoch, memory_format=fmt)
    times = []
    for x, y in batches:
        t0 = time.perf_counter()
        logits = model(x)
        teachers = None
        if dml:
            gathered = [torch.empty_like(logits) for _ in range(cfg.num_peers)]
            dist.all_gather(gathered, logits.detach().contiguous())
            teachers = torch.stack([g for i, g in enumerate(gathered) if i != peer])
        loss, _ = distill_loss(logits, teachers, y, temperature=cfg.loss.temperature, kd_weight=cfg.loss.kd_weight,
                               ce_weight=cfg.loss.ce_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    out.put(statistics.median(steady(times)))
    if dml:
        dist.destroy_process_group()


def plain_step_time(cfg: config_mod.Config) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="od-bench-") as tmp:
        rendezvous = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_plain_worker, args=(cfg, p, rendezvous, q)) for p in range(cfg.num_peers)]
        for p in procs:
            p.start()
        times = [q.get() for _ in procs]
        for p in procs:
            p.join()
    return max(times)  # a cohort moves at the pace of its slowest peer, as in metrics.py


def ray_step_time(cfg: config_mod.Config) -> tuple[float, float, float]:
    """Median step time, bytes received per step, and the share of the step spent in the
    exchange (waiting for the slowest peer's logits included), slowest peer first."""
    from ..rundir.checkpoint import read_metrics
    from ..rundir.layout import RunDir
    from .launch import make_trainer

    run = RunDir.of(cfg)
    make_trainer(cfg, run, notify="train", verbose=False).fit()
    m = read_metrics(run.latest())
    share = max(m[f"peer{p}/exchange_share"] for p in range(cfg.num_peers))
    return m["step_time_s"], m["exchange_bytes_per_step"], share


def paired_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median, min and max over repeats of num[r] / den[r] (each pair measured back to back)."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two equally long, non-empty lists; got {len(num)} and {len(den)}")
    r = [a / b for a, b in zip(num, den)]
    return statistics.median(r), min(r), max(r)


def bench(peers: int = 2, model: str = "small_cnn", batch_size: int = 128, steps: int = 60, repeats: int = 5) -> dict:
    from .launch import init_ray

    init_ray()
    storage = tempfile.mkdtemp(prefix="online_distill_bench_")
    # (label, distill.mode, through Ray Train?, packed?)
    kinds = [("dml", "dml", True, False), ("independent", "independent", True, False),
             ("plain dml", "dml", False, False), ("plain", "independent", False, False),
             ("packed dml", "dml", True, True), ("packed independent", "independent", True, True)]
    times: dict[str, list[float]] = {k: [] for k, *_ in kinds}
    comm, packed_comm, shares = 0.0, 0.0, []
    for r in range(repeats):
        for label, mode, on_ray, packed in kinds:
            cfg = bench_config(mode, peers, model, batch_size, steps, storage, f"{label.replace(' ', '_')}{r}", packed)
            if on_ray:
                t, b, share = ray_step_time(cfg)
                if mode == "dml" and packed:
                    packed_comm = b
                elif mode == "dml":
                    comm = b
                    shares.append(share)
            else:
                t = plain_step_time(cfg)
            times[label].append(t)
            print(f"  repeat {r + 1}/{repeats}  {label:<18} {t * 1e3:8.2f} ms/step", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = {"dml_over_independent": ("dml", "independent"), "ray_over_plain": ("independent", "plain"),
             "ray_dml_over_plain_dml": ("dml", "plain dml"), "plain_dml_over_plain": ("plain dml", "plain"),
             "packed_dml_over_packed_independent": ("packed dml", "packed independent"),
             # samples/s summed over peers is K x B / step time in both layouts: a ratio of step times
             "spread_over_packed_dml_step": ("dml", "packed dml")}
    num_classes = 10
    expected = (peers - 1) * batch_size * num_classes * 4
    out = {"dml_ms": med["dml"] * 1e3, "independent_ms": med["independent"] * 1e3, "plain_ms": med["plain"] * 1e3,
           "plain_dml_ms": med["plain dml"] * 1e3, "bytes_per_step": comm, "expected_bytes_per_step": expected,
           "packed_dml_ms": med["packed dml"] * 1e3, "packed_independent_ms": med["packed independent"] * 1e3,
           "packed_bytes_per_step": packed_comm,
           "dml_exchange_share": statistics.median(shares)}
    for key, (a, b) in pairs.items():
        out[key], out[key + "_min"], out[key + "_max"] = paired_ratio(times[a], times[b])
        out[key + "_of_medians"] = med[a] / med[b]

    def ratio(key: str) -> str:
        return (f"{out[key]:.3f}   (repeats {out[key + '_min']:.3f} .. {out[key + '_max']:.3f}; "
                f"ratio of the medians {out[key + '_of_medians']:.3f})")

    print(f"\nbench: {peers} x {model}, batch {batch_size}, {steps} steps, {repeats} repeats, "
          f"{peers} torch threads in all, {os.cpu_count()} CPUs; ratios are medians of the per-repeat ratios")
    print(f"  step time (median)   dml {out['dml_ms']:.2f} ms   independent {out['independent_ms']:.2f} ms   "
          f"plain PyTorch: dml {out['plain_dml_ms']:.2f} ms, independent {out['plain_ms']:.2f} ms")
    print(f"  DML / independent    {ratio('dml_over_independent')}   bar <= 1.05")
    print(f"  Ray path / plain     {ratio('ray_over_plain')}   bar <= 1.10")
    print(f"  plain PyTorch alone: DML / independent {ratio('plain_dml_over_plain')}")
    print(f"  DML through Ray / DML in plain PyTorch {ratio('ray_dml_over_plain_dml')}")
    print(f"  packed (all {peers} peers in one worker): dml {out['packed_dml_ms']:.2f} ms   independent "
          f"{out['packed_independent_ms']:.2f} ms")
    print(f"  packed DML / packed independent   {ratio('packed_dml_over_packed_independent')}   bar <= 1.05")
    print(f"  packed / spread throughput (samples/s summed over peers, DML)   "
          f"{ratio('spread_over_packed_dml_step')}   bar >= 1")
    print(f"  bytes received per step per worker  {comm:.0f}   (K-1)*B*C*4 = {expected}; packed {packed_comm:.0f}")
    print(f"  DML step share in the exchange   {out['dml_exchange_share']:.1%}   (the all-gather, and waiting in it "
          f"for the slowest peer: lockstep passes any peer's stall to all)")
    return out
