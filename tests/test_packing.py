"""Packing (scale.peers_per_worker): where peers run changes, what they learn does not.

The same seeded cohort is trained by the real loop spread (one peer per gloo process) and packed
(several peers in one process), and every number of every epoch must agree: losses, train and
validation accuracy, NLL, the ensemble, the test split at the end. No Ray here: the loop is the
thing under test; tests/test_train_e2e.py runs a packed cohort through Ray Train.
"""
from __future__ import annotations

import pytest
import torch

from online_distill.config import schema as config_mod
from online_distill.run.checks import check

# every number a history row holds about what was learned (timings and layout excluded)
LEARNED = ["train_ce", "train_kd", "train_acc", "val_acc", "val_nll", "test_acc", "test_nll"]


def _cohort(make_cfg, mode: str, models: list[str], **over) -> config_mod.Config:
    return make_cfg(models=models, distill__mode=mode, data__train_subset=384, data__val_size=128,
                    data__test_subset=128, train__batch_size=32, train__epochs=2, distill__sync_every=3, **over)


def assert_same_learning(a: list[dict], b: list[dict]) -> None:
    assert [(r["epoch"], r["member"]) for r in a] == [(r["epoch"], r["member"]) for r in b]
    for ra, rb in zip(a, b):
        for k in LEARNED:
            if k in ra or k in rb:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["epoch"], ra["member"], k)


@pytest.mark.parametrize("mode", ["dml", "independent", "codistill"])
def test_packed_and_spread_cohorts_learn_the_same(make_cfg, train_history, mode):
    models = ["tiny_cnn", "mlp"]  # heterogeneous peers, packed in one worker
    spread = train_history(_cohort(make_cfg, mode, models))
    packed = train_history(_cohort(make_cfg, mode, models, scale__peers_per_worker=2))
    assert_same_learning(spread, packed)
    # with a core per peer, packed peers run in threads of their own (PeerRunner): the same again
    threaded = train_history(_cohort(make_cfg, mode, models, scale__peers_per_worker=2, scale__cpus_per_worker=2))
    assert_same_learning(spread, threaded)
    if mode != "independent":  # the test can fail: the teacher changed what was learned
        alone = train_history(_cohort(make_cfg, "independent", models, scale__peers_per_worker=2))
        assert any(r["train_kd"] > 0 for r in packed)
        assert any(x["val_nll"] != y["val_nll"] for x, y in zip(packed, alone))
    peers = [r for r in packed if r["member"] != "ensemble"]
    assert all(r["exchange_bytes_per_step"] == 0 for r in peers)  # nothing crosses a process boundary


def test_four_peers_two_per_worker_exchange_across_workers(make_cfg, train_history):
    """4 peers on 2 workers: each peer's teachers are its packed neighbour (memory) and the
    other worker's two peers (the all-gather); the same numbers as the whole cohort in one worker."""
    models = ["tiny_cnn"] * 4
    half = train_history(_cohort(make_cfg, "dml", models, scale__peers_per_worker=2))
    whole = train_history(_cohort(make_cfg, "dml", models, scale__peers_per_worker=4))
    assert_same_learning(half, whole)
    batch, classes = 32, 10
    received = {r["exchange_bytes_per_step"] for r in half if r["member"] != "ensemble"}
    assert received == {2 * batch * classes * 4}  # (K - k) x B x C fp32 per worker: the other worker's 2 peers


def test_peers_run_in_threads_only_where_that_changes_nothing(make_cfg):
    import torch.nn as nn

    from online_distill.training.loop import PeerRunner
    from online_distill.core.topology import Topology

    cfg = make_cfg(scale__peers_per_worker=2, scale__cpus_per_worker=2)
    cpu, one_worker = torch.device("cpu"), Topology(0, 2, 1, peers_per_worker=2)
    before = torch.get_num_threads()
    try:
        runner = PeerRunner(cfg, one_worker, [nn.Linear(2, 2), nn.Linear(2, 2)], cpu)
        assert runner.threaded and torch.get_num_threads() == 1  # a core per peer
        assert runner.map(lambda a, b: a * b, [2, 3], [5, 7]) == [10, 21]  # in order
        runner.close()
        dropout = [nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), nn.Linear(2, 2)]
        assert not PeerRunner(cfg, one_worker, dropout, cpu).threaded  # random draws stay in order
        assert not PeerRunner(make_cfg(scale__peers_per_worker=2), one_worker, [nn.Linear(2, 2)] * 2, cpu).threaded
        assert not PeerRunner(cfg, one_worker, [nn.Linear(2, 2)] * 2, torch.device("meta")).threaded  # not a CPU
    finally:
        torch.set_num_threads(before)


def test_overlapped_updates_run_in_each_peers_order_and_raise_where_the_loop_waits(make_cfg):
    import threading
    import time

    import torch.nn as nn

    from online_distill.training.loop import PeerRunner
    from online_distill.core.topology import Topology

    cfg = make_cfg(scale__peers_per_worker=2, scale__cpus_per_worker=2)
    before = torch.get_num_threads()
    try:
        runner = PeerRunner(cfg, Topology(0, 2, 1, peers_per_worker=2), [nn.Linear(2, 2), nn.Linear(2, 2)],
                            torch.device("cpu"), overlap=True)
        log, lock = [], threading.Lock()

        def slow_update(j):
            time.sleep(0.3)
            with lock:
                log.append(("update", j))

        def forward(j):
            with lock:
                log.append(("forward", j))
            return j

        t0 = time.perf_counter()
        runner.update(slow_update, [0, 1])
        assert time.perf_counter() - t0 < 0.2  # not waited for ...
        assert runner.map(forward, [0, 1]) == [0, 1]
        for j in (0, 1):  # ... yet each peer's forward came after its own update
            assert log.index(("update", j)) < log.index(("forward", j))

        def broken(j):
            raise RuntimeError(f"peer {j} failed")

        runner.update(broken, [0, 1])
        with pytest.raises(RuntimeError, match="peer 0 failed"):
            runner.map(forward, [0, 1])
        runner.close()
    finally:
        torch.set_num_threads(before)


def test_teachers_that_read_the_updated_weights_are_not_overlapped(make_cfg):
    from online_distill.teachers import TeacherContext, build_teacher
    from online_distill.core.topology import Topology

    def teacher(**over):
        cfg = check(make_cfg(**over))
        topo = Topology(0, cfg.num_peers, 1, peers_per_worker=cfg.scale.peers_per_worker)
        build = lambda p: torch.nn.Linear(2, 2)  # noqa: E731
        return build_teacher(TeacherContext(cfg, topo, torch.device("cpu"), build, 10, lambda n: build(0)))

    assert not teacher(distill__mode="dml", scale__peers_per_worker=2).waits_for_updates
    assert not teacher(distill__mode="independent", scale__peers_per_worker=2).waits_for_updates
    assert teacher(distill__mode="ema", models=["tiny_cnn"]).waits_for_updates
    assert teacher(distill__mode="codistill", scale__peers_per_worker=2).waits_for_updates


def test_layout_refusals_name_the_field(make_cfg):
    with pytest.raises(config_mod.ConfigError, match=r"scale.peers_per_worker: got 2; allowed: a divisor of the 3 peers: 1, 3"):
        check(make_cfg(models=["tiny_cnn"] * 3, scale__peers_per_worker=2))
    with pytest.raises(config_mod.ConfigError, match="scale.peers_per_worker.*disjoint"):
        check(make_cfg(distill__mode="codistill", distill__peer_data="disjoint", scale__peers_per_worker=2))
    with pytest.raises(config_mod.ConfigError, match="scale.gpus_per_worker.*NCCL"):
        check(make_cfg(scale__use_gpu=True, scale__gpus_per_worker=0.5))
    check(make_cfg(scale__use_gpu=True, scale__gpus_per_worker=0.5, scale__peers_per_worker=2))
    with pytest.raises(config_mod.ConfigError, match=r"scale.gpus_per_worker: got 1.5; allowed: a number in \(0, 1\]"):
        check(make_cfg(scale__gpus_per_worker=1.5))
