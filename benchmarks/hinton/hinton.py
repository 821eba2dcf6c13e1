"""Hinton, Vinyals & Dean (2015), section 3, on Fashion-MNIST, and mutual learning where it is meant
to pay: every run is an `online-distill train` command (printed in the log), two at a time.

    python benchmarks/hinton/hinton.py run --work /tmp/hinton          # ~5 h on 2 CPU cores
    python benchmarks/hinton/hinton.py tables --work /tmp/hinton       # CSVs and tables here

Claims (test accuracy at the last epoch, 3 fresh seeds, paired seed by seed with the same
student trained on hard labels after the same learning-rate search; every setting picked on the
validation split, with search seed 100):
- H1 full data: the unregularized 800-800 MLP taught by a stronger teacher vs on hard labels;
- H2 transfer set: the same student on 3% of the training images (1,650), soft vs hard targets;
- H3 omitted class: the student never sees class 3 (dress); how many dresses it gets right, and
  after the paper's bias shift (here chosen on validation);
- H4 mutual learning: 800-800 MLPs on 3% (and 10%) of the images, DML (a cohort of 2 to 8) vs
  independent peers, each arm's best setting; on 3% also with jitter and dropout searched, the
  ensemble of 8 independent peers (what DML's pick distils) against its own peers, and a second
  round with small CNNs as the peers.
The teacher is the ensemble of a DML cohort of two small CNNs trained on all 55,000 images with
2-pixel jitter (configs/teacher.yaml), whose logits are cached once per example.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
from dataclasses import replace

import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # benchmarks.tools, when run as a script
from benchmarks.tools.jobs import main as jobs_main  # noqa: E402
from benchmarks.tools.jobs import Job, failures, finished, plot_paired, run_dir, summary_of  # noqa: E402
from benchmarks.tools.jobs import paired as paired_raw  # noqa: E402
SEARCH_SEED, SEEDS = 100, (0, 1, 2)
LRS = (0.01, 0.03, 0.1)
PEER_LRS = (*LRS, 0.3)
"""H4's grid, one step wider for DML and independent peers alike: 0.1 was the independent peers'
pick, at the grid's edge."""
TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
OMITTED = 3  # Fashion-MNIST's "dress"
SUBSETS = {"3pct": 1650, "10pct": 5500}  # of the 55,000 training images left after validation
DML_LOSSES: dict[str, dict] = {"hinton3": {"loss.temperature": 3.0, "loss.kd_weight": 0.5, "loss.ce_weight": None},
              "sum1": {"loss.temperature": 1.0, "loss.kd_weight": 1.0, "loss.ce_weight": 1.0}}
"""DML's forms: Hinton's convex mix at T 3, and the DML paper's CE + KL at T 1."""
DML_LOSSES_3PCT = {
    "hinton3w9": {"loss.temperature": 3.0, "loss.kd_weight": 0.9, "loss.ce_weight": None},
    "ens3": {"loss.temperature": 3.0, "loss.kd_weight": 0.5, "loss.ce_weight": None, "loss.multi_teacher": "mean_probs"},
    "ens3w9": {"loss.temperature": 3.0, "loss.kd_weight": 0.9, "loss.ce_weight": None, "loss.multi_teacher": "mean_probs"},
    "ens1": {"loss.temperature": 1.0, "loss.kd_weight": 1.0, "loss.ce_weight": 1.0, "loss.multi_teacher": "mean_probs"}}
"""On 3% (the bar's regime) DML also searched a stronger pull: Hinton's 0.1 CE + 0.9 T^2 KL, and
each peer taught by the other peers' ensemble (the mean of their probabilities, a cohort of 4),
at the two learning rates that trained (0.03, 0.1); the ensemble forms also with a cohort of 8."""
CEILING_PEERS = 8
"""H4 on 3%: the independent pick also as a cohort of 8 on the confirm seeds; the ensemble of 8
peers trained apart is what DML's pick (8 peers, each taught by the other 7's ensemble) distils,
so its gain over its own peers bounds what that distillation has to give."""
COHORTS = (2, 4)
"""DML cohort sizes searched: the DML paper's gains grow with the number of peers."""
STUDENT = "mlp(hidden=[800, 800])"
JITTER = 2
"""H4 on 3%: both arms search jitter by up to 2 pixels (data.shift) beside none."""
CNN_PEER, CNN_PEERS, CNN_LRS = "small_cnn", 4, (0.03, 0.1, 0.3, 1.0)
"""H4 on 3%, a second round: the peers are small CNNs (94k parameters, also large for 1,650
images), 4 to a cohort; both arms search the learning rate alone, and DML keeps the first round's
picked form (each peer taught by the other peers' ensemble at T 3). Batch norm trains them at
rates the MLPs diverge at: 0.3 was both arms' pick at the edge of the first grid, so 1.0 joined."""
DROPOUT_STUDENT = "mlp(hidden=[800, 800], dropout=0.5, input_dropout=0.2)"
"""H4 on 3%: both arms also search Hinton's dropout."""
SMOKE: dict = {}
"""--smoke: every run cut to one epoch on a little data, to check the pipeline in minutes."""
CONFIGS = os.path.join("benchmarks", "hinton", "configs")


# ---- the arms ----------------------------------------------------------------------------------

def teacher_job() -> Job:
    return Job("teacher", "teacher", os.path.join(CONFIGS, "teacher.yaml"), SEARCH_SEED)


def student_sets(regime: str) -> dict:
    """The student's data: all of it, a transfer subset (its own seed), or all but one class."""
    if regime == "full":
        return {}
    if regime == "omit":
        return {"data.exclude_classes": [OMITTED]}
    return {"data.train_subset": SUBSETS[regime], "data.subset_seed": 1, "train.epochs": 60}


def hard_job(regime: str, seed: int, lr: float) -> Job:
    claim = {"full": "H1", "3pct": "H2", "omit": "H3"}[regime]
    return Job(claim, f"hard_{regime}", os.path.join(CONFIGS, "student.yaml"), seed, {**student_sets(regime), "optim.lr": lr}, {"lr": lr})


def kd_job(regime: str, seed: int, lr: float, t: float, work: str) -> Job:
    claim = {"full": "H1", "3pct": "H2", "omit": "H3"}[regime]
    sets = {**student_sets(regime), "optim.lr": lr, "loss.temperature": t, "distill.mode": "offline",
            "distill.teacher_checkpoint": os.path.join(work, "runs", teacher_job().name),
            "distill.teacher_ensemble": True, "distill.cache_teacher": True}
    return Job(claim, f"kd_{regime}", os.path.join(CONFIGS, "student.yaml"), seed, sets, {"lr": lr, "T": t})


def peers_job(subset: str, mode: str, seed: int, lr: float, loss: str | None = None, n: int = 2,
              shift: int = 0, dropout: bool = False, model: str = STUDENT) -> Job:
    """Peers on a transfer subset: a DML cohort of n (each learns from the mean of its n - 1 peers'
    KLs), or independent peers (n = 2: each peer trains alone, so the cohort size does not change them);
    `shift`: the training images jittered by up to that many pixels (Hinton's jitter); `dropout`:
    every peer with Hinton's dropout (0.2 on the input, 0.5 after each hidden layer); `model`: the
    peers' model (an arm of its own, "cnn_...", for the CNN peers)."""
    sets = {"data.train_subset": SUBSETS[subset], "distill.mode": mode, "optim.lr": lr,
            **({"train.epochs": 40} if subset == "10pct" else {}), **({**DML_LOSSES, **DML_LOSSES_3PCT}[loss] if loss else {}),
            **({"models": [DROPOUT_STUDENT if dropout else model] * n, "scale.peers_per_worker": n}
               if n != 2 or dropout or model != STUDENT else {}),
            **({"data.shift": shift} if shift else {})}
    knobs = {"lr": lr, **({"loss": loss} if loss else {}), **({"n": n} if n != 2 else {}),
             **({"jit": shift} if shift else {}), **({"drop": 1} if dropout else {})}
    arm = ("cnn_" if model == CNN_PEER else "") + f"{'dml' if mode == 'dml' else 'ind'}_{subset}"
    return Job("H4", arm, os.path.join(CONFIGS, "peers.yaml"), seed, sets, knobs)


# ---- running ---------------------------------------------------------------------------------------

def confirm(job: Job, **over) -> list[Job]:
    return job.confirm(SEEDS, **over)


REGULARIZERS = {"jit", "drop"}
"""Knobs of a peer search job that regularize it: the bar's regime has neither."""


def peer_search(sub: str, mode: str) -> list[Job]:
    """H4's search on seed 100: the learning rate for both arms (and for DML the loss form and the
    cohort size); on 3% also DML's stronger pulls, and jitter or dropout in both arms."""
    dml = mode == "dml"
    forms = [(loss, n) for loss in DML_LOSSES for n in COHORTS] if dml else [(None, 2)]
    jobs = [peers_job(sub, mode, SEARCH_SEED, lr, loss, n) for lr in PEER_LRS for loss, n in forms]
    if sub != "3pct":
        return jobs
    if dml:
        jobs += [peers_job(sub, mode, SEARCH_SEED, lr, loss, n) for lr in (0.03, 0.1) for loss in DML_LOSSES_3PCT
                 for n in COHORTS if n > 2 or "loss.multi_teacher" not in DML_LOSSES_3PCT[loss]]
        jobs += [peers_job(sub, mode, SEARCH_SEED, lr, loss, 8) for lr in (0.03, 0.1) for loss in ("ens3", "ens1")]
    jobs += [peers_job(sub, mode, SEARCH_SEED, lr, loss, n, JITTER) for lr in (0.03, 0.1) for loss, n in forms]
    return jobs + [peers_job(sub, mode, SEARCH_SEED, lr, loss, n, dropout=True) for lr in (0.03, 0.1) for loss, n in forms]


def cnn_search(mode: str) -> list[Job]:
    """H4's second round on 3%, seed 100: small CNN peers, the learning rate searched alone."""
    return [peers_job("3pct", mode, SEARCH_SEED, lr, "ens3" if mode == "dml" else None, CNN_PEERS, model=CNN_PEER)
            for lr in CNN_LRS]


def plan(work: str) -> list[list[Job]]:
    """The three stages; each later one depends on the picks of the ones before."""
    hard = {r: [hard_job(r, SEARCH_SEED, lr) for lr in LRS] for r in ("full", "3pct")}
    peers = {(sub, mode): peer_search(sub, mode) for sub in SUBSETS for mode in ("dml", "independent")}
    cnn = [cnn_search(mode) for mode in ("dml", "independent")]
    stage1 = [teacher_job(), *itertools.chain(*hard.values()), *itertools.chain(*peers.values()), *itertools.chain(*cnn)]
    kd = {r: [kd_job(r, SEARCH_SEED, lr, t, work) for t in TEMPERATURES for lr in LRS] for r in ("full", "3pct")}
    stage2 = [*itertools.chain(*kd.values())]
    for r, jobs in hard.items():
        best = pick(jobs, work)
        stage2 += confirm(best) if best else []
    best_hard_full = pick(hard["full"], work)
    if best_hard_full:  # the omitted class: H1's picked settings, the one class left out
        stage2 += [hard_job("omit", s, best_hard_full.knobs["lr"]) for s in SEEDS]
    for (sub, mode), jobs in peers.items():  # H4's picks: unregularized peers (the bar), and with jitter or dropout
        best = pick([j for j in jobs if not REGULARIZERS & j.knobs.keys()], work)
        stage2 += confirm(best) if best else []
        if best and (sub, mode) == ("3pct", "independent"):  # the ensemble DML's pick distils, trained apart
            stage2 += [replace(peers_job(sub, mode, s, best.knobs["lr"], n=CEILING_PEERS), label="ind8_3pct") for s in SEEDS]
        best = pick(jobs, work) if sub == "3pct" else None  # the same runs when the picks agree
        stage2 += [replace(j, label=j.arm + "_reg") for j in confirm(best)] if best else []
    for jobs in cnn:
        best = pick(jobs, work)
        stage2 += confirm(best) if best else []
    stage3 = []
    for r, jobs in kd.items():
        best = pick(jobs, work)
        stage3 += confirm(best) if best else []
    best_kd_full = pick(kd["full"], work)
    if best_kd_full:
        stage3 += [kd_job("omit", s, best_kd_full.knobs["lr"], best_kd_full.knobs["T"], work) for s in SEEDS]
    return [stage1, stage2, stage3]


# ---- tables ---------------------------------------------------------------------------------------

def bias_shift(val_logits, val_labels, test_logits, test_labels, cls: int) -> dict:
    """The paper's fix for a class the student never saw: add b to its logit, with b chosen to
    maximize validation accuracy (the paper chose it on test), then score the test set."""
    import torch

    grid = [b / 4 for b in range(0, 81)]  # 0 .. 20 in steps of 0.25

    def acc(z, y, b):
        z = z.clone()
        z[:, cls] += b
        return (z.argmax(1) == y).float().mean().item()

    best = max(grid, key=lambda b: (acc(val_logits, val_labels, b), -b))
    z = test_logits.clone()
    z[:, cls] += best
    right = z.argmax(1) == test_labels
    return {"bias": best, "test_acc": right.float().mean().item(),
            "class_correct": int(right[test_labels == cls].sum()), "class_n": int((test_labels == cls).sum())}


def job_rows(job: Job, work: str) -> list[dict]:
    """runs.csv rows of a finished job: one per member, with its class-3 counts (test), and for
    the omitted class the numbers after the validation-chosen bias shift."""
    import torch

    d = run_dir(job, work)
    final = pd.read_csv(os.path.join(d, "final.csv"))
    per_class = pd.read_csv(os.path.join(d, "per_class.csv"))
    result = json.load(open(os.path.join(d, "result.json")))
    rows = []
    for _, r in final.iterrows():
        pc = per_class[(per_class["split"] == "test") & (per_class["member"] == r["member"])]
        row = {"claim": job.claim, "arm": job.label or job.arm, "stage": job.stage, "seed": job.seed, "job": job.name,
               **{k: job.knobs.get(k) for k in ("lr", "T", "loss")}, "jitter": job.knobs.get("jit", 0),
               "dropout": bool(job.knobs.get("drop", 0)),
               "peers": job.knobs.get("n", 2) if job.claim == "H4" else None,
               "member": r["member"], "model": r["model"],
               "val_acc": r["val_acc"], "val_nll": r["val_nll"], "test_acc": r["test_acc"], "test_nll": r["test_nll"],
               "test_errors": int(round((1 - r["test_acc"]) * pc["n"].sum())),
               f"class{OMITTED}_correct": int(pc[pc["class"] == OMITTED]["correct"].sum()),
               "epochs": int(result["metrics"].get("epoch", 0))}
        if job.arm.endswith("_omit") and r["member"] != "ensemble":
            preds = torch.load(os.path.join(d, "predictions.pt"), weights_only=True)
            p = int(r["member"][4:])
            shift = bias_shift(preds["val"]["logits"][p], preds["val"]["labels"], preds["test"]["logits"][p],
                               preds["test"]["labels"], OMITTED)
            row.update(shifted_bias=shift["bias"], shifted_test_acc=shift["test_acc"],
                       shifted_class_correct=shift["class_correct"])
        rows.append(row)
    return rows


def recorded(name: str) -> pd.DataFrame:
    """A committed file of this folder (runs.csv, peer_terms.csv, failed.csv), or an empty frame."""
    path = os.path.join(HERE, name)
    return pd.read_csv(path) if os.path.exists(path) and os.path.getsize(path) > 1 else pd.DataFrame()


def pick(jobs: list[Job], work: str) -> Job | None:
    """The search job with the best mean validation accuracy over its peers at the last epoch:
    read from its run in `work`, or, for a run that folder does not hold, from the committed
    runs.csv. So a work folder with only a new arm's runs plans and tables like the whole one
    (a diverged or failed setting has no rows, and is never picked)."""
    runs = recorded("runs.csv")

    def score(job: Job) -> float | None:
        if finished(job, work):
            return summary_of(job, work)["val_acc"]
        r = runs[(runs["job"] == job.name) & (runs["member"] != "ensemble")] if len(runs) else runs
        return float(r["val_acc"].mean()) if len(r) else None

    scored = [(v, j) for j in jobs if j.stage == "search" for v in [score(j)] if v is not None]
    return max(scored, key=lambda vj: vj[0])[1] if scored else None


def collect(work: str) -> pd.DataFrame:
    """runs.csv's rows: every planned run's, from `work` where it ran there, else as committed."""
    rows, kept = [], recorded("runs.csv")
    for stage in plan(work):
        for job in stage:
            if finished(job, work):
                rows += job_rows(job, work)
            elif len(kept):
                rows += kept[(kept["job"] == job.name) & (kept["arm"] == (job.label or job.arm))].to_dict("records")
    runs = pd.DataFrame(rows).drop_duplicates(["arm", "job", "member"])
    failed = pd.concat([recorded("failed.csv"), failures(work)], ignore_index=True)
    if len(failed):
        failed = failed.drop_duplicates("job", keep="last")
        failed = failed[~failed["job"].isin(runs.get("job", []))]
    failed.to_csv(os.path.join(HERE, "failed.csv"), index=False)
    return runs


def paired(runs: pd.DataFrame, method: str, baseline: str, column: str = "test_acc") -> pd.DataFrame:
    """Per confirm seed: both arms' mean-over-peers test accuracy and the delta in points."""
    p = paired_raw(runs, method, baseline, column)
    return p.assign(delta_pt=100 * p.pop("delta"))


COMPARISONS = [  # claim, method, baseline, bar (pt), what it shows
    ("H1", "kd_full", "hard_full", 0.3, "800-800 MLP taught by the CNN ensemble vs on hard labels, all 55,000 images"),
    ("H2", "kd_3pct", "hard_3pct", 1.5, "the same student on a 3% transfer set: the teacher's soft targets vs hard labels"),
    ("H3", "kd_omit", "hard_omit", 0.0, "the student never sees class 3 (dress): taught vs on hard labels"),
    ("H4", "dml_3pct", "ind_3pct", 0.3, "two 800-800 MLPs on 3% of the images: DML vs independent peers"),
    ("H4", "dml_10pct", "ind_10pct", None, "the same on 10% of the images (reported, no bar)"),
    ("H4", "dml_3pct_reg", "ind_3pct_reg", None, "3%, each arm's best with jitter or dropout searched too (reported)"),
    ("H4", "dml_3pct", "ind8_3pct", None, "DML's pick (8 peers) vs 8 independent peers (reported)"),
    ("H4", "cnn_dml_3pct", "cnn_ind_3pct", 0.3, "second round: 4 small CNNs on 3% of the images, DML vs independent"),
]
ENSEMBLES = [  # claim, arm: the ensemble of peers trained apart vs those peers, what DML can pass on
    ("H4", "ind8_3pct"), ("H4", "cnn_ind_3pct")]


def tables(work: str) -> None:
    runs = collect(work)
    runs.to_csv(os.path.join(HERE, "runs.csv"), index=False)
    peer_terms(runs, work).to_csv(os.path.join(HERE, "peer_terms.csv"), index=False)
    write_tables(runs)


def peer_terms(runs: pd.DataFrame, work: str) -> pd.DataFrame:
    """H4's training terms by epoch, mean over peers, for every confirm run on 3%: the peer term
    (train_kd, the divergence before T^2) beside the CE, which says how much the peers still
    have to teach each other."""
    jobs = runs[(runs["claim"] == "H4") & (runs["stage"] == "confirm") & runs["arm"].isin(["dml_3pct", "ind_3pct"])]
    out, kept = [], recorded("peer_terms.csv")
    for job in jobs["job"].unique():
        path = os.path.join(work, "runs", job, "metrics.csv")
        if not os.path.exists(path):  # a run this work folder does not hold: its committed rows
            out += [kept[kept["job"] == job]] if len(kept) else []
            continue
        m = pd.read_csv(path)
        g = m.groupby("epoch")[["train_ce", "train_kd"]].mean().reset_index()
        out.append(g.assign(job=job))
    return pd.concat(out, ignore_index=True)[["job", "epoch", "train_ce", "train_kd"]] if out else pd.DataFrame()


def write_tables(runs: pd.DataFrame) -> None:
    """per_seed.csv, summary_rows.csv (the rows benchmarks/summary.csv takes) and table.md, from
    runs.csv alone (bench tables rebuild them byte for byte)."""
    per_seed, summary = [], []
    for claim, method, baseline, bar, what in COMPARISONS:
        p = paired(runs, method, baseline)
        if p.empty:
            continue
        per_seed.append(p.assign(claim=claim, method=method, baseline=baseline).rename(
            columns={method: "method_acc", baseline: "baseline_acc"}))
        d = p["delta_pt"]
        met = bool(d.mean() >= bar and (d > 0).all()) if claim != "H3" and bar is not None else None
        summary.append({"claim": claim, "method": method, "baseline": baseline, "delta_mean": round(d.mean(), 2),
                        "delta_std": round(d.std(ddof=1), 2) if len(d) > 1 else float("nan"), "n_pairs": len(d),
                        "bar": "reported" if bar is None else f">= +{bar}, all > 0" if claim != "H3" else
                        "class 3: >= 700 of 1000 right (mean)",
                        "met": met})
    for claim, arm in ENSEMBLES:
        p = ensemble_gain(runs, arm)
        if p.empty:
            continue
        per_seed.append(p.assign(claim=claim, method=f"{arm}_ensemble", baseline=arm))
        d = p["delta_pt"]
        summary.append({"claim": claim, "method": f"{arm}_ensemble", "baseline": arm, "delta_mean": round(d.mean(), 2),
                        "delta_std": round(d.std(ddof=1), 2) if len(d) > 1 else float("nan"), "n_pairs": len(d),
                        "bar": "reported", "met": None})
    per_seed_df = pd.concat(per_seed, ignore_index=True) if per_seed else pd.DataFrame()
    summary_df = pd.DataFrame(summary)
    h3 = omitted_class(runs)
    if not h3.empty and len(summary_df):  # the bar: 70% of the never-seen class right, mean over the seeds
        right = h3["kd_omit_class_correct"].mean()
        summary_df.loc[summary_df["claim"] == "H3", "met"] = bool(right >= 700)
    per_seed_df.to_csv(os.path.join(HERE, "per_seed.csv"), index=False)
    if len(per_seed_df):
        plot_paired(per_seed_df, summary_df, os.path.join(HERE, "summary.png"), delta="delta_pt",
                    xlabel="paired delta of test accuracy (points), per seed; dashed: the bar",
                    title="Hinton et al. 2015 on Fashion-MNIST (green: bar met)",
                    bars={("H1", "kd_full"): [0.3], ("H2", "kd_3pct"): [1.5], ("H4", "dml_3pct", "ind_3pct"): [0.3],
                          ("H4", "cnn_dml_3pct"): [0.3]})
    summary_df.to_csv(os.path.join(HERE, "summary_rows.csv"), index=False)
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write(table_md(runs, per_seed_df, summary_df, h3))


def ensemble_gain(runs: pd.DataFrame, arm: str) -> pd.DataFrame:
    """Per confirm seed: the test accuracy of the ensemble of an arm's peers against their mean,
    in points. For peers trained apart, this is what a cohort's ensemble knows beyond each peer:
    what DML, which teaches each peer the others' predictions, has to pass on."""
    r = runs[(runs["arm"] == arm) & (runs["stage"] == "confirm")]
    ens = r[r["member"] == "ensemble"].groupby("seed")["test_acc"].first()
    peers = r[r["member"] != "ensemble"].groupby("seed")["test_acc"].mean()
    seeds = sorted(set(ens.index) & set(peers.index))
    return pd.DataFrame({"seed": seeds, "method_acc": [ens[s] for s in seeds], "baseline_acc": [peers[s] for s in seeds],
                         "delta_pt": [100 * (ens[s] - peers[s]) for s in seeds]})


def omitted_class(runs: pd.DataFrame) -> pd.DataFrame:
    r = runs[(runs["stage"] == "confirm") & runs["arm"].isin(["kd_omit", "hard_omit"]) & (runs["member"] != "ensemble")]
    if r.empty:
        return pd.DataFrame()
    out = []
    for seed, g in r.groupby("seed"):
        row = {"seed": seed}
        for arm, a in g.groupby("arm"):
            row.update({f"{arm}_class_correct": int(a[f"class{OMITTED}_correct"].iloc[0]),
                        f"{arm}_test_acc": float(a["test_acc"].iloc[0]),
                        f"{arm}_shifted_class_correct": int(a["shifted_class_correct"].iloc[0]),
                        f"{arm}_shifted_test_acc": float(a["shifted_test_acc"].iloc[0]),
                        f"{arm}_bias": float(a["shifted_bias"].iloc[0])})
        out.append(row)
    return pd.DataFrame(out)


def _ms(values, scale: float = 100.0, digits: int = 2) -> str:
    v = pd.Series(values, dtype=float) * scale
    return f"{v.mean():.{digits}f} +- {v.std(ddof=1):.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def table_md(runs: pd.DataFrame, per_seed: pd.DataFrame, summary: pd.DataFrame, h3: pd.DataFrame) -> str:
    confirm = runs[(runs["stage"] == "confirm") & (runs["member"] != "ensemble")]

    def arm(a):
        g = confirm[confirm["arm"] == a].groupby("seed").mean(numeric_only=True)
        return g

    lines = ["# Hinton et al. 2015 (section 3) on Fashion-MNIST: the paper's table and ours", "",
             "Built from runs.csv by `python benchmarks/hinton/hinton.py tables`. Test numbers at the last epoch, "
             "mean +- std over seeds 0, 1, 2; settings picked on validation (seed 100).", "",
             "| model | paper (MNIST): test errors | ours (Fashion-MNIST): test errors / 10,000 | test accuracy (%) | test NLL |",
             "| --- | ---: | ---: | ---: | ---: |"]
    teacher = runs[(runs["arm"] == "teacher")]
    if len(teacher):
        ens = teacher[teacher["member"] == "ensemble"].iloc[0]
        peers = teacher[teacher["member"] != "ensemble"]
        lines.append(f"| teacher: ensemble of 2 small CNNs (a DML cohort, 20 epochs), seed 100 | 67 (1200-1200, dropout, jitter) | "
                     f"{int(ens['test_errors'])} | {100 * ens['test_acc']:.2f} | {ens['test_nll']:.3f} |")
        lines.append(f"| its peers (each a small CNN) | | {peers['test_errors'].mean():.0f} | "
                     f"{100 * peers['test_acc'].mean():.2f} | {peers['test_nll'].mean():.3f} |")
    for name, paper, a in (("800-800 MLP on hard labels", "146", "hard_full"),
                           ("800-800 MLP distilled (soft targets, 0.1 CE + 0.9 T^2 KL)", "74 (T = 20)", "kd_full"),
                           ("hard labels, 3% transfer set", "- (speech: 44.5% vs 57%)", "hard_3pct"),
                           ("distilled, 3% transfer set", "", "kd_3pct"),
                           ("hard labels, class 3 never seen", "", "hard_omit"),
                           ("distilled, class 3 never seen", "206 (bias shift: 109)", "kd_omit")):
        g = arm(a)
        if g.empty:
            continue
        picked = runs[(runs["arm"] == a) & (runs["stage"] == "confirm")]["T"].dropna()
        t = picked.iloc[0] if len(picked) else None
        label = name + (f", T = {t:g}" if t is not None and not math.isnan(t) else "")
        lines.append(f"| {label} | {paper} | {_ms(g['test_errors'], 1, 0)} | {_ms(g['test_acc'])} | "
                     f"{_ms(g['test_nll'], 1, 3)} |")
    if not h3.empty:
        lines += ["", f"Class {OMITTED} (dress, 1,000 test images) when the student never saw one (per seed):", "",
                  "| seed | hard labels: right | distilled: right | distilled after bias shift (b chosen on validation): right | b | test acc after shift |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for _, r in h3.iterrows():
            lines.append(f"| {int(r['seed'])} | {int(r.get('hard_omit_class_correct', -1))} | "
                         f"{int(r.get('kd_omit_class_correct', -1))} | {int(r.get('kd_omit_shifted_class_correct', -1))} | "
                         f"{r.get('kd_omit_bias', float('nan')):g} | {100 * r.get('kd_omit_shifted_test_acc', float('nan')):.2f} |")
    if not summary.empty:
        lines += ["", "Paired deltas (test accuracy, points), seed by seed:", "",
                  "| claim | method vs baseline | per seed | mean +- std | bar | met |", "| --- | --- | --- | ---: | --- | --- |"]
        for _, s in summary.iterrows():
            d = per_seed[(per_seed["claim"] == s["claim"]) & (per_seed["method"] == s["method"])
                         & (per_seed["baseline"] == s["baseline"])]["delta_pt"]
            lines.append(f"| {s['claim']} | {s['method']} vs {s['baseline']} | {', '.join(f'{v:+.2f}' for v in d)} | "
                         f"{s['delta_mean']:+.2f} +- {s['delta_std']:.2f} | {s['bar']} | "
                         f"{'yes' if s['met'] else 'no' if s['met'] is not None else '-'} |")
    failed = os.path.join(HERE, "failed.csv")
    if os.path.exists(failed) and os.path.getsize(failed) > 1:
        f = pd.read_csv(failed)
        lines += ["", "Search settings that diverged (stopped at once by the NaN guard, nothing saved; never picked):", ""]
        lines += [f"- `{r.job}`: {r.why.split('NonFiniteError: ')[-1].split(';')[0]}" for r in f.itertuples()]
    search = runs[(runs["stage"] == "search") & (runs["member"] != "ensemble")]
    if len(search):
        lines += ["", "The search (seed 100, mean over peers, last epoch): the pick is the best validation accuracy. "
                  "H4's peers: DML loss forms hinton3 (T 3, 0.5 CE + 0.5 T^2 KL), sum1 (CE + KL at T 1), hinton3w9 "
                  "(0.1 CE + 0.9 T^2 KL), ens3 / ens3w9 / ens1 (hinton3 / hinton3w9 / sum1 against the mean of the other peers' "
                  "probabilities); peers: the cohort's size; jitter: data.shift; dropout: 0.2 input, 0.5 hidden.", "",
                  "| arm | lr | T | DML loss | peers | jitter | dropout | val acc | val NLL |",
                  "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
        keys = ["arm", "lr", "T", "loss", "peers", "jitter", "dropout"]
        g = search.groupby(keys, dropna=False)[["val_acc", "val_nll"]].mean().reset_index()
        for _, r in g.sort_values(["arm", "val_acc"], ascending=[True, False]).iterrows():
            t = "" if pd.isna(r["T"]) else f"{r['T']:g}"
            loss = "" if pd.isna(r["loss"]) else r["loss"]
            h4 = r["arm"].startswith(("dml", "ind", "cnn_"))
            peers, jit = (f"{r['peers']:g}", f"{r['jitter']:g}") if h4 else ("", "")
            drop = ("yes" if r["dropout"] else "no") if h4 else ""
            lines.append(f"| {r['arm']} | {r['lr']:g} | {t} | {loss} | {peers} | {jit} | {drop} | {r['val_acc']:.4f} | "
                         f"{r['val_nll']:.3f} |")
    return "\n".join(lines) + "\n"


def recorded_jobs() -> set[str]:
    """The runs the committed tables hold, finished (runs.csv) or diverged (failed.csv)."""
    return {job for name in ("runs.csv", "failed.csv") for job in recorded(name).get("job", [])}


def main(argv=None) -> int:
    return jobs_main(argv, prog="python benchmarks/hinton/hinton.py", doc=__doc__, tag="hinton", plan=plan, tables=tables,
                     smoke=SMOKE, smoke_sets={"train.epochs": 1, "train.max_steps_per_epoch": 5, "data.test_subset": 500, "data.val_size": 500},
                     recorded=recorded_jobs)


if __name__ == "__main__":
    sys.exit(main())
