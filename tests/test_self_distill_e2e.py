"""A self-distillation teacher on a Ray Train worker: an interrupted run resumes with the same teacher."""
from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from online_distill.config import schema as C
from online_distill.rundir.checkpoint import load_peer
from online_distill.run import train
from online_distill.run.launch import make_trainer
from online_distill.rundir.layout import RunDir, checkpoint_dir_of as find_checkpoint_dir

pytestmark = pytest.mark.e2e


def test_interrupted_ema_run_resumes_with_the_same_teacher(ray_session, make_cfg):
    over = dict(models=["tiny_cnn"], distill__mode="ema", distill__ema_decay=0.9, train__epochs=2,
                data__train_subset=512)
    full = train(make_cfg(run__name="ema-straight", **over), verbose=False)
    cfg = make_cfg(run__name="ema-cut", **over)
    make_trainer(C.with_overrides(cfg, {"train.epochs": 1}), RunDir.of(cfg), notify="train").fit()  # stopped after 1 of 2 epochs
    resumed = train(cfg, verbose=False)
    h = resumed.history
    assert h.groupby("epoch")["resumed_from_epoch"].first().tolist() == [0, 1]
    cols = ["epoch", "member", "val_acc", "val_nll", "train_ce", "train_kd"]
    pd.testing.assert_frame_equal(h[cols], full.history[cols], rtol=1e-5)
    # the second epoch distilled from the restored average, so the final teachers agree too
    a = load_peer(find_checkpoint_dir(full.run_dir), 0)["teacher"]
    b = load_peer(find_checkpoint_dir(resumed.run_dir), 0)["teacher"]
    assert a["updates"] == b["updates"] == 2 * 8  # 512 examples / 64 per step, 2 epochs
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    comp = pd.read_csv(os.path.join(resumed.run_dir, "compression.csv"))
    assert comp["role"].tolist() == ["student", "teacher (ema)"]
