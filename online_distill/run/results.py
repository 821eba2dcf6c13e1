"""Tidy tables and pictures of a run: one row per (epoch, member), member = peerK | ensemble; and
per class, from the last epoch's saved logits."""
from __future__ import annotations

import io

import pandas as pd
import torch

from ..rundir.layout import CURVES, FINAL, METRICS_CSV, METRICS_PARQUET, PER_CLASS, RunDir
from ..rundir.tables import FINAL_COLUMNS, final_table, format_table, history_frame  # noqa: F401 (re-exported)


def write_run_tables(run: RunDir, df: pd.DataFrame) -> dict[str, str]:
    """metrics.csv (+ .parquet) and final.csv into the run directory; a PNG of the curves."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return {"metrics": run.write(METRICS_CSV, df.to_csv(index=False)), "final": run.write(FINAL, final_table(df).to_csv(index=False)),
            "parquet": run.write(METRICS_PARQUET, buf.getvalue()), "curves": run.write(CURVES, plot_curves(df))}


def per_class(predictions: dict, models: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Per split, member (each peer and the ensemble, the mean of the peers' probabilities) and
    class: how many examples there are, how many the member gets right, and its accuracy."""
    rows = []
    for split, p in predictions.items():
        labels = p["labels"]
        probs = {f"peer{q}": torch.softmax(z.float(), -1) for q, z in p["logits"].items()}
        probs["ensemble"] = torch.stack(list(probs.values())).mean(0)
        for member, pr in probs.items():
            right = pr.argmax(-1) == labels
            model = "+".join(models) if member == "ensemble" else models[int(member[4:])]
            for c in range(pr.shape[-1]):
                n = int((labels == c).sum())
                k = int(right[labels == c].sum())
                rows.append({"split": split, "member": member, "model": model, "class": c, "n": n, "correct": k,
                             "acc": k / n if n else float("nan")})
    return pd.DataFrame(rows)


def write_predictions(run: RunDir, predictions: dict, models) -> str:
    return run.write(PER_CLASS, per_class(predictions, models).to_csv(index=False))


def plot_curves(df: pd.DataFrame) -> bytes:
    """Validation accuracy (bits per byte for text) and training losses per member against
    epochs, as PNG bytes. Epochs are whole numbers on the axis; a loss panel whose values barely
    move keeps a range of at least 10% of its level, so noise does not look like a cliff."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    first = "val_bpb" if "val_bpb" in df.columns else "val_acc"
    titles = {"val_acc": "validation accuracy", "val_bpb": "validation bits per byte"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for member, g in df.groupby("member", sort=False):
        style = dict(marker="o", lw=2.5 if member == "ensemble" else 1.5, label=f"{member} ({g['model'].iloc[0]})")
        axes[0].plot(g["epoch"], g[first], **style)
        if member != "ensemble":
            axes[1].plot(g["epoch"], g["train_ce"], **style)
            axes[2].plot(g["epoch"], g["train_kd"], **style)
    for ax, title in zip(axes, (titles[first], "train cross-entropy", "train KD (divergence at T)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    peers = df[df["member"] != "ensemble"]
    for ax, column in ((axes[1], "train_ce"), (axes[2], "train_kd")):
        values = peers[column].dropna()
        if len(values):
            lo, hi = float(values.min()), float(values.max())
            span = max(hi - lo, 0.1 * max(abs(hi), abs(lo)), 1e-6)
            mid = (lo + hi) / 2
            ax.set_ylim(min(lo, mid - span / 2) - 0.05 * span, max(hi, mid + span / 2) + 0.05 * span)
    axes[0].legend(fontsize=8, loc="best")
    name = df["run"].iloc[0] if "run" in df.columns else ""
    fig.suptitle(f"{name}: {df['mode'].iloc[0] if 'mode' in df.columns else ''}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
