"""Peers x replicas: rank layout, process groups, and the data-parallel step of one peer.

The distributed test spawns a real 2 peers x 2 replicas gloo world (no Ray needed) and uses
online_distill.core.topology and the loop's own DDP wrapping."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from online_distill.config import schema as config_mod
from online_distill.distill.losses import distill_loss
from online_distill.core.optim import make_optimizer
from online_distill.run.checks import check
from online_distill.core.topology import (Topology, build_topology, exchange_group_ranks, layout_of, slot_and_replica,
                                          slot_group_ranks, train_shard)

PEERS, REPLICAS, B, STEPS = 2, 2, 16, 2


def test_rank_layout_is_peer_major_and_groups_partition_the_world():
    ranks = range(PEERS * 3)
    assert [slot_and_replica(r, 3) for r in ranks] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    peer_groups = [slot_group_ranks(p, 3) for p in range(PEERS)]
    exchange_groups = [exchange_group_ranks(r, PEERS, 3) for r in range(3)]
    for groups in (peer_groups, exchange_groups):
        assert sorted(r for g in groups for r in g) == list(ranks)  # each rank in exactly one group
    # an exchange group holds one rank of every peer, all with the same replica index
    for g in exchange_groups:
        assert sorted(slot_and_replica(r, 3)[0] for r in g) == [0, 1]
        assert len({slot_and_replica(r, 3)[1] for r in g}) == 1


def test_train_shards_shared_by_peers_unless_disjoint():
    world = PEERS * REPLICAS
    same = [train_shard(r, PEERS, REPLICAS, disjoint_peers=False) for r in range(world)]
    assert same == [(0, 2), (1, 2), (0, 2), (1, 2)]  # peer 1 replica j reads what peer 0 replica j reads
    disjoint = [train_shard(r, PEERS, REPLICAS, disjoint_peers=True) for r in range(world)]
    assert disjoint == [(r, world) for r in range(world)]


def test_topology_refuses_impossible_ranks():
    assert Topology(3, 2, 2).peers == [1] and Topology(3, 2, 2).replica == 1 and Topology(3, 2, 2).slot_root == 2
    with pytest.raises(ValueError, match="outside"):
        Topology(4, 2, 2)
    with pytest.raises(ValueError, match="at least one"):
        Topology(0, 2, 0)
    with pytest.raises(ValueError, match="do not divide"):
        Topology(0, 3, 1, peers_per_worker=2)


def test_packed_workers_hold_consecutive_peers_and_exchange_across_workers():
    # 4 peers, 2 per worker, 2 replicas: 4 workers; rank = slot * replicas + replica
    topos = [Topology(r, 4, 2, peers_per_worker=2) for r in range(4)]
    assert [t.peers for t in topos] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [t.replica for t in topos] == [0, 1, 0, 1]
    assert topos[1].exchange_ranks == [1, 3] and topos[1].holder(3) == 3 and topos[1].holder(0) == 1
    assert Topology(0, 4, 1, peers_per_worker=4).world_size == 1  # the whole cohort in one worker
    assert train_shard(3, 4, 2, disjoint_peers=False, peers_per_worker=2) == (1, 2)


@pytest.mark.parametrize("peers, replicas, ppw, mode, gpu", [
    (2, 1, 1, "dml", False), (2, 2, 1, "dml", True), (4, 2, 2, "dml", False), (4, 1, 4, "dml", False),
    (3, 2, 1, "codistill", False), (1, 3, 1, "independent", True)])
def test_the_cohorts_layout_is_worked_out_in_one_place(make_cfg, peers, replicas, ppw, mode, gpu):
    """layout_of(cfg) is what the plan holds, the launch sizes the worker group by, and every
    worker builds its topology from: it agrees with the config's own count of workers and with
    the rank arithmetic above."""
    over = {"distill.peer_data": "disjoint"} if mode == "codistill" else {}
    cfg = make_cfg(models=["tiny_cnn"] * peers, scale__replicas=replicas, scale__peers_per_worker=ppw,
                   distill__mode=mode, scale__use_gpu=gpu, scale__cpus_per_worker=2, **over)
    layout = layout_of(cfg)
    assert layout.world_size == cfg.world_size == peers // ppw * replicas
    assert layout.worker_resources == cfg.worker_resources == {"CPU": 2.0, **({"GPU": 1.0} if gpu else {})}
    assert layout.total_resources == {k: v * layout.world_size for k, v in cfg.worker_resources.items()}
    disjoint = mode == "codistill"
    for rank in range(layout.world_size):
        assert layout.shard(rank) == train_shard(rank, peers, replicas, disjoint_peers=disjoint, peers_per_worker=ppw)
        assert layout.topology(rank) == Topology(rank, peers, replicas, ppw)
    assert layout.num_shards == (layout.world_size if disjoint else replicas)


def test_the_launch_hands_the_plans_layout_to_every_worker(make_cfg, tmp_path):
    from online_distill.run.launch import make_trainer
    from online_distill.run.plan import Plan
    from online_distill.rundir.layout import RunDir

    cfg = make_cfg(scale__replicas=2)
    plan = Plan(cfg, RunDir(str(tmp_path)), in_process=False)
    trainer = make_trainer(cfg, plan.run_dir, layout=plan.layout)
    assert trainer.train_loop_config["layout"] is plan.layout  # what train_loop_per_worker builds its topology from
    assert trainer.scaling_config.num_workers == plan.layout.world_size == 4
    assert trainer.scaling_config.resources_per_worker == plan.layout.worker_resources


def test_disjoint_peer_data_only_for_codistill(make_cfg):
    check(make_cfg(distill__mode="codistill", distill__peer_data="disjoint"))
    with pytest.raises(config_mod.ConfigError, match="distill.peer_data"):
        check(make_cfg(distill__mode="dml", distill__peer_data="disjoint"))
    with pytest.raises(config_mod.ConfigError, match="distill.peer_data"):
        check(make_cfg(distill__peer_data="mine"))


# --- a real gloo world -------------------------------------------------------------------------

def _tiny_net() -> nn.Module:
    # no BatchNorm: with BN each replica normalises over its own half batch, so DDP is equal to
    # one worker on the union only for the parameters' gradients of BN-free models
    torch.manual_seed(0)  # every peer starts from the same weights: only their data differs
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 24), nn.Tanh(), nn.Linear(24, 5))


def _batch(peer: int, step: int, half: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Peer `peer`'s batch at `step`: 2B examples; replica `half` takes its half of it."""
    g = torch.Generator().manual_seed(1000 * peer + step)
    x, y = torch.randn(2 * B, 2, 6, 6, generator=g), torch.randint(0, 5, (2 * B,), generator=g)
    if half is None:
        return x, y
    return x[half * B:(half + 1) * B], y[half * B:(half + 1) * B]


def _optim_cfg():
    return config_mod.OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-3)


def _worker(rank: int, world: int, tmp: str) -> None:
    from online_distill.training.loop import _data_parallel
    from online_distill.teachers.peers import PeerTeacher
    from online_distill.teachers import TeacherContext

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    topo = build_topology(rank, PEERS, REPLICAS)
    (peer,) = topo.peers
    model = _tiny_net()
    train_model = _data_parallel(model, topo, torch.device("cpu"))
    opt = make_optimizer(_optim_cfg(), model)
    dml = PeerTeacher(TeacherContext(config_mod.Config(), topo, torch.device("cpu"), None, STEPS))
    exchanged = []
    for step in range(STEPS):
        x, y = _batch(peer, step, topo.replica)
        logits = train_model(x)
        exchanged.append((logits.detach().clone(), dml.logits(x, [logits])[0].logits))  # the dense target's logits
        loss, _ = distill_loss(logits, None, y, temperature=1.0, kd_weight=0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.save({"peer": peer, "replica": topo.replica, "state": model.state_dict(), "exchanged": exchanged,
                "is_ddp": train_model is not model, "dml_bytes": dml.comm_bytes_per_step}, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_world(tmp_path_factory, spawn_world):
    tmp = str(tmp_path_factory.mktemp("gloo_world"))
    world = PEERS * REPLICAS
    spawn_world(_worker, (world, tmp), world)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def _reference_state(peer: int) -> dict:
    """One worker, no DDP, stepping on the union of the two replicas' shards."""
    model = _tiny_net()
    opt = make_optimizer(_optim_cfg(), model)
    for step in range(STEPS):
        x, y = _batch(peer, step, None)
        loss, _ = distill_loss(model(x), None, y, temperature=1.0, kd_weight=0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.state_dict()


def test_two_replicas_step_like_one_worker_on_the_union(gloo_world):
    assert all(r["is_ddp"] for r in gloo_world)
    for r in gloo_world:
        ref = _reference_state(r["peer"])
        for k, v in r["state"].items():
            torch.testing.assert_close(v, ref[k], rtol=0, atol=2e-6, msg=f"rank {r} {k}")


def test_peers_never_average_each_others_gradients(gloo_world):
    # same init, different data: averaging across peers would have made them equal
    p0, p1 = gloo_world[0]["state"], gloo_world[2]["state"]
    assert max((p0[k] - p1[k]).abs().max().item() for k in p0) > 1e-3
    # and each peer matches its own single-worker reference, not the other's
    ref1 = _reference_state(1)
    assert max((p0[k] - ref1[k]).abs().max().item() for k in p0) > 1e-3


def test_dml_exchanges_logits_within_the_exchange_group(gloo_world):
    by_rank = {(r["peer"], r["replica"]): r for r in gloo_world}
    for (peer, replica), r in by_rank.items():
        other = by_rank[(1 - peer, replica)]  # the other peer on the same shard
        for step in range(STEPS):
            received = r["exchanged"][step][1]
            assert received.shape == (1, B, 5)
            torch.testing.assert_close(received[0], other["exchanged"][step][0], rtol=0, atol=0)
        assert r["dml_bytes"] == (PEERS - 1) * B * 5 * 4  # (K-1) x B x C fp32 received per step
