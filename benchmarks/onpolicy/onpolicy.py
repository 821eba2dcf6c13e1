"""On-policy distillation of language models (GKD's lambda and beta), every run an
`online-distill train` command.

    python benchmarks/onpolicy/onpolicy.py run --work /tmp/onpolicy --parallel 1   # ~1.5 h on 2 CPU cores
    python benchmarks/onpolicy/onpolicy.py tables --work /tmp/onpolicy             # CSVs, table.md, figures here

Claims (3 seeds paired; settings picked on validation only, with seed 100; last epoch):
- O1 exposure bias where answers can be checked: three-digit addition (data.addition); a
  gpt_small teacher trained to exact answers, a gpt_tiny student taught on-policy (lmbda 1 after
  200 of its 600 steps off-policy, onpolicy.start_epochs: its own answers to the prompts
  "123+045=", scored by the teacher digit by digit) against off-policy KD (lmbda 0 throughout:
  the data's answers), both with the divergence on the answer positions only
  (onpolicy.mask_prompts) and the learning rate searched alike; metric: exact match of greedy
  answers on held-out test problems, at equal student steps and (off-policy given the on-policy
  run's wall time in steps) at equal wall time.
- O2 free-running text: gpt_tiny taught by a gpt_small on fortunes for lmbda in {0, 0.5, 1} and
  beta in {0, 0.5, 1} (loss.divergence jsd): val_gen_teacher_nll (the teacher's NLL per token of
  the student's own continuations of validation prompts) and test bits per byte; the bar: the
  on-policy student's val_gen_teacher_nll below the off-policy one's on every seed. With it the
  exposure-bias curve (excess error on one's own prefixes over the teacher's, by length).
- O3 on-policy mutual learning: two gpt_tiny peers, each continuing half the prompts and scored by
  the other (lmbda 0.5), against the same peers off-policy (DML) and independent; metric: the
  fortunes teacher's NLL of each peer's continuations of test prompts (a judge), and test bits
  per byte.
"""
from __future__ import annotations

import json
import os
import sys

import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # benchmarks.tools, when run as a script
from benchmarks.tools.jobs import Job, failures, finished, paired, plot_paired, run_dir  # noqa: E402
from benchmarks.tools.jobs import main as jobs_main  # noqa: E402

SEARCH_SEED, SEEDS = 100, (0, 1, 2)
CONFIGS = os.path.join("benchmarks", "onpolicy", "configs")
LRS = (0.003, 0.006)
DIVS = ("forward_kl", "reverse_kl")
"""O1 searches the divergence with the learning rate, for both arms alike (on-policy papers favour reverse KL)."""
SMOKE: dict = {}
O1_STEPS = 200
"""Steps per epoch of O1's students (3 epochs)."""
O1_START = 1.0
"""O1's on-policy student learns off-policy for its first epoch (onpolicy.start_epochs), then on-policy
for two; from scratch (arm on_cold, searched only) it reached 41% validation exact match against 89%."""


def config(name: str) -> str:
    return os.path.join(CONFIGS, f"{name}.yaml")


def teachers() -> list[Job]:
    return [Job("teacher", "addition_teacher", config("addition_teacher"), 0),
            Job("teacher", "fortunes_teacher", config("fortunes_teacher"), 0)]


def o1(seed: int, lmbda: float, lr: float, work: str, steps: int = O1_STEPS, arm: str | None = None,
       start: float = O1_START, div: str = "forward_kl") -> Job:
    sets = {"onpolicy.lmbda": lmbda, "onpolicy.mask_prompts": True, "optim.lr": lr,
            "train.max_steps_per_epoch": steps, "distill.teacher_checkpoint": run_dir(teachers()[0], work)}
    knobs = {"lr": lr}
    if lmbda and start:
        sets["onpolicy.start_epochs"] = start
    if div != "forward_kl":  # (forward KL is the config's: its runs keep their names)
        sets["loss.divergence"] = knobs["div"] = div
    return Job("O1", arm or ("on" if lmbda else "off"), config("addition_student"), seed, sets, knobs)


def o2(seed: int, lmbda: float, beta: float, work: str) -> Job:
    sets = {"onpolicy.lmbda": lmbda, "loss.jsd_beta": beta, "distill.teacher_checkpoint": run_dir(teachers()[1], work)}
    return Job("O2", f"l{lmbda:g}_b{beta:g}", config("fortunes_student"), seed, sets)


def o3(seed: int, arm: str) -> Job:
    sets = {"on_dml": {"onpolicy.lmbda": 0.5}, "dml": {}, "independent": {"distill.mode": "independent"}}[arm]
    return Job("O3", arm, config("fortunes_peers"), seed, sets)


def plan(work: str) -> list[list[Job]]:
    search = [o1(SEARCH_SEED, lm, lr, work, div=d) for lm in (0.0, 1.0) for lr in LRS for d in DIVS]
    cold = [o1(SEARCH_SEED, 1.0, lr, work, arm="on_cold", start=0.0) for lr in LRS]  # reported, not confirmed
    picks = {lm: _pick_o1([j for j in search if j.sets["onpolicy.lmbda"] == lm], work) for lm in (0.0, 1.0)}  # per arm
    confirm = [o1(s, lm, picks[lm][0], work, div=picks[lm][1]) for lm in (0.0, 1.0) if picks[lm] for s in SEEDS]
    equal_time = []
    if picks[0.0] and picks[1.0]:
        on_pick = o1(SEARCH_SEED, 1.0, picks[1.0][0], work, div=picks[1.0][1])
        off_pick = o1(SEARCH_SEED, 0.0, picks[0.0][0], work, div=picks[0.0][1])
        ratio = _step_time(on_pick, work) / _step_time(off_pick, work)
        steps = int(round(O1_STEPS * ratio))  # off-policy steps that take the on-policy run's time
        equal_time = [o1(s, 0.0, picks[0.0][0], work, steps=steps, arm="off_equal_time", div=picks[0.0][1]) for s in SEEDS]
    core = [o2(s, lm, 0.5, work) for s in SEEDS for lm in (0.0, 0.5, 1.0)]
    betas = [o2(s, lm, b, work) for s in SEEDS for lm in (0.0, 1.0) for b in (0.0, 1.0)]
    rest = [o2(s, 0.5, b, work) for s in SEEDS for b in (0.0, 1.0)]
    peers = [o3(s, a) for s in SEEDS for a in ("on_dml", "dml", "independent")]
    # in order of what the claims need first: a later stage may be cut short and rerun (finished runs are kept)
    return [teachers(), search + cold, confirm, core, peers, equal_time, betas, rest]


# ---- measurements the runs do not make themselves ----------------------------------------------

def _step_time(job: Job, work: str) -> float:
    m = pd.read_csv(os.path.join(run_dir(job, work), "metrics.csv"))
    return float(m["step_time_mean_s"].mean())


def exact_match(job: Job, work: str, split: str, epoch: int | None = None) -> float:
    """Greedy answers of the job's student to every problem of `split` ('val': the framework's
    validation problems, held out of training; 'test'), exact match, after its last epoch or
    after `epoch` (1-based; every checkpoint is kept); kept in work/measured/."""
    path = os.path.join(work, "measured", f"{job.name}.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    key = split if epoch is None else f"{split}_epoch{epoch}"
    if key not in done:
        import torch

        from online_distill.data.tasks import ADDITION_PROMPT, answers_correct
        from online_distill.models.generate import Sampling, generate
        from online_distill.run.export import load_trained
        from online_distill.rundir.checkpoint import load_peer
        from online_distill.rundir.layout import checkpoint_name

        _, _, model, data = load_trained(run_dir(job, work), 0)
        if epoch is not None:
            model.load_state_dict(load_peer(os.path.join(run_dir(job, work), checkpoint_name(epoch - 1)), 0)["model"])
        problems = (data.val if split == "val" else data.test).x.long()
        ok = 0
        with torch.no_grad():
            for i in range(0, len(problems), 1024):
                p = problems[i: i + 1024]
                out = generate(model, p[:, :ADDITION_PROMPT], None, Sampling(max_new_tokens=4, temperature=0))
                ok += int(answers_correct(out.tokens, p).sum())
        done[key] = ok / len(problems)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        json.dump(done, open(path, "w"))
    return done[key]


def _pick_o1(search: list[Job], work: str) -> tuple[float, str] | None:
    """The (lr, divergence) of the search run with the best validation exact match."""
    done = [j for j in search if finished(j, work)]
    if len(done) < len(search):
        return None
    best = max(done, key=lambda j: exact_match(j, work, "val"))
    return best.sets["optim.lr"], best.sets.get("loss.divergence", "forward_kl")


def judge_nll(job: Job, work: str, prompts: int = 128) -> dict[str, float]:
    """The fortunes teacher's NLL per token of each peer's sampled continuations of the first
    `prompts` test windows' 16-byte prompts (48 new bytes, temperature 1, seed 0): one judge for
    every arm of O2 and O3. Kept in work/measured/."""
    path = os.path.join(work, "measured", f"{job.name}.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    if "judge" not in done:
        import contextlib

        from online_distill.models.generate import Sampling
        from online_distill.run.export import load_trained
        from online_distill.training.onpolicy import generation_metrics

        _, _, judge, _ = load_trained(run_dir(teachers()[1], work), 0)
        out = {}
        for p in range(2 if job.claim == "O3" else 1):
            _, _, model, data = load_trained(run_dir(job, work), p)
            x = data.test.x[:prompts, :-1].long()
            m, _ = generation_metrics(model, x, lambda ids: judge(ids).unsqueeze(0), Sampling(max_new_tokens=48),
                                      16, seed=0, autocast=contextlib.nullcontext)
            out[f"peer{p}"] = m["val_gen_teacher_nll"]
        done["judge"] = out
        os.makedirs(os.path.dirname(path), exist_ok=True)
        json.dump(done, open(path, "w"))
    return done["judge"]


def exposure_curve(job: Job, work: str, prompts: int = 128, new: int = 48) -> list[float]:
    """MiniLLM's exposure-bias measure (ExAccErr) by generated length l = 1..new: the student's
    accumulated error on its own prefixes over that on the teacher's prefixes, minus 1 (0: no
    excess error from decoding on one's own prefixes). The error at a state is KL(p_teacher ||
    p_student); own prefixes are the student's samples, the teacher's prefixes the teacher's, both
    from the first `prompts` test windows' 16-byte prompts at temperature 1. Kept in work/measured/."""
    path = os.path.join(work, "measured", f"{job.name}.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    if "exposure" not in done:
        import torch
        import torch.nn.functional as F

        from online_distill.models.generate import Sampling, generate
        from online_distill.run.export import load_trained

        _, _, teacher, _ = load_trained(run_dir(teachers()[1], work), 0)
        _, _, student, data = load_trained(run_dir(job, work), 0)
        x = data.test.x[:prompts, :16].long()
        errors = []
        with torch.no_grad():
            for who in (student, teacher):
                out = generate(who, x, None, Sampling(max_new_tokens=new), seed=0)
                log_t, log_s = F.log_softmax(teacher(out.tokens), -1), F.log_softmax(student(out.tokens), -1)
                kl = (log_t.exp() * (log_t - log_s)).sum(-1)[:, 15: 15 + new]  # the states of the new tokens
                errors.append(kl.mean(0).cumsum(0))
        done["exposure"] = (errors[0] / errors[1] - 1).tolist()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        json.dump(done, open(path, "w"))
    return done["exposure"]


def write_exposure(work: str) -> None:
    """exposure.csv and exposure.png: the curve of each O2 arm at beta 0.5, per seed and mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for lm in (0.0, 0.5, 1.0):
        for s in SEEDS:
            job = o2(s, lm, 0.5, work)
            if finished(job, work):
                rows += [{"lmbda": lm, "seed": s, "length": i + 1, "excess_error": e}
                         for i, e in enumerate(exposure_curve(job, work))]
    if not rows:
        return
    curve = pd.DataFrame(rows)
    curve.to_csv(os.path.join(HERE, "exposure.csv"), index=False)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for lm, g in curve.groupby("lmbda"):
        m = g.groupby("length")["excess_error"].agg(["mean", "std"])
        ax.plot(m.index, 100 * m["mean"], label=f"lambda {lm:g} ({g['seed'].nunique()} seeds)")
        ax.fill_between(m.index, 100 * (m["mean"] - m["std"]), 100 * (m["mean"] + m["std"]), alpha=0.2)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("generated length (bytes)")
    ax.set_ylabel("excess accumulated error, own vs teacher prefixes (%)")
    ax.set_title("Exposure bias (MiniLLM's ExAccErr) of gpt_tiny students on fortunes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "exposure.png"), dpi=110)


# ---- tables -------------------------------------------------------------------------------------

def _run_config(d: str) -> dict:
    import yaml

    return yaml.safe_load(open(os.path.join(d, "config.yaml")))


def job_rows(job: Job, work: str) -> list[dict]:
    d = run_dir(job, work)
    final = pd.read_csv(os.path.join(d, "final.csv"))
    history = pd.read_csv(os.path.join(d, "metrics.csv"))
    last = history[history["epoch"] == history["epoch"].max()]
    steps = int(job.sets.get("train.max_steps_per_epoch", 0)) or None
    base = {"claim": job.claim, "arm": job.arm, "stage": job.stage, "seed": job.seed, "job": job.name,
            "lr": job.sets.get("optim.lr"), "steps": steps, "divergence": _run_config(d)["loss"]["divergence"],
            "wall_s": float(history.groupby("epoch")["step_time_mean_s"].mean().sum()) * (steps or 200)}
    for k in ("generate_share", "teacher_share", "learn_share"):
        if k in last:
            base[k] = float(last[k].mean())
    rows = []
    for _, r in final.iterrows():
        if r["member"] == "ensemble":
            continue
        row = {**base, "member": r["member"], **{k: r[k] for k in ("val_bpb", "test_bpb") if k in r}}
        mine = last[last["member"] == r["member"]]
        for k in ("val_gen_teacher_nll", "val_gen_reverse_kl", "val_gen_repetition"):
            if k in mine:
                row[k] = float(mine[k].iloc[0])
        if job.claim == "O1":
            row["val_exact"], row["test_exact"] = exact_match(job, work, "val"), exact_match(job, work, "test")
            if job.stage == "confirm":  # the trajectory: after the shared off-policy epoch, and each one after
                row.update({f"test_exact_epoch{e}": exact_match(job, work, "test", e) for e in (1, 2, 3)})
        if job.claim in ("O2", "O3"):
            row["judge_nll"] = judge_nll(job, work)[r["member"]]
        rows.append(row)
    return rows


def collect(work: str) -> pd.DataFrame:
    rows = [r for stage in plan(work)[1:] for job in stage if finished(job, work) for r in job_rows(job, work)]
    failures(work).to_csv(os.path.join(HERE, "failed.csv"), index=False)
    return pd.DataFrame(rows)


COMPARISONS = [  # claim, method, baseline, column (exact match: higher is better; NLL, bits: lower), bar
    ("O1", "on", "off", "test_exact", "+2 pt, every seed > 0"),
    ("O1", "on", "off_equal_time", "test_exact", "reported"),
    ("O2", "l1_b0.5", "l0_b0.5", "val_gen_teacher_nll", "every seed < 0"),
    ("O2", "l1_b0", "l0_b0", "val_gen_teacher_nll", "every seed < 0"),
    ("O2", "l1_b1", "l0_b1", "val_gen_teacher_nll", "every seed < 0"),
    ("O2", "l0.5_b0.5", "l0_b0.5", "val_gen_teacher_nll", "reported"),
    ("O2", "l1_b0.5", "l0_b0.5", "test_bpb", "reported"),
    ("O3", "on_dml", "dml", "judge_nll", "reported"),
    ("O3", "on_dml", "independent", "judge_nll", "reported"),
    ("O3", "on_dml", "dml", "test_bpb", "reported"),
]


def write_tables(runs: pd.DataFrame) -> None:
    per_seed, summary, unfinished = [], [], []
    for claim, method, baseline, column, bar in COMPARISONS:
        p = paired(runs, method, baseline, column) if column in runs else pd.DataFrame()
        if len(p) < len(SEEDS):  # listed in table.md as not finished, never as a result
            unfinished.append(f"{claim} {method} vs {baseline} ({column}): {len(p)} of {len(SEEDS)} seed pairs")
            continue
        scale = 100.0 if column.endswith("exact") else 1.0  # exact match in points
        p["delta"] = p["delta"] * scale
        per_seed.append(p.rename(columns={method: "method_value", baseline: "baseline_value"}).assign(
            claim=claim, method=method, baseline=baseline, metric=column))
        d = p["delta"]
        met = {"+2 pt, every seed > 0": bool(d.mean() >= 2 and (d > 0).all()),
               "every seed < 0": bool((d < 0).all())}.get(bar)
        summary.append({"claim": claim, "method": method, "baseline": baseline, "delta_mean": round(d.mean(), 4),
                        "delta_std": round(d.std(ddof=1), 4) if len(d) > 1 else float("nan"), "n_pairs": len(d),
                        "bar": f"{column}{' (pt)' if scale != 1 else ''}: {bar}", "met": met})
    per_seed_df, summary_df = pd.concat(per_seed), pd.DataFrame(summary)
    per_seed_df.to_csv(os.path.join(HERE, "per_seed.csv"), index=False)
    summary_df.to_csv(os.path.join(HERE, "summary_rows.csv"), index=False)
    plot_paired(per_seed_df.assign(delta=per_seed_df["delta"] * [(-1 if m.endswith(("nll", "bpb")) else 1)
                                                                for m in per_seed_df["metric"]]),
                summary_df, os.path.join(HERE, "summary.png"), delta="delta",
                xlabel="paired delta per seed, signed so that right is better (O1: exact-match points; O2, O3: "
                       "minus the NLL / bits-per-byte delta)",
                title="On-policy distillation (green: bar met, red: missed, grey: reported)")
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write(table_md(runs, summary_df, unfinished))


def table_md(runs: pd.DataFrame, summary: pd.DataFrame, unfinished: list[str]) -> str:
    confirm = runs[runs["stage"] == "confirm"]
    cols = [c for c in ("test_exact", "test_exact_epoch1", "test_exact_epoch2", "test_exact_epoch3",
                        "val_gen_teacher_nll", "val_gen_reverse_kl", "val_gen_repetition", "judge_nll",
                        "test_bpb", "wall_s", "generate_share", "teacher_share") if c in confirm]
    agg = confirm.groupby(["claim", "arm"])[cols].agg(["mean", "std"])
    lines = ["# On-policy distillation: results", "",
             "Made by `python benchmarks/onpolicy/onpolicy.py tables --work WORK` from the runs of `... run`.", "",
             "## Per arm (confirm seeds 0, 1, 2: mean +- std over seeds and peers)", "",
             "| claim | arm | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for (claim, arm), r in agg.iterrows():
        cells = [f"{r[(c, 'mean')]:.4f} +- {r[(c, 'std')]:.4f}" if pd.notna(r[(c, "mean")]) else "" for c in cols]
        lines.append(f"| {claim} | {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired comparisons", "", "| claim | method | baseline | delta mean | delta std | n | bar | met |",
              "|---|---|---|---|---|---|---|---|"]
    for _, s in summary.iterrows():
        lines.append(f"| {s['claim']} | {s['method']} | {s['baseline']} | {s['delta_mean']:+.4f} | {s['delta_std']:.4f} | "
                     f"{s['n_pairs']} | {s['bar']} | {s['met']} |")
    if unfinished:
        lines += ["", "Not finished in the time this session had (the runs resume: `... run --work WORK`):", ""]
        lines += [f"- {u}" for u in unfinished]
    search = runs[(runs["stage"] == "search") & (runs["claim"] == "O1")]
    if len(search):
        lines += ["", "## O1 search (seed 100, picked on validation exact match)", "",
                  "| arm | lr | divergence | val exact |", "|---|---|---|---|"]
        for _, r in search.iterrows():
            lines.append(f"| {r['arm']} | {r['lr']} | {r['divergence']} | {r['val_exact']:.4f} |")
    return "\n".join(lines) + "\n"


def tables(work: str) -> None:
    runs = collect(work)
    runs.to_csv(os.path.join(HERE, "runs.csv"), index=False)
    write_tables(runs)
    write_exposure(work)


def main(argv=None) -> int:
    return jobs_main(argv, prog="python benchmarks/onpolicy/onpolicy.py", doc=__doc__, tag="onpolicy", plan=plan,
                     tables=tables, smoke=SMOKE, smoke_sets={"train.max_steps_per_epoch": 4, "data.val_size": 64})


if __name__ == "__main__":
    sys.exit(main())
