"""Per-epoch numbers: merge what every rank measured into flat Ray metrics and tidy rows."""
from __future__ import annotations

import math
import statistics

from ..config.schema import Config


def steady(step_times: list[float], warmup: int = 3) -> list[float]:
    """Step times without the first few (allocator and cache warm-up)."""
    return step_times[warmup:] if len(step_times) > warmup + 1 else step_times


def text_metrics(nll: float, bytes_per_token: float | None) -> dict[str, float]:
    """Perplexity and bits per byte of a mean token NLL in nats (bits per byte compare models
    whatever their tokenizer: bytes per token is 1 for byte-level tokens)."""
    out = {"ppl": math.exp(min(nll, 700.0))}
    if bytes_per_token:
        out["bpb"] = nll / math.log(2) / bytes_per_token
    return out


def merge_rank_stats(all_stats: list[dict], cfg: Config, epoch: int, *, lr: float, kd_weight: float,
                     resumed_from_epoch: int = 0, sequence: bool = False) -> tuple[dict, list[dict]]:
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
        ce, kd, correct, n, n_kd = (sum(s["train"][j] for s in mine) for j in range(5))
        med = max(statistics.median(steady(s["step_times"])) if s["step_times"] else math.nan for s in mine)
        # the mean counts what the median skips: costs paid every k steps (codistill's weight swap)
        mean = max(statistics.mean(steady(s["step_times"])) if s["step_times"] else math.nan for s in mine)
        step_medians.append(med)
        # on-policy rows count in the KD term only (n_kd); with onpolicy.lmbda 1 no label counts (n = 0)
        row = {"epoch": epoch + 1, "member": f"peer{p}", "model": cfg.models[p],
               "train_ce": ce / n if n else math.nan, "train_kd": kd / n_kd if n_kd else 0.0,
               "train_acc": correct / n if n else math.nan, "step_time_s": med, "step_time_mean_s": mean,
               "samples_per_s": cfg.scale.replicas * cfg.train.batch_size / med if med > 0 else math.nan,
               "exchange_share": sum(s["exchange_s"] for s in mine) / max(1e-12, sum(sum(s["step_times"]) for s in mine)),
               "exchange_bytes_per_step": statistics.mean(s["comm_bytes_per_step"] for s in mine)}
        if cfg.onpolicy.on:  # the step's time split: generating, the teacher (scoring), learning
            total = max(1e-12, sum(sum(s["step_times"]) for s in mine))
            row["generate_share"] = sum(s.get("generate_s", 0.0) for s in mine) / total
            row["teacher_share"] = row["exchange_share"]
            row["learn_share"] = 1.0 - row["generate_share"] - row["teacher_share"]
        for key in sorted({k for s in mine for k in s.get("gen", {})}):  # onpolicy: what the student writes
            row[key] = statistics.mean(s["gen"][key] for s in mine if key in s.get("gen", {}))
        for split in splits:
            c, nll, m = (sum(s[split][k] for s in mine) for k in ("correct", "nll", "n"))
            row[f"{split}_acc"], row[f"{split}_nll"] = c / m, nll / m
            if sequence:
                row.update({f"{split}_{k}": v for k, v in text_metrics(nll / m, mine[0][split].get("bytes_per_token")).items()})
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
        if sequence:
            for k, v in text_metrics(nll / m, ens_src[0][split].get("bytes_per_token")).items():
                ens[f"{split}_{k}"] = metrics[f"ensemble/{split}_{k}"] = v
        for name, best in (("acc", max), ("nll", min), ("bpb", min)):  # per peer: the mean, and the best one's
            values = [r[f"{split}_{name}"] for r in rows if f"{split}_{name}" in r]
            if values:
                metrics[f"mean/{split}_{name}"], metrics[f"best_peer/{split}_{name}"] = statistics.mean(values), best(values)
    rows.append(ens)
    metrics["step_time_s"] = max(step_medians)
    metrics["samples_per_s"] = sum(r["samples_per_s"] for r in rows[:-1])
    metrics["exchange_bytes_per_step"] = statistics.mean(s["comm_bytes_per_step"] for s in all_stats)
    metrics["teacher_forwards"] = sum(s.get("teacher_forwards", 0) for s in all_stats)
    for key in sorted({k for s in all_stats for k in s.get("fidelity", {})}):  # what distill.logits loses
        values = [s["fidelity"][key] for s in all_stats if key in s.get("fidelity", {})]
        metrics[key] = statistics.mean(values)
    for r in rows:
        r.update(lr=lr, kd_weight=kd_weight, resumed_from_epoch=resumed_from_epoch, run=cfg.run.name, mode=cfg.distill.mode, seed=cfg.train.seed,
                 temperature=cfg.loss.temperature, teacher_forwards=metrics["teacher_forwards"],
                 **{k: metrics[k] for k in ("logits_kl", "kd_rel_error") if k in metrics})
    return metrics, rows


def format_epoch(m: dict, cfg: Config) -> str:
    """One readable line per epoch: validation accuracy per peer and of the ensemble (bits per
    byte for text, or token NLL where the dataset does not say its bytes per token)."""
    key, label, fmt = "val_acc", "val acc", ".4f"
    if "ensemble/val_bpb" in m:
        key, label, fmt = "val_bpb", "val bits/byte", ".3f"
    elif "ensemble/val_ppl" in m:
        key, label, fmt = "val_nll", "val nll", ".3f"
    peers = "  ".join(f"p{p} {m[f'peer{p}/{key}']:{fmt}}" for p in range(cfg.num_peers))
    line = (f"epoch {m['epoch']:>3}/{cfg.train.epochs}  {label}: {peers}  ens {m[f'ensemble/{key}']:{fmt}}  "
            f"| ce {statistics.mean(m[f'peer{p}/train_ce'] for p in range(cfg.num_peers)):.4f} "
            f"kd {statistics.mean(m[f'peer{p}/train_kd'] for p in range(cfg.num_peers)):.4f}  "
            f"| {m['step_time_s'] * 1e3:.1f} ms/step  {m['samples_per_s']:.0f} samples/s")
    if "peer0/generate_share" in m:  # on-policy: where the step's time went, and what the students write
        share = {k: statistics.mean(m[f"peer{p}/{k}_share"] for p in range(cfg.num_peers))
                 for k in ("generate", "teacher", "learn")}
        line += "\n  step: " + "  ".join(f"{k} {100 * v:.0f}%" for k, v in share.items())
    for gen_key, name in (("val_gen_teacher_nll", "teacher nll of own samples"), ("val_gen_repetition", "repetition")):
        if f"peer0/{gen_key}" in m:
            line += f"  | {name}: " + "  ".join(f"p{p} {m[f'peer{p}/{gen_key}']:.3f}" for p in range(cfg.num_peers))
        test_key = key.replace("val_", "test_")
    if f"ensemble/{test_key}" in m:
        tests = "  ".join(f"p{p} {m[f'peer{p}/{test_key}']:{fmt}}" for p in range(cfg.num_peers))
        line += f"\n  test {label[4:]}: {tests}  ens {m[f'ensemble/{test_key}']:{fmt}}"
    return line
