"""A run's history as a table: one row per (epoch, member), member = peerK | ensemble; the
last epoch's numbers per member. Pure pandas: workers (trackers) and the driver use it alike."""
from __future__ import annotations

import pandas as pd


def history_frame(history: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(history)
    first = [c for c in ("run", "mode", "seed", "epoch", "member", "model") if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


FINAL_COLUMNS = ("member", "model", "val_acc", "val_nll", "val_bpb", "test_acc", "test_nll", "test_bpb", "test_ppl")


def final_table(df: pd.DataFrame) -> pd.DataFrame:
    """Last epoch's numbers per member: what a person wants to see at the end of a run."""
    last = df[df["epoch"] == df["epoch"].max()]
    cols = [c for c in FINAL_COLUMNS if c in last.columns]
    return last[cols].reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}")
