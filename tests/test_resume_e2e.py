"""A rerun of a run whose newest checkpoints are damaged, on the shared local Ray: it resumes from
the newest checkpoint that loads, or is refused on the driver before any worker starts."""
import json
import os
import shutil
import time

import pytest

from online_distill import cli
from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.run import launch
from online_distill.run import train
from online_distill.rundir.layout import RunDir
from online_distill.run.launch import make_trainer
from conftest import tiny_cfg

pytestmark = pytest.mark.e2e

NAME = "cut"
SMALL = dict(train__epochs=3, run__name=NAME, data__train_subset=512, data__val_size=200, data__test_subset=200)
"""Half make_cfg's data: what these tests check (which checkpoint loads, what is refused) does not
depend on the size of an epoch."""


@pytest.fixture(scope="module")
def interrupted(ray_session, tmp_path_factory) -> str:
    """One run interrupted after 2 of 3 epochs in two Ray Train workers, made once: each test
    damages a copy of it (run.storage_path may change on resume)."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("interrupted"), **SMALL)
    make_trainer(C.with_overrides(cfg, {"train.epochs": 2}), RunDir.of(cfg), notify="train").fit()
    return os.path.join(cfg.run.storage, NAME)


def copy_of(interrupted: str, make_cfg):
    """The interrupted run, copied under this test's run.storage_path; its config."""
    cfg = make_cfg(**SMALL)
    shutil.copytree(interrupted, os.path.join(cfg.run.storage, NAME), symlinks=True)
    return cfg


def cut_short(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(interrupted, make_cfg, capsys):
    cfg = copy_of(interrupted, make_cfg)  # interrupted after 2 of 3 epochs
    run_dir = os.path.join(cfg.run.storage, NAME)
    cut_short(os.path.join(run_dir, "checkpoint_epoch_0002", "peer0.pt"))
    capsys.readouterr()
    res = train(cfg, verbose=False)
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("resume: "))
    assert line.startswith("resume: checkpoint_epoch_0002 is damaged (peer0.pt: ") and "(cut short)" in line
    assert line.endswith(f"moved to damaged-checkpoint_epoch_0002; resuming from checkpoint_epoch_0001 (epoch 1 done) "
                         f"in {run_dir}")
    # epochs 2 and 3 ran again from the first checkpoint, and the run finished
    h = res.history
    assert h.groupby("epoch")["resumed_from_epoch"].first().tolist() == [0, 1, 1]
    assert res.metrics["epoch"] == 3 and res.checkpoint.endswith("checkpoint_epoch_0003")
    assert json.load(open(os.path.join(run_dir, "result.json")))["complete"]
    # the damaged files are kept beside the run, under a name no tool takes for a checkpoint
    assert sorted(n for n in os.listdir(run_dir) if "checkpoint_epoch" in n) == [
        "checkpoint_epoch_0002", "checkpoint_epoch_0003", "damaged-checkpoint_epoch_0002"]


def test_a_run_with_no_checkpoint_that_loads_is_refused_before_any_worker_starts(interrupted, make_cfg, monkeypatch,
                                                                                 tmp_path, capsys):
    cfg = copy_of(interrupted, make_cfg)
    run_dir = os.path.join(cfg.run.storage, NAME)
    cut_short(os.path.join(run_dir, "checkpoint_epoch_0002", "peer1.pt"))
    with open(os.path.join(run_dir, "checkpoint_epoch_0001", "history.json"), "w") as f:
        f.write('{"epoch": 0, "hist')
    listing = lambda: sorted(os.listdir(run_dir))  # noqa: E731
    before = listing()

    def no_trainer(*a, **k):
        raise AssertionError("a Train run was started")

    monkeypatch.setattr(launch, "make_trainer", no_trainer)
    t0 = time.perf_counter()
    with pytest.raises(C.ConfigError) as e:
        train(cfg, verbose=False)
    assert time.perf_counter() - t0 < 30  # the driver's checks only; a Train run costs ~20 s before a worker fails
    msg = str(e.value)
    assert "checkpoint_epoch_0002: peer1.pt: " in msg and "checkpoint_epoch_0001: history.json: " in msg
    assert f"--set run.name={NAME}-2" in msg and f"move {run_dir} away" in msg
    assert listing() == before  # untouched: the plan refuses before it writes anything
    # the command line says it in one `config error:` line and exits 2
    path = tmp_path / "cut.yaml"
    path.write_text(CF.dump(cfg))
    capsys.readouterr()
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"online-distill: config error: config file '{path}', line ")  # where run.name is set
    assert f": run.name: '{NAME}' cannot resume, no checkpoint in " in err[-1]
