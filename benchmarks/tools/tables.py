"""The tables of benchmarks/, rebuilt from CSVs alone (pure pandas, nothing is trained here).

    python -m benchmarks.tools.tables benchmarks --runs benchmarks/raw/gpu/runs.csv
    python -m benchmarks.tools.tables benchmarks      # again, from each claim's own runs.csv

--runs splits a runs.csv of bench.claims (one row per member of each finished trial's last
epoch) into the claims' folders; without it each folder's runs.csv is read. Then per claim:
per_seed.csv (the paired numbers), table.md (mean +- std, paired delta, the search), and for
all claims summary.csv (one row per claim and method) and summary.md. Accuracies are test
accuracy at the last epoch; the search picked its settings on validation accuracy; deltas are
in accuracy points (0.35 = +0.35 pt), paired seed by seed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import pandas as pd

FOLDERS = {"E1": "E1_dml", "E2": "E2_ensemble", "E3": "E3_kd", "E4": "E4_self"}
EXTRA_FOLDERS = {"H": "hinton", "L": "lm", "O": "onpolicy"}
"""Claims built by their own scripts (benchmarks/hinton/hinton.py, benchmarks/lm/lm.py), whose
summary_rows.csv join summary.csv here (benchmarks/onpolicy/onpolicy.py too)."""
TITLES = {"E1": "Deep mutual learning vs the same peers trained independently",
          "E2": "The cohort's ensemble vs its best peer (picked on validation)",
          "E3": "A small student taught by a converged teacher vs the same student from scratch",
          "E4": "Self-distillation vs plain training of the same model"}
SUMMARY_COLUMNS = ["claim", "method", "baseline", "delta_mean", "delta_std", "n_pairs", "bar", "met"]


@dataclass(frozen=True)
class Comparison:
    claim: str
    method: str
    """The arm (runs.csv `arm`) measured, and with which number of it (`metric`)."""
    baseline: str
    metric: str = "mean_peer"
    baseline_metric: str = "mean_peer"
    bar: float = 0.0
    """Points the paired mean must reach (>=), or exceed when `strict`."""
    strict: bool = False
    all_positive: bool = False
    """Also every paired delta > 0."""

    @property
    def name(self) -> str:
        return self.method if self.metric == "mean_peer" else f"{self.method} ({self.metric})"

    @property
    def baseline_name(self) -> str:
        return self.baseline if self.baseline_metric == "mean_peer" else f"{self.baseline} ({self.baseline_metric})"


def comparisons(runs: pd.DataFrame) -> list[Comparison]:
    """The comparisons the runs allow (the bigger cohort's size is read from its arm's name)."""
    arms = set(runs["arm"])
    big = sorted(a for a in arms if a.startswith("dml") and a != "dml2")
    out = [Comparison("E1", "dml2", "independent2", bar=0.3, all_positive=True)]
    out += [Comparison("E1", a, "independent" + a[3:], bar=0.3, all_positive=True) for a in big]
    out += [Comparison("E2", a, a, "ensemble", "best_val_peer", strict=True) for a in ["dml2", *big]]
    # for reference: what an ensemble of peers trained apart gives over its best member
    out += [Comparison("E2", "independent" + a[3:], "independent" + a[3:], "ensemble", "best_val_peer", strict=True)
            for a in ["dml2", *big]]
    out.append(Comparison("E3", "kd_student", "scratch_student", bar=0.5))
    out += [Comparison("E4", m, "plain") for m in ("ema", "snapshot", "dlb", "born_again")]
    return [c for c in out if c.method in arms and c.baseline in arms]


def per_run(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per confirmed run (arm, seed): mean peer, ensemble and best-on-validation peer test accuracy."""
    rows = []
    confirmed = runs[runs["stage"] == "confirm"]
    for (arm, seed), g in confirmed.groupby(["arm", "seed"]):
        peers, ens = g[g["member"] != "ensemble"], g[g["member"] == "ensemble"]
        rows.append({"arm": arm, "seed": int(seed), "mean_peer": peers["test_acc"].mean(),
                     "ensemble": ens["test_acc"].iloc[0] if len(ens) else math.nan,
                     # a tie on validation goes to the lower peer index, whatever the rows' order
                     "best_val_peer": peers.sort_values(["val_acc", "member"], ascending=[False, True],
                                                        kind="stable")["test_acc"].iloc[0],
                     "time_s": g["time_s"].iloc[0], "lr": g["lr"].iloc[0], "form": g["form"].iloc[0],
                     "temperature": g["temperature"].iloc[0]})
    return pd.DataFrame(rows, columns=["arm", "seed", "mean_peer", "ensemble", "best_val_peer", "time_s", "lr",
                                       "form", "temperature"])


def paired(c: Comparison, runs_by_arm: pd.DataFrame) -> pd.DataFrame:
    m = runs_by_arm[runs_by_arm["arm"] == c.method].set_index("seed")
    b = runs_by_arm[runs_by_arm["arm"] == c.baseline].set_index("seed")
    seeds = sorted(set(m.index) & set(b.index))
    return pd.DataFrame({"claim": c.claim, "method": c.name, "baseline": c.baseline_name, "seed": seeds,
                         "method_acc": [m.loc[s, c.metric] for s in seeds],
                         "baseline_acc": [b.loc[s, c.baseline_metric] for s in seeds],
                         "delta": [100 * (m.loc[s, c.metric] - b.loc[s, c.baseline_metric]) for s in seeds]})


def verdict(c: Comparison, deltas: pd.Series) -> dict:
    n = len(deltas)
    mean = float(deltas.mean()) if n else math.nan
    std = float(deltas.std(ddof=1)) if n > 1 else math.nan
    met = n > 0 and (mean > c.bar if c.strict else mean >= c.bar) and (not c.all_positive or bool((deltas > 0).all()))
    return {"claim": c.claim, "method": c.name, "baseline": c.baseline_name, "delta_mean": round(mean, 3),
            "delta_std": round(std, 3), "n_pairs": n, "bar": (">" if c.strict else ">=") + f" {c.bar:g}"
            + (", all > 0" if c.all_positive else ""), "met": bool(met)}


def _pm(values: pd.Series, scale: float = 100.0) -> str:
    v = values.dropna() * scale
    if v.empty:
        return "-"
    return f"{v.mean():.2f} +- {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def claim_table(claim: str, comps: list[Comparison], by_arm: pd.DataFrame, runs: pd.DataFrame,
                summary: pd.DataFrame) -> str:
    lines = [f"# {claim}: {TITLES[claim]}", "",
             "Test accuracy (%) at the last epoch, mean +- std over the confirmation seeds; delta in points,",
             "paired seed by seed. Generated by `python -m benchmarks.tools.tables` from runs.csv.", "",
             "| method | accuracy | baseline | accuracy | paired delta | pairs | bar | met | seconds per run (method / baseline) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        m, b = by_arm[by_arm["arm"] == c.method], by_arm[by_arm["arm"] == c.baseline]
        s = summary[(summary["method"] == c.name) & (summary["baseline"] == c.baseline_name)].iloc[0]
        lines.append(f"| {c.name} | {_pm(m[c.metric])} | {c.baseline_name} | {_pm(b[c.baseline_metric])} | "
                     f"{s['delta_mean']:+.2f} +- {s['delta_std']:.2f} | {s['n_pairs']} | {s['bar']} | "
                     f"{'yes' if s['met'] else 'no'} | {m['time_s'].mean():.0f} / {b['time_s'].mean():.0f} |")
    search = runs[(runs["stage"] == "search") & (runs["member"] != "ensemble")]
    if len(search):
        lines += ["", "## The search (seed 100, validation accuracy %, mean over peers; the pick in bold)", "",
                  "| arm | lr | loss form | T | val acc |", "|---|---|---|---|---|"]
        score = search.groupby(["arm", "lr", "form", "temperature"], dropna=False)["val_acc"].mean().reset_index()
        for arm, g in score.groupby("arm", sort=False):
            best = g["val_acc"].idxmax()
            for i, r in g.iterrows():
                cell = f"{100 * r['val_acc']:.2f}"
                t = "" if pd.isna(r["temperature"]) else f"{r['temperature']:g}"
                form = r["form"] if isinstance(r["form"], str) else ""
                lines.append(f"| {arm} | {r['lr']:g} | {form or '-'} | {t or '-'} | {'**' + cell + '**' if i == best else cell} |")
    return "\n".join(lines) + "\n"


def _x(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def compression_table(cost: pd.DataFrame, runs: pd.DataFrame, by_arm: pd.DataFrame) -> str:
    """E3's student beside its teacher: accuracy, size and CPU latency (compression.csv, from
    `python -m benchmarks.tools.claims cost`)."""
    teacher = runs[(runs["arm"] == "teacher") & (runs["member"] != "ensemble")]["test_acc"]
    acc = {"E3 teacher": _pm(teacher), "E3 student": _pm(by_arm[by_arm["arm"] == "kd_student"]["mean_peer"])}
    lines = ["", "## What the student saves (1 CPU thread; teacher: its one run, seed 100)", "",
             "| role | model | test accuracy (%) | parameters | size (KB) | latency, batch 1 (ms) | us per sample, batch 256 |",
             "|---|---|---|---|---|---|---|"]
    for _, r in cost[cost["role"].isin(acc)].iterrows():
        lines.append(f"| {r['role']} | {r['model']} | {acc[r['role']]} | {r['params']:,} | {r['size_kb']:g} | "
                     f"{r['latency_ms']:.3f} | {r['us_per_sample_b256']:.2f} |")
    t, st = (cost.set_index("role").loc[k] for k in ("E3 teacher", "E3 student"))
    lines += ["", f"The student has {_x(t['params'] / st['params'])} fewer parameters and runs "
              f"{_x(t['us_per_sample_b256'] / st['us_per_sample_b256'])} faster per sample at batch 256 "
              f"({_x(t['latency_ms'] / st['latency_ms'])} at batch 1)."]
    return "\n".join(lines) + "\n"


def _copy_picks(runs_csv: str, dest: str, arms: set[str]) -> None:
    """The claim's arms out of the picks.yaml beside runs.csv: each search's pick and the run
    config it stands for (`online-distill train` runs it, after the teacher path is filled in)."""
    import yaml

    src = os.path.join(os.path.dirname(os.path.abspath(runs_csv)), "picks.yaml")
    if not os.path.exists(src):
        return
    with open(src) as f:
        picks = yaml.safe_load(f) or {}
    mine = {arm: pick for arm, pick in picks.items() if arm in arms}
    if mine:
        with open(dest, "w") as f:
            yaml.safe_dump(mine, f, sort_keys=False)


def build(bench_dir: str, runs_csv: str | None = None) -> pd.DataFrame:
    """Write every claim's files and the summary; returns the summary."""
    if runs_csv:
        runs = pd.read_csv(runs_csv)
        for claim, folder in FOLDERS.items():
            src = "E1" if claim == "E2" else claim
            part = runs[runs["claim"] == src]
            if claim == "E2":
                part = part[part["arm"].str.startswith(("dml", "independent"))]
            if len(part):
                os.makedirs(os.path.join(bench_dir, folder), exist_ok=True)
                part.to_csv(os.path.join(bench_dir, folder, "runs.csv"), index=False)
                _copy_picks(runs_csv, os.path.join(bench_dir, folder, "picks.yaml"), set(part["arm"]))
    summaries, pairs = [], []
    for claim, folder in FOLDERS.items():
        path = os.path.join(bench_dir, folder, "runs.csv")
        if not os.path.exists(path):
            continue
        runs = pd.read_csv(path, keep_default_na=True)
        runs["form"] = runs["form"].astype(object).fillna("")
        by_arm = per_run(runs)
        comps = [c for c in comparisons(runs) if c.claim == claim]
        seeds = pd.concat([paired(c, by_arm) for c in comps], ignore_index=True) if comps else pd.DataFrame()
        summary = pd.DataFrame([verdict(c, seeds[(seeds["method"] == c.name) & (seeds["baseline"] == c.baseline_name)]["delta"])
                                for c in comps], columns=SUMMARY_COLUMNS)
        seeds.to_csv(os.path.join(bench_dir, folder, "per_seed.csv"), index=False, float_format="%.4f")
        pairs.append(seeds)
        text = claim_table(claim, comps, by_arm, runs, summary)
        cost_csv = os.path.join(bench_dir, folder, "compression.csv")
        if os.path.exists(cost_csv):
            text += compression_table(pd.read_csv(cost_csv), runs, by_arm)
        with open(os.path.join(bench_dir, folder, "table.md"), "w") as f:
            f.write(text)
        summaries.append(summary)
    e_summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame(columns=SUMMARY_COLUMNS)
    extra = [pd.read_csv(os.path.join(bench_dir, folder, "summary_rows.csv"))[SUMMARY_COLUMNS]
             for folder in EXTRA_FOLDERS.values() if os.path.exists(os.path.join(bench_dir, folder, "summary_rows.csv"))]
    summary = pd.concat([e_summary, *extra], ignore_index=True) if extra else e_summary
    summary.to_csv(os.path.join(bench_dir, "summary.csv"), index=False)
    md = ["| claim | method | baseline | paired delta | pairs | bar | met |", "|---|---|---|---|---|---|---|"]
    for _, s in summary.iterrows():
        folder = FOLDERS.get(s["claim"]) or EXTRA_FOLDERS[s["claim"][0]]
        if pd.isna(s["delta_mean"]):
            delta = "-"
        elif s["claim"].startswith("L"):  # language models: bits per byte, lower is better
            delta = f"{s['delta_mean']:+.4f} +- {s['delta_std']:.4f} bits/byte"
        elif s["claim"] in ("O2", "O3"):  # on-policy text: the unit is the bar's (nats per token, bits per byte)
            unit = "bits/byte" if "bpb" in s["bar"] else "nats/token"
            delta = f"{s['delta_mean']:+.4f} +- {s['delta_std']:.4f} {unit}"
        else:
            delta = f"{s['delta_mean']:+.2f} +- {s['delta_std']:.2f} pt"
        met = "yes" if str(s["met"]) == "True" else "**no**" if str(s["met"]) == "False" else "-"
        md.append(f"| [{s['claim']}]({folder}/table.md) | {s['method']} | {s['baseline']} | {delta} | {s['n_pairs']} | "
                  f"{s['bar']} | {met} |")
    with open(os.path.join(bench_dir, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    if pairs:
        plot_deltas(pd.concat(pairs, ignore_index=True), e_summary, os.path.join(bench_dir, "summary.png"))
    return summary


def plot_deltas(pairs: pd.DataFrame, summary: pd.DataFrame, path: str) -> None:
    """Every paired delta as a dot, the mean as a bar, each claim's bar as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(summary.itertuples(index=False))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    for y, s in enumerate(rows):
        d = pairs[(pairs["method"] == s.method) & (pairs["baseline"] == s.baseline)]["delta"]
        ax.barh(y, s.delta_mean, color="tab:green" if s.met else "tab:red", alpha=0.35)
        ax.plot(d, [y] * len(d), "o", color="k", ms=4)
        bar = float(s.bar.split()[1].rstrip(","))
        ax.plot([bar, bar], [y - 0.4, y + 0.4], "--", color="tab:blue", lw=1)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{s.claim} {s.method} vs {s.baseline}" for s in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired delta, test accuracy points")
    ax.set_title("dots: seeds; bar: their mean (green: bar met); dashes: the bar", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tools.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_dir")
    ap.add_argument("--runs", default=None, help="a runs.csv of bench.claims to split into the claims' folders first")
    args = ap.parse_args(argv)
    summary = build(args.bench_dir, args.runs)
    print(summary.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
