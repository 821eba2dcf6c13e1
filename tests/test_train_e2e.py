"""End-to-end cohorts on the shared local Ray: real data, mixed architectures, resume, failure."""
import os

import pandas as pd
import pytest
import torch

from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.run import train
from online_distill.rundir.layout import RunDir
from online_distill.run.launch import make_trainer
from online_distill.run.plan import check_resources, cluster_resources, make_plan
from conftest import tiny_cfg

pytestmark = pytest.mark.e2e

RESUME = dict(train__epochs=3, data__train_subset=512, data__val_size=200, data__test_subset=200)
"""The resume tests' runs: 3 epochs on half make_cfg's data (they compare runs number for number,
at any size)."""


@pytest.fixture(scope="module")
def straight(ray_session, tmp_path_factory):
    """The history of an uninterrupted 3-epoch run in two Ray Train workers: what both resumed
    runs below must match (one run for both: the run's name changes none of its numbers)."""
    return train(tiny_cfg(tmp_path_factory.mktemp("straight"), run__name="straight", **RESUME),
                 verbose=False).history


def test_dml_on_real_fashion_mnist_learns_and_leaves_readable_results(ray_session, make_cfg):
    cfg = make_cfg(models=["small_cnn", "small_cnn"], data__dataset="fashion_mnist", data__train_subset=2048,
                   data__val_size=1000, data__test_subset=1000, train__epochs=2, optim__lr=0.05, run__name="fmnist")
    res = train(cfg, verbose=False)
    final = res.final.set_index("member")
    # chance is 0.10: well above it after two short epochs on 2k real images
    assert (final["val_acc"] > 0.6).all() and (final["test_acc"] > 0.6).all(), final
    assert {"peer0/test_acc", "peer1/test_acc", "ensemble/test_acc", "ensemble/val_acc"} <= set(res.metrics)
    # the tables and the resolved config sit in the run directory, and agree with Ray's metrics
    table = pd.read_csv(os.path.join(res.run_dir, "metrics.csv"))
    assert list(table["epoch"].unique()) == [1, 2] and set(table["member"]) == {"peer0", "peer1", "ensemble"}
    assert table.query("epoch == 2 and member == 'ensemble'")["test_acc"].item() == pytest.approx(res.metrics["ensemble/test_acc"])
    assert CF.load(os.path.join(res.run_dir, "config.yaml")) == cfg
    assert os.path.getsize(os.path.join(res.run_dir, "curves.png")) > 1000
    # each peer's files are in the one checkpoint
    assert {"peer0.pt", "peer1.pt", "rng_rank0.pt", "rng_rank1.pt", "history.json", "manifest_rank0.json",
            "manifest_rank1.json", "predictions.pt"} <= set(os.listdir(res.checkpoint))
    # Ray Train's own records are apart from ours; no half-written checkpoint is left
    assert not [n for n in os.listdir(res.run_dir) if n.startswith(".saving-") or ".tmp-" in n]
    # a finished run is never silently overwritten
    with pytest.raises(C.ConfigError, match="already finished"):
        train(cfg, verbose=False)


def test_interrupted_run_resumes_where_it_stopped_and_matches_an_uninterrupted_one(ray_session, make_cfg, straight):
    # an interrupted run: two of three epochs done, checkpoints on disk, no final results
    cfg = make_cfg(run__name="interrupted", **RESUME)
    make_trainer(C.with_overrides(cfg, {"train.epochs": 2}), RunDir.of(cfg), notify="train").fit()
    # ... resumed with both peers packed in one worker, which trains in this process: peer files do
    # not depend on the layout, and checkpoints not on who wrote them
    resumed = train(C.with_overrides(cfg, {"scale.peers_per_worker": 2}), verbose=False)
    h = resumed.history
    assert h.groupby("epoch")["resumed_from_epoch"].first().tolist() == [0, 0, 2]  # epoch 3 came from the checkpoint
    cols = ["epoch", "member", "val_acc", "val_nll", "train_ce"]
    pd.testing.assert_frame_equal(h[cols], straight[cols], rtol=1e-5)  # continued exactly where it stopped


def test_a_run_started_in_process_goes_on_in_a_worker_group(ray_session, make_cfg, straight):
    from online_distill.run.in_process import fit_in_process

    cfg = make_cfg(run__name="moved", scale__peers_per_worker=2, **RESUME)
    run_dir = os.path.join(cfg.run.storage, "moved")
    plan = make_plan(C.with_overrides(cfg, {"train.epochs": 2}))
    plan.prepare()
    fit_in_process(plan.cfg, plan.run_dir, None, make_trainer, verbose=False)  # 2 of 3 epochs in this process, stopped
    plan.release()
    # the same run spread over two Ray Train workers (say, moved to a machine with two GPUs)
    resumed = train(C.with_overrides(cfg, {"scale.peers_per_worker": 1}), verbose=False)
    h = resumed.history
    assert h.groupby("epoch")["resumed_from_epoch"].first().tolist() == [0, 0, 2]
    cols = ["epoch", "member", "val_acc", "val_nll", "train_ce"]
    pd.testing.assert_frame_equal(h[cols], straight[cols], rtol=1e-5)
    # Ray's workers wrote epoch 3, and the run keeps run.checkpoints_to_keep of all of them
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_epoch")) == [
        "checkpoint_epoch_0002", "checkpoint_epoch_0003"]


def test_changed_config_is_not_resumed_silently(ray_session, make_cfg):
    cfg = make_cfg(train__epochs=2, run__name="changed")
    plan = make_plan(cfg)
    plan.prepare()  # writes config.yaml
    plan.release()
    with pytest.raises(C.ConfigError, match=r"loss.temperature: 3.0 -> 5.0"):
        train(C.with_overrides(cfg, {"loss.temperature": 5.0}), verbose=False)


def test_a_worker_that_dies_once_is_retried_from_the_last_checkpoint(ray_session, make_cfg, capfd):
    # an independent cohort of different architectures: the baseline of a DML run, on the same batches
    # packed in one Ray Train worker (scale.peers_per_worker; run.in_process=never: a worker group,
    # tests/test_in_process.py retries one in the driver's process): retries and checkpoints work the same
    cfg = make_cfg(models=["mlp", "tiny_cnn"], distill__mode="independent", train__epochs=3, run__name="chaos",
                   run__max_failures=1, run__fail_once_at_epoch=2, scale__peers_per_worker=2, run__in_process="never",
                   data__train_subset=512, data__val_size=200, data__test_subset=200)  # any size: it counts epochs
    res = train(cfg, verbose=False)
    h = res.history
    assert h.groupby("epoch")["resumed_from_epoch"].first().tolist() == [0, 0, 2] or \
        h.groupby("epoch")["resumed_from_epoch"].first().tolist() == [0, 1, 1]
    assert sorted(h["epoch"].unique()) == [1, 2, 3] and len(h) == 3 * 3  # each epoch once, 2 peers + ensemble
    assert res.metrics["epoch"] == 3
    # the independent baseline exchanges nothing and learns from no one
    assert res.metrics["exchange_bytes_per_step"] == 0
    assert res.metrics["peer0/train_kd"] == 0 and res.metrics["peer1/train_kd"] == 0
    # the terminal: one line of ours about it; the rank's traceback went to run.log
    terminal = capfd.readouterr()
    text = terminal.out + terminal.err
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert sum("worker lost" in ln for ln in lines) == 1 and len(lines) <= 5 and "Traceback" not in text, text
    assert "Traceback" in RunDir.of(cfg).read_text("run.log")


def test_more_workers_than_the_cluster_has_is_refused_before_fit(ray_session, make_cfg):
    cfg = make_cfg(models=["tiny_cnn"] * 3, scale__replicas=2)
    with pytest.raises(C.ConfigError, match=r"scale: 3 models / scale.peers_per_worker=1 x scale.replicas=2 = 6 workers "
                                            r".* need 6 CPUs; the cluster has 4.*scale.peers_per_worker: a divisor of 3"):
        check_resources(cfg, *cluster_resources())
    # peers outnumber GPUs: the way out is named
    with pytest.raises(C.ConfigError, match=r"scale.use_gpu: .* need 2 GPUs; the cluster has 0.*scale.peers_per_worker"):
        check_resources(make_cfg(scale__use_gpu=True), *cluster_resources())
    with pytest.raises(C.ConfigError, match=r"scale.cpus_per_worker: got 8; allowed: at most 4"):
        check_resources(make_cfg(scale__peers_per_worker=2, scale__cpus_per_worker=8), *cluster_resources())


def test_heterogeneous_peers_from_user_model_and_dataset_builders(ray_session, make_cfg):
    from online_distill.data.datasets import ImageTensors, Splits

    def two_blobs(cfg):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 2, (1500,), generator=g)
        x = (y.view(-1, 1, 1, 1) * 120 + torch.randint(0, 100, (1500, 1, 8, 8), generator=g)).to(torch.uint8)
        ds = ImageTensors(x, y, (0.5,), (0.25,))
        return Splits(ds.subset(torch.arange(1000)), ds.subset(torch.arange(1000, 1500)), 2, input_shape=(1, 8, 8))

    def linear(input_shape, k):  # builders take the shape of one example, here (1, 8, 8)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0] * 64, k))

    # three peers of three architectures (one of them the user's) on the user's dataset
    cfg = make_cfg(models=["linear", "mlp", "tiny_cnn"], data__dataset="blobs", data__val_size=200,
                   data__train_subset=None, data__test_subset=None, train__epochs=1, run__name="user")
    res = train(cfg, models={"linear": linear}, datasets={"blobs": two_blobs}, verbose=False)
    assert res.metrics["peer0/val_acc"] > 0.9  # separable blobs
    assert res.final["model"].tolist() == ["linear", "mlp", "tiny_cnn", "linear+mlp+tiny_cnn"]
    # every step each peer receives the other K-1 peers' logits: (K-1) x B x C float32
    B, C_, K = cfg.train.batch_size, 2, 3
    assert res.metrics["exchange_bytes_per_step"] == (K - 1) * B * C_ * 4
    assert all(res.metrics[f"peer{p}/train_kd"] > 0 for p in range(K))  # every peer learned from the others


def test_a_user_error_on_the_workers_ends_the_run_after_one_attempt_quietly(ray_session, make_cfg, tmp_path, capfd):
    """run.max_failures=3, a worker group: the user's forward raises at step 6. One attempt, the
    error named with its rank, peer, epoch and step; no traceback and no retry line on the
    terminal (Ray's worker tracebacks are in run.log)."""
    from online_distill.errors import UserCodeError

    marks = str(tmp_path / "raised")

    class RaisesAtStep6(torch.nn.Module):  # defined here: Ray sends it to the workers by value
        """The user's model: its forward raises a shape error at its 6th training step, every
        attempt; each time it raises it says so in a file, so the attempts can be counted."""

        def __init__(self, num_classes):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))
            self.steps = 0

        def forward(self, x):
            if self.training:
                self.steps += 1
                if self.steps == 6:
                    with open(marks, "a") as f:
                        f.write("raised\n")
                    return self.body(x)[:, :3] @ torch.ones(4, 10)
            return self.body(x)

    cfg = make_cfg(models=["raises", "tiny_cnn"], run__max_failures=3, run__in_process="never", run__name="usererr")
    with pytest.raises(UserCodeError, match=r"^the forward of peer 0 \(raises\) raised RuntimeError: mat1 and mat2 "
                                            r"shapes cannot be multiplied \(64x3 and 4x10\) \(on rank 0, host .*, epoch 1, "
                                            r"step 6 of 16\)\. Nothing was retried"):
        train(cfg, models={"raises": lambda shape, k: RaisesAtStep6(k)})
    terminal = capfd.readouterr()
    text = terminal.out + terminal.err
    assert open(marks).read() == "raised\n"  # exactly one attempt
    assert "Traceback" not in text and "worker lost" not in text and "(raylet)" not in text, text
    assert len(text.splitlines()) <= 25, text
    log = RunDir(tmp_path / "runs" / "usererr").read_text("run.log")
    assert "UserCodeError" in log and "mat1 and mat2 shapes cannot be multiplied" in log and "Traceback" in log
