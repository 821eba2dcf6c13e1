"""Tidy tables and pictures of a run: one row per (epoch, member), member = peerK | ensemble."""
from __future__ import annotations

import io

import pandas as pd

from .. import storage


def history_frame(history: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(history)
    first = [c for c in ("run", "mode", "seed", "epoch", "member", "model") if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def final_table(df: pd.DataFrame) -> pd.DataFrame:
    """Last epoch's accuracy per member: what a person wants to see at the end of a run."""
    last = df[df["epoch"] == df["epoch"].max()]
    cols = [c for c in ("member", "model", "val_acc", "val_nll", "test_acc", "test_nll") if c in last.columns]
    return last[cols].reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def write_run_tables(run_dir: str, df: pd.DataFrame) -> dict[str, str]:
    """metrics.csv (+ .parquet) and final.csv into the run directory; a PNG of the curves."""
    paths = {"metrics": storage.join(run_dir, "metrics.csv"), "final": storage.join(run_dir, "final.csv"),
             "parquet": storage.join(run_dir, "metrics.parquet"), "curves": storage.join(run_dir, "curves.png")}
    storage.write_text(paths["metrics"], df.to_csv(index=False))
    storage.write_text(paths["final"], final_table(df).to_csv(index=False))
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.write_bytes(paths["parquet"], buf.getvalue())
    storage.write_bytes(paths["curves"], plot_curves(df))
    return paths


def plot_curves(df: pd.DataFrame) -> bytes:
    """Validation accuracy and training losses per member against epochs, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for member, g in df.groupby("member", sort=False):
        style = dict(marker="o", lw=2.5 if member == "ensemble" else 1.5, label=f"{member} ({g['model'].iloc[0]})")
        axes[0].plot(g["epoch"], g["val_acc"], **style)
        if member != "ensemble":
            axes[1].plot(g["epoch"], g["train_ce"], **style)
            axes[2].plot(g["epoch"], g["train_kd"], **style)
    for ax, title in zip(axes, ("validation accuracy", "train cross-entropy", "train KD (KL at T)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    name = df["run"].iloc[0] if "run" in df.columns else ""
    fig.suptitle(f"{name}: {df['mode'].iloc[0] if 'mode' in df.columns else ''}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
