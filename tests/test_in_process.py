"""A cohort of one worker trained in the driver's process (run/in_process.py): Ray Train's local
mode, no Ray cluster. It must learn what a worker group learns, keep its checkpoints as a worker
group does, retry a failure from the newest one, and resume where it stopped."""
import json
import os

import pytest

from online_distill.config import schema as C
from online_distill.run import in_process, train
from online_distill.rundir.layout import RunDir
from online_distill.run.in_process import fit_in_process, runs_in_process
from online_distill.run.launch import history_from_checkpoint, make_trainer
from online_distill.run.plan import check_machine, make_plan
from test_packing import assert_same_learning


@pytest.fixture(autouse=True)
def no_cluster_to_join(monkeypatch):
    """As on a laptop: no RAY_ADDRESS (conftest) and no `ray start` on this machine, whatever it has."""
    monkeypatch.setattr(in_process, "cluster_address", lambda: None)


def packed(make_cfg, **over):
    """Two heterogeneous peers in one worker, 3 epochs: a cohort of one worker."""
    return make_cfg(models=["tiny_cnn", "mlp"], train__epochs=3, scale__peers_per_worker=2, **over)


def checkpoints(run_dir) -> list[str]:
    return sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_"))


def test_where_a_cohort_trains(make_cfg, monkeypatch):
    assert runs_in_process(packed(make_cfg))
    assert not runs_in_process(make_cfg())  # two workers
    assert not runs_in_process(packed(make_cfg, scale__replicas=2))
    assert not runs_in_process(packed(make_cfg, run__in_process="never"))
    monkeypatch.setattr(in_process, "cluster_address", lambda: "10.0.0.1:6379")  # a cluster to join
    assert not runs_in_process(packed(make_cfg))
    assert runs_in_process(packed(make_cfg, run__in_process="always"))
    with pytest.raises(C.ConfigError, match=r"^run.in_process: got 'always'; allowed: 'auto' or 'never' for a cohort of "
                                            r"2 workers; one process holds a cohort with scale.peers_per_worker=2"):
        make_cfg(run__in_process="always").check_fields()


def test_what_this_machine_cannot_give_is_refused_naming_the_field(make_cfg):
    with pytest.raises(C.ConfigError, match=rf"^scale.cpus_per_worker: got 999; allowed: at most {os.cpu_count()}, "
                                            r"the CPUs of this machine"):
        check_machine(packed(make_cfg, scale__cpus_per_worker=999))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(C.ConfigError, match="^scale.use_gpu: true, but this machine has no GPU"):
            check_machine(packed(make_cfg, scale__use_gpu=True))


def test_it_learns_what_the_spread_cohort_learns_and_leaves_a_worker_groups_files(make_cfg, train_history, monkeypatch):
    from online_distill.run import env

    def started(*a, **k):
        raise AssertionError("a Ray cluster was started for a cohort of one worker")

    monkeypatch.setattr(env, "init_ray", started)  # no Ray cluster is started for it
    cfg = packed(make_cfg, run__name="here")
    res = train(cfg, verbose=False)
    # the same seeded cohort, one peer per process (a gloo world of the real loop): the same numbers
    spread = train_history(C.with_overrides(cfg, {"scale.peers_per_worker": 1}))
    assert_same_learning(spread, history_from_checkpoint(res.checkpoint))
    # a worker group's files: checkpoints by epoch, the newest run.checkpoints_to_keep of them
    assert checkpoints(res.run_dir) == ["checkpoint_epoch_0002", "checkpoint_epoch_0003"]
    assert res.checkpoint.endswith("checkpoint_epoch_0003") and res.metrics["epoch"] == 3
    assert {"peer0.pt", "peer1.pt", "rng_rank0.pt", "history.json", "metrics.json", "manifest_rank0.json",
            "predictions.pt"} <= set(os.listdir(res.checkpoint))
    assert json.load(open(os.path.join(res.run_dir, "result.json")))["metrics"]["peer1/test_acc"] == \
        pytest.approx(res.metrics["peer1/test_acc"])
    assert {"final.csv", "metrics.csv", "compression.csv", "curves.png"} <= set(os.listdir(res.run_dir))


def test_a_failure_is_retried_from_the_newest_checkpoint(make_cfg, capsys):
    res = train(packed(make_cfg, run__name="chaos", run__max_failures=1, run__fail_once_at_epoch=2), verbose=False)
    h = res.history
    assert h.groupby("epoch")["resumed_from_epoch"].first().tolist() == [0, 0, 2]  # epoch 3 came from the checkpoint
    assert sorted(h["epoch"].unique()) == [1, 2, 3] and len(h) == 3 * 3  # each epoch once, 2 peers + ensemble
    err = capsys.readouterr().err
    assert "run 'chaos': training failed (RuntimeError: chaos: rank 0 fails once at epoch 2" in err
    assert "retry 1 of 1 (run.max_failures), resuming from checkpoint_epoch_0002 (epoch 2 done)" in err


def test_a_failure_beyond_max_failures_keeps_every_finished_checkpoint_and_a_rerun_resumes(make_cfg):
    cfg = packed(make_cfg, run__name="gives_up", run__fail_once_at_epoch=2)  # max_failures 0
    with pytest.raises(RuntimeError, match="chaos"):
        train(cfg, verbose=False)
    run_dir = os.path.join(cfg.run.storage, "gives_up")
    assert checkpoints(run_dir) == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]
    assert not os.path.exists(os.path.join(run_dir, "result.json"))
    res = train(C.with_overrides(cfg, {"run.fail_once_at_epoch": None}), verbose=False)
    assert res.history.groupby("epoch")["resumed_from_epoch"].first().tolist() == [0, 0, 2]


def test_a_run_stopped_after_its_last_report_finishes_from_that_checkpoint(make_cfg):
    cfg = packed(make_cfg, run__name="stopped")
    plan = make_plan(cfg)
    plan.prepare()
    fit_in_process(plan.cfg, plan.run_dir, None, make_trainer, verbose=False)  # every epoch trained; stopped before the tables
    plan.release()
    last = RunDir(plan.run_dir.path).latest()
    res = train(cfg, verbose=False)
    assert res.checkpoint == last and res.metrics["epoch"] == 3
    assert sorted(res.history["epoch"].unique()) == [1, 2, 3]
    assert os.path.exists(os.path.join(plan.run_dir.path, "result.json"))


def test_the_compression_report_is_behind_a_flag_and_its_own_command(make_cfg, capsys):
    """run.compression_report: false skips the after-run measurement of every model on the CPU;
    `online-distill report RUN --compression` makes the same table later from the checkpoint."""
    from online_distill import cli

    res = train(C.with_overrides(packed(make_cfg, run__name="quiet", run__compression_report=False), {"train.epochs": 1}))
    said = capsys.readouterr().out
    assert "size and CPU speed" not in said and not os.path.exists(os.path.join(res.run_dir, "compression.csv"))
    assert cli.main(["report", res.run_dir, "--compression"]) == 0
    said = capsys.readouterr().out
    assert "size and CPU speed (compression.csv)" in said
    import pandas as pd

    table = pd.read_csv(os.path.join(res.run_dir, "compression.csv"))
    assert list(table["member"]) == ["peer0", "peer1"] and (table["params"] > 0).all()
    final = pd.read_csv(os.path.join(res.run_dir, "final.csv")).set_index("member")["test_acc"]
    for member, acc in zip(table["member"], table["test_acc"]):  # measured again here: what the run measured
        assert acc == pytest.approx(final[member], abs=1e-6), member
