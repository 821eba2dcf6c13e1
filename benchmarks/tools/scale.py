"""`python -m benchmarks.tools.scale`: what peers x replicas and codistillation cost, side by side.

Each measurement runs the real training loop (online_distill.training.loop.run) in a torch.distributed
world of its own (gloo, one process per rank, no Ray: Ray's start-up would only add noise), for
a fixed number of steps, and reads the loop's own per-step numbers. Measurements alternate
over `repeats` rounds and the median of the rounds is kept, so load that comes and goes on the
machine falls on every setting alike. Two comparisons:

- exchange: DML (logits every step) vs codistillation with sync_every in (1, 10, 50):
  mean step time (the mean counts the swap paid every k steps: with 53 or 103 steps, the 50 or
  100 timed after 3 warm-up steps hold exactly 50/k or 100/k swaps), bytes received per step.
- replicas: one peer with 1 replica vs 2 replicas (DDP), samples per second.

On a GPU every rank uses cuda:0 and gloo (NCCL refuses two ranks on one GPU); exchange times
then include the device-host copies that gloo makes, an upper bound for NCCL over NVLink.
"""
from __future__ import annotations

import contextlib
import sys
import io
import json
import os
import statistics
import tempfile
from dataclasses import dataclass

import torch

from online_distill.config import schema as config_mod
from online_distill.run.checks import check
from online_distill.config.schema import Config, ConfigError


@dataclass(frozen=True)
class Setting:
    label: str
    overrides: dict


def exchange_settings(sync_every: tuple[int, ...] = (1, 10, 50)) -> list[Setting]:
    out = [Setting("dml", {"distill.mode": "dml"})]
    # burn_in_steps=1: the first swap follows step 0, so every timed step has a stale teacher to run
    out += [Setting(f"codistill k={k}", {"distill.mode": "codistill", "distill.sync_every": k, "distill.burn_in_steps": 1})
            for k in sync_every]
    return out


def replica_settings() -> list[Setting]:
    one_peer = {"models": None, "distill.mode": "independent"}  # models filled in by base_config
    return [Setting("1 peer x 1 replica", {**one_peer, "scale.replicas": 1}),
            Setting("1 peer x 2 replicas", {**one_peer, "scale.replicas": 2})]


def base_config(*, model: str, dataset: str, batch_size: int, steps: int, threads: int, precision: str,
                use_gpu: bool) -> Config:
    return config_mod.from_dict({
        "models": [model, model],
        "data": {"dataset": dataset, "val_size": 256, "test_subset": 256, "train_subset": batch_size * (steps + 2) * 2},
        "loss": {"temperature": 3.0, "kd_weight": 0.5},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 1, "batch_size": batch_size, "max_steps_per_epoch": steps, "log_every_s": 1e9},
        "scale": {"cpus_per_worker": threads, "precision": precision, "use_gpu": use_gpu},
        "run": {"name": "bench-scale", "storage_path": tempfile.gettempdir()},
    })


def setting_config(base: Config, s: Setting) -> Config:
    overrides = dict(s.overrides)
    if "models" in overrides:
        overrides["models"] = [base.models[0]]
    return check(config_mod.with_overrides(base, overrides))


def measure(cfg: Config, device: str) -> dict:
    """Train cfg for its steps in a fresh gloo world; rank 0's numbers for the epoch."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="od-bench-") as tmp:
        mp.start_processes(_rank_main, args=(cfg, tmp, device), nprocs=cfg.world_size, start_method="forkserver")
        with open(os.path.join(tmp, "history.json")) as f:
            rows = [r for r in json.load(f) if r["member"] != "ensemble"]
    return {
        "step_ms": 1e3 * max(r["step_time_mean_s"] for r in rows),
        "median_step_ms": 1e3 * max(r["step_time_s"] for r in rows),
        "samples_per_s": sum(cfg.scale.replicas * cfg.train.batch_size / r["step_time_mean_s"] for r in rows),
        "bytes_per_step": statistics.mean(r["exchange_bytes_per_step"] for r in rows),
        "exchange_share": statistics.mean(r["exchange_share"] for r in rows),
    }


def _rank_main(rank: int, cfg: Config, tmp: str, device: str) -> None:
    import torch.distributed as dist

    from online_distill.training.loop import run

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=cfg.world_size)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's epoch lines: the table says it better
        history = run(cfg, rank, dev)
    if rank == 0:
        with open(os.path.join(tmp, "history.json"), "w") as f:
            json.dump(history, f)
    dist.destroy_process_group()


def run_suite(base: Config, settings: list[Setting], *, device: str, repeats: int, log=print) -> list[dict]:
    """Every setting once per round, rounds alternating; the median over rounds per setting."""
    results: dict[str, list[dict]] = {s.label: [] for s in settings}
    for r in range(repeats):
        for s in settings:
            m = measure(setting_config(base, s), device)
            results[s.label].append(m)
            log(f"  round {r + 1}/{repeats}  {s.label:<22} {m['step_ms']:8.2f} ms/step", flush=True)
    rows = []
    for s in settings:
        runs = results[s.label]
        rows.append({"setting": s.label, **{k: statistics.median(m[k] for m in runs) for k in runs[0]}})
    return rows


def format_rows(rows: list[dict], reference: str) -> str:
    ref = next(r for r in rows if r["setting"] == reference)
    lines = [f"{'setting':<22} {'ms/step':>9} {'median':>9} {'x ' + reference:>12} {'samples/s':>10} "
             f"{'bytes/step':>11} {'exch. share':>11}"]
    for r in rows:
        lines.append(f"{r['setting']:<22} {r['step_ms']:9.2f} {r['median_step_ms']:9.2f} "
                     f"{r['step_ms'] / ref['step_ms']:12.2f} {r['samples_per_s']:10.0f} "
                     f"{r['bytes_per_step']:11.0f} {r['exchange_share']:11.1%}")
    return "\n".join(lines)


def bench_scale(*, model: str = "small_cnn", dataset: str = "fashion_mnist", batch_size: int = 128, steps: int = 103,
                repeats: int = 2, device: str = "cpu", precisions: tuple[str, ...] = ("fp32",),
                suites: tuple[str, ...] = ("exchange", "replicas"), out: str | None = None) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: got 'cuda'; allowed: 'cpu' (no GPU is visible here)")
    if steps < 10:
        raise ConfigError(f"--steps: got {steps}; allowed: at least 10 (the first 3 steps are warm-up)")
    import torch.multiprocessing as mp

    # forkserver: torch and the package are imported once, not once per rank and measurement
    mp.get_context("forkserver").set_forkserver_preload(["torch", "online_distill.training.loop"])
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu x{os.cpu_count()}",
                    "model": model, "dataset": dataset, "batch_size": batch_size, "steps": steps, "repeats": repeats}
    for precision in precisions:
        base = base_config(model=model, dataset=dataset, batch_size=batch_size, steps=steps,
                           threads=1 if device == "cpu" else 4, precision=precision, use_gpu=False)
        if "exchange" in suites:
            print(f"\nDML vs codistillation: 2 x {model}, batch {batch_size}, {precision}, {report['device']}", flush=True)
            rows = run_suite(base, exchange_settings(), device=device, repeats=repeats)
            print(format_rows(rows, "dml"), flush=True)
            report[f"exchange_{precision}"] = rows
        if "replicas" in suites:
            print(f"\none peer, 1 vs 2 replicas: {model}, batch {batch_size} per replica, {precision}", flush=True)
            rows = run_suite(base, replica_settings(), device=device, repeats=repeats)
            print(format_rows(rows, "1 peer x 1 replica"), flush=True)
            report[f"replicas_{precision}"] = rows
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.scale",
                                description="DML vs codistillation (sync_every 1, 10, 50) and 1 vs 2 replicas, side by side")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--batch-size", type=int, default=128, help="per replica")
    p.add_argument("--steps", type=int, default=103, help="steps per measurement (3 warm-up + 100 timed)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds of every measurement")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32,bf16")
    p.add_argument("--suites", default="exchange,replicas", help="comma-separated: exchange,replicas")
    p.add_argument("--out", default=None, help="also write the numbers as JSON")
    a = p.parse_args(argv)
    try:
        bench_scale(model=a.model, dataset=a.dataset, batch_size=a.batch_size, steps=a.steps, repeats=a.repeats,
                    device=a.device, precisions=tuple(a.precision.split(",")), suites=tuple(a.suites.split(",")),
                    out=a.out)
    except ConfigError as e:
        print(f"bench.scale: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
