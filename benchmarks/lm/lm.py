"""Language-model distillation on the built-in fortunes corpus (bytes as tokens), every run an
`online-distill train` command, two at a time.

    python benchmarks/lm/lm.py run --work /tmp/lm        # about 2 hours on 2 CPU cores
    python benchmarks/lm/lm.py tables --work /tmp/lm     # CSVs and table.md here

Claims (test bits per byte at the last epoch, seeds 0, 1, 2 paired, lower is better; the KD
setting picked on validation with seed 100; student and baseline with the same learning rate):
- L1 offline KD: gpt_tiny taught by gpt_medium (configs/lm_teacher.yaml) vs gpt_tiny alone;
- L2 compressed teacher logits: taught from the teacher's top-10 log-probs at one byte each (20
  bytes a token instead of 1,024: 1.95%; its T searched on validation like the dense one's) vs
  from its dense logits; reported beside it: top-6 and top-32 with float16 log-probs (18 and 96
  bytes) and 6 sampled tokens (unbiased), at the dense pick's T;
- L3 the teacher cache: the compressed runs read the teacher's outputs from disk, written by the
  first of them: the others run the teacher zero times (metrics.csv: teacher_forwards);
- L4 mutual learning: two gpt_tiny peers (DML) vs the same peers independent, reported either way.
"""
from __future__ import annotations

import os
import sys

import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # benchmarks.tools, when run as a script
from benchmarks.tools.jobs import main as jobs_main  # noqa: E402
from benchmarks.tools.jobs import Job, failures, finished, paired, pick, plot_paired, run_dir  # noqa: E402

SEARCH_SEED, SEEDS = 100, (0, 1, 2)
CONFIGS = os.path.join("benchmarks", "lm", "configs")
TEACHER = "configs/lm_teacher.yaml"
SEARCH = [{"loss.temperature": t, "loss.kd_weight": w} for t in (1.0, 2.0) for w in (0.5,)]
K = 6
"""Top-k / sampled tokens per position: 6 x (1 id byte + 2 float16 bytes) = 18 bytes, 1.76% of
the 1,024 bytes of 256 dense float32 logits."""
K8 = 10
"""Top-k with 8-bit log-probs: 10 x (1 id byte + 1 byte) = 20 bytes, 1.95% of dense."""
SMOKE: dict = {}


def teacher_job() -> Job:
    return Job("teacher", "teacher", TEACHER, 0, {"scale.cpus_per_worker": 1})


def alone(seed: int) -> Job:
    return Job("L1", "alone", os.path.join(CONFIGS, "student.yaml"), seed)


def kd(seed: int, setting: dict, work: str, logits: str = "dense", k: int = K, bits: int = 16) -> Job:
    sets = {**setting, "distill.mode": "offline", "distill.teacher_checkpoint": run_dir(teacher_job(), work),
            "distill.logits": logits, "distill.logits_k": k, **({"distill.logits_bits": bits} if bits != 16 else {})}
    if logits != "dense":  # compressed outputs are small enough to keep on disk, once per example
        sets["distill.teacher_cache_dir"] = os.path.join(work, "teacher_cache")
    knobs = {"T": setting["loss.temperature"], "kd": setting["loss.kd_weight"]}
    arm = f"kd_{logits}" + ("" if k == K else str(k)) + ("" if bits == 16 else f"_{bits}bit")
    return Job("L1" if logits == "dense" else "L2", arm, os.path.join(CONFIGS, "student.yaml"), seed, sets, knobs)


def peers(seed: int, mode: str) -> Job:
    return Job("L4", "dml" if mode == "dml" else "independent", os.path.join(CONFIGS, "peers.yaml"), seed,
               {"distill.mode": mode})


def plan(work: str) -> list[list[Job]]:
    search = [kd(SEARCH_SEED, s, work) for s in SEARCH]
    stage1 = [teacher_job(), *[alone(s) for s in SEEDS], *[peers(s, m) for s in SEEDS for m in ("dml", "independent")],
              *search]
    best = pick(search, work, key="val_bpb", mode="min")
    setting = {k: v for k, v in best.sets.items() if k.startswith("loss.")} if best else None
    stage2 = ([kd(s, setting, work) for s in SEEDS] + [kd(0, setting, work, "topk")]) if setting else []
    stage3 = ([kd(s, setting, work, "topk") for s in SEEDS[1:]] + [kd(s, setting, work, "sampled") for s in SEEDS]
              if setting else [])
    stage4 = [kd(s, setting, work, "topk", k=32) for s in SEEDS] if setting else []  # how much k is enough
    search8 = [kd(SEARCH_SEED, s, work, "topk", K8, 8) for s in SEARCH]  # its own T, as the dense arm got
    best8 = pick(search8, work, key="val_bpb", mode="min")
    stage6 = ([kd(s, {k: v for k, v in best8.sets.items() if k.startswith("loss.")}, work, "topk", K8, 8)
               for s in SEEDS] if best8 else [])
    return [stage1, stage2, stage3, stage4, search8, stage6]


# ---- tables -------------------------------------------------------------------------------------

def job_rows(job: Job, work: str) -> list[dict]:
    d = run_dir(job, work)
    final = pd.read_csv(os.path.join(d, "final.csv"))
    history = pd.read_csv(os.path.join(d, "metrics.csv"))
    last = history[history["epoch"] == history["epoch"].max()]
    extra = {k: float(last[k].iloc[0]) for k in ("logits_kl", "kd_rel_error", "exchange_bytes_per_step") if k in last}
    forwards = int(history.groupby("epoch")["teacher_forwards"].first().sum()) if "teacher_forwards" in history else 0
    log = open(os.path.join(work, "logs", f"{job.name}.log"), errors="replace").read()
    cache = next((ln for ln in log.splitlines() if ln.startswith("teacher cache ")), "")
    return [{"claim": job.claim, "arm": job.arm, "stage": job.stage, "seed": job.seed, "job": job.name,
             "T": job.knobs.get("T"), "kd_weight": job.knobs.get("kd"), "member": r["member"], "model": r["model"],
             **{k: r[k] for k in ("val_bpb", "val_nll", "test_bpb", "test_nll", "test_acc") if k in r},
             "teacher_forwards": forwards, "cache": cache, **extra} for _, r in final.iterrows()]


def collect(work: str) -> pd.DataFrame:
    rows = [r for stage in plan(work) for job in stage if finished(job, work) for r in job_rows(job, work)]
    failures(work).to_csv(os.path.join(HERE, "failed.csv"), index=False)
    return pd.DataFrame(rows).drop_duplicates(["job", "member"])


COMPARISONS = [  # claim, method, baseline, what the bar is
    ("L1", "kd_dense", "alone", "every seed < 0"),
    ("L2", "kd_topk10_8bit", "kd_dense", "abs(mean) <= 0.02"),
    ("L2", "kd_topk", "kd_dense", "reported"),
    ("L2", "kd_sampled", "kd_dense", "reported"),
    ("L2", "kd_topk32", "kd_dense", "reported"),
    ("L4", "dml", "independent", "reported"),
]


def bytes_table() -> pd.DataFrame:
    from online_distill.distill.sparse import bytes_per_token, dense_bytes_per_token

    rows = []
    for vocab in (256, 50_000):
        dense = dense_bytes_per_token(vocab)
        for kind, k, bits in (("topk", K8, 8), ("topk", K, 16), ("sampled", K, 16), ("topk", 32, 16)):
            b = bytes_per_token(kind, k, vocab, bits)
            rows.append({"vocab": vocab, "kind": kind, "k": k, "logp_bits": bits, "bytes_per_token": b,
                         "dense_bytes_per_token": dense,
                         "share_of_dense_pct": round(100 * b / dense, 3)})
    return pd.DataFrame(rows)


def write_tables(runs: pd.DataFrame) -> None:
    per_seed, summary = [], []
    for claim, method, baseline, bar in COMPARISONS:
        p = paired(runs, method, baseline, "test_bpb")
        if p.empty:
            continue
        per_seed.append(p.rename(columns={method: "method_bpb", baseline: "baseline_bpb"}).assign(
            claim=claim, method=method, baseline=baseline))
        d = p["delta"]
        met = {"every seed < 0": bool((d < 0).all()), "abs(mean) <= 0.02": bool(abs(d.mean()) <= 0.02)}.get(bar)
        summary.append({"claim": claim, "method": method, "baseline": baseline, "delta_mean": round(d.mean(), 4),
                        "delta_std": round(d.std(ddof=1), 4) if len(d) > 1 else float("nan"), "n_pairs": len(d),
                        "bar": f"test bits/byte: {bar}", "met": met})
    cached = runs[runs["arm"].isin(["kd_topk10_8bit", "kd_topk", "kd_topk32", "kd_sampled"]) & (runs["member"] == "peer0")]
    if len(cached):
        later = cached[cached["cache"].str.contains("runs 0 times")]
        summary.append({"claim": "L3", "method": "teacher cache", "baseline": "live teacher", "delta_mean": float("nan"),
                        "delta_std": float("nan"), "n_pairs": len(later),
                        "bar": "runs after the first: teacher runs 0 times",
                        "met": bool(len(later) and (later["teacher_forwards"] == 0).all())})
    pd.concat(per_seed).to_csv(os.path.join(HERE, "per_seed.csv"), index=False)
    pd.DataFrame(summary).to_csv(os.path.join(HERE, "summary_rows.csv"), index=False)
    plot_paired(pd.concat(per_seed), pd.DataFrame(summary), os.path.join(HERE, "summary.png"), delta="delta",
                xlabel="paired delta of test bits per byte, per seed (negative: better); dashed: the bar",
                title="Language models on fortunes (green: bar met, red: missed, grey: reported)",
                bars={("L1", "kd_dense"): [0.0], ("L2", "kd_topk10_8bit"): [-0.02, 0.02]})
    bytes_table().to_csv(os.path.join(HERE, "bytes.csv"), index=False)
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write(table_md(runs, pd.concat(per_seed), pd.DataFrame(summary)))


def _ms(v) -> str:
    v = pd.Series(v, dtype=float)
    return f"{v.mean():.4f} +- {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}"


def table_md(runs: pd.DataFrame, per_seed: pd.DataFrame, summary: pd.DataFrame) -> str:
    confirm = runs[(runs["stage"] == "confirm") & (runs["member"] != "ensemble")]
    lines = ["# Language models: offline KD, compressed teacher logits, a teacher cache, mutual learning", "",
             "Built from runs.csv by `python benchmarks/lm/lm.py tables`. Fortunes corpus, bytes as tokens (vocabulary "
             "256), sequences of 128; test bits per byte at the last epoch, mean +- std over seeds 0, 1, 2 (lower is "
             "better); the KD setting picked on validation bits per byte (seed 100).", "",
             "| arm | test bits/byte | test NLL (nats/token) | test next-byte accuracy | KL(dense \\|\\| reconstructed) | "
             "examples through the teacher, per seed (training + filling the cache) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    confirm = confirm.assign(filled=confirm["cache"].fillna("").str.extract(r"ran on (\d+) of")[0].astype(float).fillna(0))
    for arm in ("teacher", "alone", "kd_dense", "kd_topk10_8bit", "kd_topk", "kd_topk32", "kd_sampled", "independent",
                "dml"):
        g = confirm[confirm["arm"] == arm].groupby("seed").mean(numeric_only=True)
        if g.empty:
            continue
        kl = _ms(g["logits_kl"]) if "logits_kl" in g and g["logits_kl"].notna().any() else ""
        lines.append(f"| {arm} | {_ms(g['test_bpb'])} | {_ms(g['test_nll'])} | {_ms(g['test_acc'])} | {kl} | "
                     f"{', '.join(f'{int(t)} + {int(f)}' for t, f in zip(g['teacher_forwards'], g['filled']))} |")
    lines += ["", "Paired deltas of test bits per byte (method - baseline; negative: the method is better):", "",
              "| claim | method vs baseline | per seed | mean +- std | bar | met |", "| --- | --- | --- | ---: | --- | --- |"]
    for _, s in summary.iterrows():
        d = per_seed[(per_seed["claim"] == s["claim"]) & (per_seed["method"] == s["method"])
                     & (per_seed["baseline"] == s["baseline"])]["delta"]
        per = ", ".join(f"{v:+.4f}" for v in d) if len(d) else f"{s['n_pairs']} later runs"
        mean = f"{s['delta_mean']:+.4f} +- {s['delta_std']:.4f}" if pd.notna(s["delta_mean"]) else ""
        met = "yes" if s["met"] is True else "no" if s["met"] is False else "-"
        lines.append(f"| {s['claim']} | {s['method']} vs {s['baseline']} | {per} | {mean} | {s['bar']} | {met} |")
    b = bytes_table()
    lines += ["", "Bytes a token of teacher logits (the exchange between DML workers, the cache):", "",
              "| vocabulary | form | k | bits a log-prob | bytes/token | dense | share of dense |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.vocab} | {r.kind} | {r.k} | {r.logp_bits} | {r.bytes_per_token} | {r.dense_bytes_per_token} | "
              f"{r.share_of_dense_pct}% |" for r in b.itertuples()]
    search = runs[(runs["stage"] == "search") & (runs["member"] != "ensemble")]
    if len(search):
        lines += ["", "The search (seed 100): each arm's pick is its lowest validation bits per byte.", "",
                  "| arm | T | kd_weight | val bits/byte |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r.arm} | {r.T:g} | {r.kd_weight:g} | {r.val_bpb:.4f} |"
                  for r in search.sort_values(["arm", "val_bpb"]).itertuples()]
    return "\n".join(lines) + "\n"


def tables(work: str) -> None:
    runs = collect(work)
    runs.to_csv(os.path.join(HERE, "runs.csv"), index=False)
    topk_mass(work).to_csv(os.path.join(HERE, "topk_mass.csv"), index=False)
    write_tables(runs)


def topk_mass(work: str, windows: int = 256) -> pd.DataFrame:
    """What top-k keeps of the teacher, by T, k and bits, on `windows` training windows (drawn
    with seed 0): the mass of the k kept tokens and KL(dense || reconstructed), per real position."""
    import torch
    import torch.nn.functional as F

    from online_distill.rundir.checkpoint import load_peer
    from online_distill.data.corpus import fortunes_tokens
    from online_distill.distill.losses import divergence_from_log_probs
    from online_distill.models.builders import build_model
    from online_distill.rundir.layout import checkpoint_dir_of
    from online_distill.distill.sparse import compress, reconstruct

    train, _ = fortunes_tokens(128)
    x = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:windows]]
    inputs, real = x[:, :-1].long(), x[:, 1:] != 0
    model = build_model("gpt_medium", inputs[:2], 256, label_shape=(inputs.shape[1],))
    model.load_state_dict(load_peer(checkpoint_dir_of(run_dir(teacher_job(), work)), 0)["model"])
    model.eval()
    with torch.no_grad():
        z = torch.cat([model(inputs[i:i + 32]) for i in range(0, len(inputs), 32)])
    rows = []
    for t in (1.0, 2.0):
        dense = F.log_softmax(z / t, dim=-1)
        for k, bits in ((6, 16), (10, 16), (10, 8), (32, 16)):
            target = compress(z, temperature=t, kind="topk", k=k, bits=bits)
            kl = divergence_from_log_probs(dense, reconstruct(target), divergence="forward_kl")[real].mean().item()
            rows.append({"T": t, "k": k, "bits": bits, "kept_mass": round(target.logp.exp().sum(-1)[real].mean().item(), 4),
                         "kl_dense_to_reconstructed": round(kl, 4)})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    return jobs_main(argv, prog="python benchmarks/lm/lm.py", doc=__doc__, tag="lm", plan=plan, tables=tables,
                     smoke=SMOKE, smoke_sets={"train.epochs": 1, "train.max_steps_per_epoch": 4, "data.val_size": 64})


if __name__ == "__main__":
    sys.exit(main())
