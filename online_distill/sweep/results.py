"""Tables and pictures of a sweep, rebuilt from what is on disk (Tune's experiment state, each
trial's reported results and its last checkpoint), so `online-distill report SWEEP_DIR` gives
the same files as the end of `online-distill tune`.

- trials.csv     one row per trial: its config values, status, final and best objective, time
- summary.csv    one row per setting over seeds: mean, std, count; paired delta to the baseline
- schedules.csv  the knobs each trial's final model was trained with, epoch by epoch (PBT)
- best_config.yaml   the best setting as a ready-to-run run config
- objective_vs_knobs.png, learning_curves.png
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import pandas as pd

from ..config import files as config_file
from ..run.results import format_table
from ..rundir import storage
from ..rundir.checkpoint import read_history
from .spec import OBJECTIVES, SweepSpec

SEED, BASELINE = "train.seed", "baseline"


@dataclass
class SweepTables:
    trials: pd.DataFrame
    summary: pd.DataFrame
    schedules: pd.DataFrame
    curves: pd.DataFrame
    """Every report of every trial: trial_id, epoch, objective (what Tune saw, in order)."""
    best_config: str | None
    paths: dict[str, str]
    mode: str = "max"
    """'max': a higher objective is better (accuracy); 'min': lower (NLL, bits per byte)."""


def _last_line(err) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    hits = [ln for ln in lines if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]]
    return (hits[-1] if hits else lines[-1] if lines else "")[:300]


def _history(trial) -> list[dict]:
    """The metric history in the trial's last Tune checkpoint: with PBT it starts with the
    epochs of the trials whose weights this one inherited."""
    ckpt = trial.checkpoint
    if ckpt is None:
        return []
    try:
        with ckpt.as_directory() as d:
            return read_history(d)
    except (FileNotFoundError, OSError, ValueError):
        return []


def _objective_by_epoch(history: list[dict], objective: str, metric: str = "acc", mode: str = "max") -> pd.DataFrame:
    """best_peer / mean / ensemble validation `metric` per epoch of a run's history rows."""
    df = pd.DataFrame(history)
    col = f"val_{metric}"
    rows = []
    for epoch, g in df.groupby("epoch", sort=True):
        peers = g[g["member"] != "ensemble"]
        ens = g[g["member"] == "ensemble"]
        best = peers[col].max() if mode == "max" else peers[col].min()
        value = {"best_peer": best, "mean": peers[col].mean(),
                 "ensemble": ens[col].iloc[0] if len(ens) else math.nan}[objective]
        first = peers.iloc[0]
        rows.append({"epoch": int(epoch), "run": first.get("run"), "temperature": first.get("temperature"),
                     "kd_weight": first.get("kd_weight"), "resumed_from_epoch": first.get("resumed_from_epoch"),
                     "objective": value})
    return pd.DataFrame(rows)


def collect(sweep_dir: str, spec: SweepSpec) -> SweepTables:
    from ray.tune import ExperimentAnalysis

    metric, sign = spec.metric, (1 if spec.mode == "max" else -1)
    analysis = ExperimentAnalysis(sweep_dir, default_metric=metric, default_mode=spec.mode)
    frames = analysis.trial_dataframes
    base_epochs = spec.base.train.epochs
    rows, schedules, curves = [], [], []
    for trial in analysis.trials:
        config = dict(trial.config)
        progress = frames.get(trial.trial_id, pd.DataFrame())
        last = trial.last_result or {}
        row = {"trial_id": trial.trial_id, "status": trial.status,
               "role": "baseline" if config.get(BASELINE) else "setting"}
        row.update({k: v for k, v in config.items() if k != BASELINE})
        planned = int(config.get("train.epochs", base_epochs) or base_epochs)
        epochs_run = last.get("epoch", 0) or 0
        row["epochs"] = int(epochs_run)
        row["complete"] = trial.status == "TERMINATED" and epochs_run >= planned
        row["stopped_early"] = trial.status == "TERMINATED" and epochs_run < planned
        if metric in progress.columns and progress[metric].notna().any():
            best_i = (sign * progress[metric]).idxmax()
            row["objective_final"] = float(progress[metric].iloc[-1])
            row["objective_best"] = float(progress.loc[best_i, metric])
            row["best_epoch"] = int(progress.loc[best_i, "epoch"])
            curves.append(pd.DataFrame({"trial_id": trial.trial_id, "report": range(1, len(progress) + 1),
                                        "epoch": progress["epoch"].astype(int), "objective": progress[metric]}))
        else:
            row.update(objective_final=math.nan, objective_best=math.nan, best_epoch=math.nan)
        for name, key in OBJECTIVES.items():
            row[f"final_{name}_val_acc"] = last.get(key, math.nan)
        for name in OBJECTIVES:  # for information only: never the objective, never for selection
            row[f"final_{name}_test_acc"] = last.get(f"{name}/test_acc", math.nan)
        row["time_s"] = last.get("time_total_s", math.nan)
        row["reports"] = len(progress)
        err = trial.get_error() if trial.status == "ERROR" else None
        row["error"] = _last_line(err) if err else ""
        rows.append(row)
        history = _history(trial)
        if history:
            s = _objective_by_epoch(history, spec.objective, spec.metric_name, spec.mode)
            s.insert(0, "trial_id", trial.trial_id)
            schedules.append(s)
    trials = pd.DataFrame(rows)
    schedules_df = pd.concat(schedules, ignore_index=True) if schedules else pd.DataFrame()
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    summary = summarize(trials, setting_columns(trials), sign=sign)
    return SweepTables(trials, summary, schedules_df, curves_df, None, {}, spec.mode)


def setting_columns(trials: pd.DataFrame) -> list[str]:
    """The config columns that tell settings apart: those that vary, other than the seed."""
    skip = {"trial_id", "status", "role", "epochs", "complete", "stopped_early", "objective_final", "objective_best",
            "best_epoch", "time_s", "reports", "error", SEED}
    cols = [c for c in trials.columns if c not in skip and not c.startswith("final_")]
    return [c for c in cols if trials[c].astype(str).nunique() > 1]


def summarize(trials: pd.DataFrame, settings: list[str], sign: int = 1) -> pd.DataFrame:
    """Per setting: objective mean/std/count over its *completed* trials (equal epochs, so
    comparable), how many stopped early or failed, and the delta to the independent baseline
    paired on the seeds both finished."""
    if trials.empty:
        return pd.DataFrame()
    keys = ["role"] + settings
    done = trials[trials["complete"]]
    base = done[done["role"] == "baseline"].set_index(SEED)["objective_best"] if SEED in done else pd.Series(dtype=float)
    out = []
    for key, g in trials.groupby(keys, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        ok = g[g["complete"]]
        row = dict(zip(keys, key))
        row.update(n=len(g), n_complete=len(ok), n_stopped_early=int(g["stopped_early"].sum()),
                   n_error=int((g["status"] == "ERROR").sum()),
                   objective_mean=ok["objective_best"].mean(), objective_std=ok["objective_best"].std(ddof=1),
                   final_mean=ok["objective_final"].mean(), time_s_mean=g["time_s"].mean())
        if row["role"] == "setting" and len(base):
            paired = ok.set_index(SEED)["objective_best"]
            common = paired.index.intersection(base.index)
            diff = paired.loc[common] - base.loc[common]
            row.update(delta_to_baseline=diff.mean() if len(diff) else math.nan,
                       delta_std=diff.std(ddof=1) if len(diff) > 1 else math.nan, n_paired=int(len(diff)))
        out.append(row)
    df = pd.DataFrame(out)
    if "n_paired" in df:
        df["n_paired"] = df["n_paired"].astype("Int64")
    # settings that finished on every seed first: a mean over fewer (the easier) seeds is not comparable
    everywhere = df["n_complete"] == df["n"]
    order = df.assign(_all=everywhere, _score=sign * df["objective_mean"]).sort_values(
        ["_all", "_score"], ascending=False, na_position="last")
    return order.drop(columns=["_all", "_score"]).reset_index(drop=True)


def best_setting(tables: SweepTables) -> dict | None:
    """The setting (not the baseline) with the highest mean objective, among the settings that
    finished on every seed if there are any. (Under ASHA a setting stopped on its hard seed and
    finished on its easy one would otherwise win on the easy seed alone.)"""
    s = tables.summary
    if s.empty:
        return None
    s = s[(s["role"] == "setting") & (s["n_complete"] > 0)]
    everywhere = s[s["n_complete"] == s["n"]]
    s = everywhere if len(everywhere) else s
    return s.iloc[0].to_dict() if len(s) else None


def _same(a, b) -> bool:
    """One setting's value in the trials table and in the summary: a column's dtype may differ
    between the two (3 and 3.0; None and NaN), the value does not."""
    if pd.isna(a) if not isinstance(a, (list, tuple)) else False:
        return not isinstance(b, (list, tuple)) and pd.isna(b)
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def best_config_yaml(spec: SweepSpec, tables: SweepTables) -> str | None:
    best = best_setting(tables)
    if best is None:
        return None
    # the full config of one completed trial of that setting, with the base's seed
    t = tables.trials
    mask = t["complete"] & (t["role"] == "setting")
    for col in setting_columns(t):
        mask &= t[col].map(lambda v, b=best[col]: _same(v, b))
    if not mask.any():
        return None
    trial = t[mask].iloc[0]
    params = {k: trial[k] for k in t.columns if "." in k or k == "models"}
    params = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in params.items() if k != SEED}
    params = {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}
    cfg = spec.trial_config(params, run_name=f"{spec.name}-best", storage_path=spec.base.run.storage_path)
    name = os.path.join(spec.sweep_dir, "best_config.yaml") if "://" not in spec.sweep_dir else f"{spec.sweep_dir}/best_config.yaml"
    delta = best.get("delta_to_baseline", math.nan)
    lines = [f"# online-distill train {name}",
             f"# Best setting of sweep {spec.name!r} by {spec.metric} (best epoch, mean over "
             f"{best['n_complete']} completed seed(s)): {best['objective_mean']:.4f}"
             + (f" +- {best['objective_std']:.4f}" if not math.isnan(best["objective_std"]) else "")
             + (f"; {delta:+.4f} vs the independent baseline on {int(best['n_paired'])} paired seed(s)"
                if isinstance(delta, float) and not math.isnan(delta) else "") + "."]
    return "\n".join(lines) + "\n" + config_file.dump(cfg)


# ---- pictures -------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def plot_objective_vs_knobs(spec: SweepSpec, trials: pd.DataFrame) -> bytes:
    """Best validation objective of each trial against temperature and kd_weight; the
    baseline's mean +- std as a band (it has no temperature)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    base_values = {"loss.temperature": spec.base.loss.temperature, "loss.kd_weight": spec.base.loss.kd_weight}
    settings = trials[trials["role"] == "setting"]
    baseline = trials[(trials["role"] == "baseline") & trials["complete"]]["objective_best"]
    for ax, knob in zip(axes, ("loss.temperature", "loss.kd_weight")):
        x = settings[knob] if knob in settings else pd.Series(base_values[knob], index=settings.index)
        for kind, mask, style in (("completed", settings["complete"], dict(marker="o")),
                                  ("stopped early", settings["stopped_early"], dict(marker="o", facecolors="none")),
                                  ("error", settings["status"] == "ERROR", dict(marker="x"))):
            if mask.any():
                ax.scatter(x[mask].astype(float), settings.loc[mask, "objective_best"], label=kind,
                           color={"completed": "C0", "stopped early": "C1", "error": "C3"}[kind], **style)
        if len(baseline):
            m, s = baseline.mean(), baseline.std(ddof=1) if len(baseline) > 1 else 0.0
            ax.axhline(m, color="k", ls="--", lw=1, label=f"independent baseline ({len(baseline)} seeds)")
            ax.axhspan(m - s, m + s, color="k", alpha=0.08)
        xs = x.astype(float)
        if len(xs) and xs.min() > 0 and xs.max() / xs.min() > 10:
            ax.set_xscale("log")
        ax.set_xlabel(knob)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"best {spec.metric}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"sweep {spec.name}: {spec.metric} (validation) per trial")
    return _png(fig)


def plot_learning_curves(spec: SweepSpec, tables: SweepTables) -> bytes:
    """The objective at every report of every trial (what the scheduler saw); with PBT also the
    temperature and kd_weight each trial's final model was trained with, epoch by epoch."""
    plt = _plt()
    pbt = spec.scheduler.name == "pbt" and not tables.schedules.empty
    fig, axes = plt.subplots(1, 3 if pbt else 1, figsize=(15 if pbt else 7, 4), squeeze=False)
    axes = axes[0]
    by_id = tables.trials.set_index("trial_id")
    for i, (tid, g) in enumerate(tables.curves.groupby("trial_id", sort=False) if not tables.curves.empty else []):
        t = by_id.loc[tid]
        base = t["role"] == "baseline"
        label = f"{tid}: " + ("baseline" if base else f"T={t.get('loss.temperature')} kd={t.get('loss.kd_weight')}") \
            + f" seed {t.get(SEED)}" + (" (stopped)" if t["stopped_early"] else "")
        axes[0].plot(g["epoch"], g["objective"], marker=".", ls="--" if base else "-", color="k" if base else f"C{i % 10}",
                     alpha=0.4 if t["stopped_early"] else 0.9, label=label)
    axes[0].set_title(f"{spec.metric} per report")
    if pbt:
        for i, (tid, g) in enumerate(tables.schedules.groupby("trial_id", sort=False)):
            axes[1].step(g["epoch"], g["temperature"], where="post", color=f"C{i % 10}", label=tid)
            axes[2].step(g["epoch"], g["kd_weight"], where="post", color=f"C{i % 10}")
        axes[1].set_title("temperature followed (final model's lineage)")
        axes[2].set_title("kd_weight followed")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    if len(tables.trials) <= 12:
        axes[0].legend(fontsize=7)
    return _png(fig)


# ---- writing --------------------------------------------------------------------------------

def write(sweep_dir: str, spec: SweepSpec) -> SweepTables:
    tables = collect(sweep_dir, spec)
    paths = {name: storage.join(sweep_dir, name) for name in
             ("trials.csv", "summary.csv", "schedules.csv", "best_config.yaml", "objective_vs_knobs.png",
              "learning_curves.png")}
    storage.write_text(paths["trials.csv"], tables.trials.to_csv(index=False))
    storage.write_text(paths["summary.csv"], tables.summary.to_csv(index=False))
    storage.write_text(paths["schedules.csv"], tables.schedules.to_csv(index=False))
    best = best_config_yaml(spec, tables) if not tables.trials.empty else None
    if best is not None:
        storage.write_text(paths["best_config.yaml"], best)
        tables.best_config = paths["best_config.yaml"]
    if not tables.trials.empty:
        storage.write_bytes(paths["objective_vs_knobs.png"], plot_objective_vs_knobs(spec, tables.trials))
        storage.write_bytes(paths["learning_curves.png"], plot_learning_curves(spec, tables))
    tables.paths = paths
    return tables


def describe(tables: SweepTables, spec: SweepSpec) -> str:
    t = tables.trials
    if t.empty:
        return "no trials"
    counts = (f"{int(t['complete'].sum())} completed, {int(t['stopped_early'].sum())} stopped early, "
              f"{int((t['status'] == 'ERROR').sum())} errored, "
              f"{int((~t['status'].isin(['TERMINATED', 'ERROR'])).sum())} not finished")
    cols = [c for c in tables.summary.columns if c not in ("final_mean", "time_s_mean")]
    text = f"\nsweep {spec.name!r}: {len(t)} trials ({counts}); objective: best-epoch {spec.metric}\n"
    text += format_table(tables.summary[cols]) if not tables.summary.empty else ""
    errors = t[t["error"] != ""]
    for _, r in errors.iterrows():
        text += f"\n  trial {r['trial_id']} failed: {r['error']}"
    if tables.best_config:
        text += f"\nbest setting as a run config: {tables.best_config}"
    verdict = versus_baseline(tables)
    return text + (f"\n{verdict}" if verdict else "")


def versus_baseline(tables: SweepTables) -> str | None:
    """The last line of a sweep with a baseline: whether its best setting beat it, and by how much
    (a best setting that loses says so: it is not a recommendation)."""
    best = best_setting(tables)
    delta = (best or {}).get("delta_to_baseline", math.nan)
    if best is None or not isinstance(delta, float) or math.isnan(delta):
        return None
    n, std = int(best["n_paired"]), best.get("delta_std", math.nan)
    scale, unit = (100, "pt") if tables.mode == "max" else (1, "")
    spread = f" +- {scale * std:.{2 if scale == 100 else 4}f}" if isinstance(std, float) and not math.isnan(std) else ""
    shown = f"{scale * delta:+.{2 if scale == 100 else 4}f}{spread}{(' ' + unit) if unit else ''}"
    if (delta > 0) == (tables.mode == "max") and delta != 0:
        return f"verdict: the best setting beats its independent baseline: {shown} over {n} paired seed(s)"
    return (f"verdict: NO GAIN: the best setting is {shown} against its independent baseline over "
            f"{n} paired seed(s); distillation did not pay in this sweep, and its best setting is no recommendation")


def report_sweep(sweep_dir: str, verbose: bool = True) -> SweepTables:
    """`online-distill report SWEEP_DIR`: trials.csv, summary.csv, schedules.csv, best_config.yaml
    and the plots again, from Tune's experiment state."""
    import posixpath

    import yaml

    from . import spec as sweep_config

    raw = yaml.safe_load(storage.read_text(storage.join(sweep_dir, "sweep.yaml")))
    # the sweep is where it is now, whatever storage_path it was started with
    raw["storage_path"], raw["name"] = posixpath.dirname(sweep_dir.rstrip("/")), posixpath.basename(sweep_dir.rstrip("/"))
    spec = sweep_config.from_dict(raw, check=False)  # user builders need not be importable here
    tables = write(sweep_dir, spec)
    if verbose:
        print(describe(tables, spec) + "\nwrote " + ", ".join(
            p for p in tables.paths.values() if storage.exists(p)), flush=True)
    return tables
