"""Packed peers on one device, measured side by side in one run.

    python -m benchmarks.tools.packed --model resnet18 --peers 2 --device cuda

1. Through the training loop itself (no Ray): samples/s per peer of K peers packed in one worker
   (`scale.peers_per_worker: K`, DML) against one peer alone on the same device, and the cost of
   the exchange (packed DML against packed independent peers).
2. Identical peers as one batched computation (torch.func: stacked weights + vmap) against the
   loop's way (one peer after another). vmap turns K convolutions over one batch into one grouped call, which can pay on a GPU where
small kernels leave it idle. BatchNorm is the catch: under vmap a module may not update its
running statistics in place, so torch.func.replace_all_batch_norm_modules_ turns them off and
every BatchNorm normalises with batch statistics in evaluation too: another model than the one
the loop trains. The loop keeps peers separate; this command measures what that gives up.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, replace_all_batch_norm_modules_, stack_module_state, vmap

from online_distill.config import schema as config_mod
from online_distill.run.checks import check
from online_distill.models.builders import build_model


def loop_samples_per_s(model: str, peers: int, mode: str, batch_size: int, steps: int, device: torch.device) -> float:
    """Samples/s per peer of the real loop (one epoch of `steps` steps, synthetic 28 px images)."""
    import contextlib
    import io

    from online_distill.training.loop import run

    cfg = check(config_mod.from_dict({
        "models": [model] * peers, "distill": {"mode": mode},
        "data": {"dataset": "synthetic", "val_size": 256, "test_subset": 256},
        "optim": {"schedule": "constant"},
        "train": {"epochs": 1, "batch_size": batch_size, "max_steps_per_epoch": steps, "log_every_s": 3600},
        "scale": {"peers_per_worker": peers, "use_gpu": device.type == "cuda",
                  "cpus_per_worker": torch.get_num_threads()},
    }))
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()):
        rows = run(cfg, 0, device)
    torch.set_num_threads(threads)
    peer_rows = [r for r in rows if r["member"] != "ensemble"]
    return statistics.mean(r["samples_per_s"] for r in peer_rows)


def _timed(step, steps: int, device: torch.device) -> float:
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def measure_stacked(model: str, peers: int, batch_size: int, steps: int, repeats: int, device: torch.device) -> dict:
    x = torch.randn(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    nets = [build_model(model, torch.zeros(2, 1, 28, 28), 10).to(device) for _ in range(peers)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.01) for n in nets]

    def sequential() -> None:  # what the loop does with packed peers
        for n, o in zip(nets, opts):
            loss = F.cross_entropy(n(x), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    plain = [copy.deepcopy(n) for n in nets]
    for n in plain:
        replace_all_batch_norm_modules_(n)  # the price of vmap: no running statistics
    params, buffers = stack_module_state(plain)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    base = copy.deepcopy(plain[0]).to("meta")
    opt = torch.optim.SGD(params.values(), lr=0.01)

    def forward(p, b, xb):
        return functional_call(base, (p, b), (xb,))

    def stacked() -> None:
        logits = vmap(forward, in_dims=(0, 0, None))(params, buffers, x)  # (K, B, C)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(peers), reduction="sum") / batch_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seq, stk = [], []
    for _ in range(repeats):
        seq.append(_timed(sequential, steps, device))
        stk.append(_timed(stacked, steps, device))
    ratios = [a / b for a, b in zip(seq, stk)]
    return {"sequential_ms": 1e3 * statistics.median(seq), "stacked_ms": 1e3 * statistics.median(stk),
            "speedup": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tools.packed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loop-steps", type=int, default=60, help="steps of each loop measurement")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    alone, packed, packed_ind = [], [], []
    for r in range(a.repeats):
        alone.append(loop_samples_per_s(a.model, 1, "independent", a.batch_size, a.loop_steps, dev))
        packed.append(loop_samples_per_s(a.model, a.peers, "dml", a.batch_size, a.loop_steps, dev))
        packed_ind.append(loop_samples_per_s(a.model, a.peers, "independent", a.batch_size, a.loop_steps, dev))
        print(f"  repeat {r + 1}/{a.repeats}: alone {alone[-1]:.0f}, packed dml {packed[-1]:.0f}, packed independent "
              f"{packed_ind[-1]:.0f} samples/s per peer", flush=True)
    per_peer = [p_ / a_ for p_, a_ in zip(packed, alone)]
    exchange = [i_ / p_ for p_, i_ in zip(packed, packed_ind)]
    print(f"loop, {a.peers} x {a.model} packed in one worker on {a.device}, batch {a.batch_size}: samples/s per peer "
          f"{statistics.median(packed):.0f} (DML) vs {statistics.median(alone):.0f} for one {a.model} alone: "
          f"{statistics.median(per_peer):.2f}x per peer, {a.peers * statistics.median(per_peer):.2f}x the cohort's "
          f"throughput (repeats {min(per_peer):.2f} .. {max(per_peer):.2f}); packed DML / packed independent step time "
          f"{statistics.median(exchange):.3f}")
    m = measure_stacked(a.model, a.peers, a.batch_size, a.steps, a.repeats, dev)
    print(f"{a.peers} x {a.model}, batch {a.batch_size}, {a.device}, {torch.get_num_threads()} threads: "
          f"one after another {m['sequential_ms']:.1f} ms/step, stacked + vmap {m['stacked_ms']:.1f} ms/step; "
          f"speed-up {m['speedup']:.2f}x (repeats {m['min']:.2f} .. {m['max']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
