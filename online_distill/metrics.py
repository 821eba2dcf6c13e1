"""Per-epoch numbers: merge what every rank measured into flat Ray metrics and tidy rows."""
from __future__ import annotations

import math
import statistics

from .config import Config


def steady(step_times: list[float], warmup: int = 3) -> list[float]:
    """Step times without the first few (allocator and cache warm-up)."""
    return step_times[warmup:] if len(step_times) > warmup + 1 else step_times


def merge_rank_stats(all_stats: list[dict], cfg: Config, epoch: int, *, lr: float, kd_weight: float,
                     resumed_from_epoch: int = 0) -> tuple[dict, list[dict]]:
    """Rank 0's view of an epoch: `peer{p}/...`, `ensemble/...` and cohort-level metrics.

    Replicas of a peer are summed (they hold different shards); the ensemble is counted once
    per shard (from peer 0's ranks, since all peers of a shard compute the same ensemble).
    `resumed_from_epoch` is the epoch count the current attempt started from (0: from scratch),
    so a table shows where a resumed or retried run picked up.
    """
    metrics: dict = {"epoch": epoch + 1, "lr": lr, "kd_weight": kd_weight, "resumed_from_epoch": resumed_from_epoch}
    rows: list[dict] = []
    splits = ["val", "test"] if "test" in all_stats[0] else ["val"]
    step_medians = []
    for p in range(cfg.num_peers):
        mine = [s for s in all_stats if s["peer"] == p]
        ce, kd, correct, n = (sum(s["train"][j] for s in mine) for j in range(4))
        med = max(statistics.median(steady(s["step_times"])) if s["step_times"] else math.nan for s in mine)
        # the mean counts what the median skips: costs paid every k steps (codistill's weight swap)
        mean = max(statistics.mean(steady(s["step_times"])) if s["step_times"] else math.nan for s in mine)
        step_medians.append(med)
        row = {"epoch": epoch + 1, "member": f"peer{p}", "model": cfg.models[p], "train_ce": ce / n,
               "train_kd": kd / n, "train_acc": correct / n, "step_time_s": med, "step_time_mean_s": mean,
               "samples_per_s": cfg.scale.replicas * cfg.train.batch_size / med if med > 0 else math.nan,
               "exchange_share": sum(s["exchange_s"] for s in mine) / max(1e-12, sum(sum(s["step_times"]) for s in mine)),
               "exchange_bytes_per_step": statistics.mean(s["comm_bytes_per_step"] for s in mine)}
        for split in splits:
            c, nll, m = (sum(s[split][k] for s in mine) for k in ("correct", "nll", "n"))
            row[f"{split}_acc"], row[f"{split}_nll"] = c / m, nll / m
        rows.append(row)
        for k, v in row.items():
            if k not in ("epoch", "member", "model"):
                metrics[f"peer{p}/{k}"] = v
    ens_src = [s for s in all_stats if s["peer"] == 0]
    ens = {"epoch": epoch + 1, "member": "ensemble", "model": "+".join(cfg.models)}
    for split in splits:
        c, nll, m = (sum(s[split][k] for s in ens_src) for k in ("ens_correct", "ens_nll", "n"))
        ens[f"{split}_acc"], ens[f"{split}_nll"] = c / m, nll / m
        metrics[f"ensemble/{split}_acc"], metrics[f"ensemble/{split}_nll"] = c / m, nll / m
        accs = [r[f"{split}_acc"] for r in rows]
        metrics[f"mean/{split}_acc"], metrics[f"best_peer/{split}_acc"] = statistics.mean(accs), max(accs)
    rows.append(ens)
    metrics["step_time_s"] = max(step_medians)
    metrics["samples_per_s"] = sum(r["samples_per_s"] for r in rows[:-1])
    metrics["exchange_bytes_per_step"] = statistics.mean(s["comm_bytes_per_step"] for s in all_stats)
    for r in rows:
        r.update(lr=lr, kd_weight=kd_weight, resumed_from_epoch=resumed_from_epoch, run=cfg.run.name, mode=cfg.distill.mode, seed=cfg.train.seed,
                 temperature=cfg.loss.temperature)
    return metrics, rows


def format_epoch(m: dict, cfg: Config) -> str:
    """One readable line per epoch."""
    peers = "  ".join(f"p{p} {m[f'peer{p}/val_acc']:.4f}" for p in range(cfg.num_peers))
    line = (f"epoch {m['epoch']:>3}/{cfg.train.epochs}  val acc: {peers}  ens {m['ensemble/val_acc']:.4f}  "
            f"| ce {statistics.mean(m[f'peer{p}/train_ce'] for p in range(cfg.num_peers)):.4f} "
            f"kd {statistics.mean(m[f'peer{p}/train_kd'] for p in range(cfg.num_peers)):.4f}  "
            f"| {m['step_time_s'] * 1e3:.1f} ms/step  {m['samples_per_s']:.0f} samples/s")
    if "ensemble/test_acc" in m:
        tests = "  ".join(f"p{p} {m[f'peer{p}/test_acc']:.4f}" for p in range(cfg.num_peers))
        line += f"\n  test acc: {tests}  ens {m['ensemble/test_acc']:.4f}"
    return line
