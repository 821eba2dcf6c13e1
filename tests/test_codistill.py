"""Codistillation: the swap schedule, what a swap moves (BatchNorm buffers included, the same
stale copy on every replica of a peer), the bytes it reports, and a cohort on disjoint shards."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from online_distill.config import schema as config_mod
from online_distill.models.builders import build_model
from online_distill.teachers import TeacherContext
from online_distill.teachers.stale_peers import StalePeerTeacher, is_sync_step, state_bytes
from online_distill.core.topology import Topology, build_topology

IMAGES = torch.zeros(2, 1, 28, 28)  # what models are built for: a batch like the 1x28x28 data

PEERS, REPLICAS, B = 2, 2, 8
MODELS = ("tiny_cnn", "small_cnn")  # peers may differ in architecture



def dense(target):
    """The stacked teacher logits of a dense target (losses.DenseTarget), or None before any swap."""
    return None if target is None else target.logits

def test_swaps_follow_the_burn_in_then_every_sync_every_steps():
    assert [s for s in range(12) if is_sync_step(s, burn_in=0, sync_every=4)] == [3, 7, 11]
    assert [s for s in range(12) if is_sync_step(s, burn_in=5, sync_every=3)] == [4, 7, 10]
    assert [s for s in range(4) if is_sync_step(s, burn_in=0, sync_every=1)] == [0, 1, 2, 3]


def _cfg(**distill) -> config_mod.Config:
    return config_mod.from_dict({"models": list(MODELS), "data": {"dataset": "synthetic"},
                                 "distill": {"mode": "codistill", "sync_every": 2, **distill},
                                 "scale": {"replicas": REPLICAS}})


def _build_peer(p: int):
    torch.manual_seed(100 + p)
    return build_model(MODELS[p], IMAGES, 10)


def _worker(rank: int, world: int, tmp: str) -> None:
    from online_distill.training.loop import _data_parallel
    from online_distill.core.optim import make_optimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = _cfg()
    topo = build_topology(rank, PEERS, REPLICAS)
    (peer,) = topo.peers
    model = _build_peer(peer)
    train_model = _data_parallel(model, topo, torch.device("cpu"))
    opt = make_optimizer(cfg.optim, model)
    teacher = StalePeerTeacher(TeacherContext(cfg, topo, torch.device("cpu"), _build_peer, 10))
    g = torch.Generator().manual_seed(rank)  # every rank its own batches: BN statistics drift apart
    out = {"peer": peer, "replica": topo.replica, "bytes": teacher.comm_bytes_per_step}
    for step in range(2):
        x, y = torch.rand(B, 1, 28, 28, generator=g), torch.randint(0, 10, (B,), generator=g)
        logits = train_model(x)
        out[f"teacher_at_{step}"] = dense(teacher.logits(x, [logits])[0])
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1:
            out["buffers_before_swap"] = {k: v.clone() for k, v in model.named_buffers()}
        teacher.after_step([model], step)  # swaps after step 1 (sync_every=2)
    probe = torch.rand(B, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    out.update(state=model.state_dict(), copies=teacher.copies.state_dict(), teacher_state=teacher.state_dict(0),
               probe_logits=dense(teacher.logits(probe, [None])[0]))
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def swapped(tmp_path_factory, spawn_world):
    tmp = str(tmp_path_factory.mktemp("codistill_world"))
    world = PEERS * REPLICAS
    spawn_world(_worker, (world, tmp), world)
    return {(r["peer"], r["replica"]): r for r in
            (torch.load(os.path.join(tmp, f"rank{i}.pt"), weights_only=True) for i in range(world))}


def test_no_teacher_before_the_first_swap(swapped):
    assert all(r["teacher_at_0"] is None and r["teacher_at_1"] is None for r in swapped.values())


def test_replicas_bn_statistics_differ_before_the_swap_and_agree_after(swapped):
    for p in range(PEERS):
        before0, before1 = swapped[(p, 0)]["buffers_before_swap"], swapped[(p, 1)]["buffers_before_swap"]
        running = [k for k in before0 if k.endswith("running_mean")]
        assert running and any(not torch.equal(before0[k], before1[k]) for k in running)  # the test can fail
        for k in before0:  # the swap makes replica 0's statistics the peer's, as DDP's next forward would
            torch.testing.assert_close(swapped[(p, 1)]["state"][k], before0[k], rtol=0, atol=0)


def test_every_rank_holds_the_other_peers_exact_state(swapped):
    for (p, j), r in swapped.items():
        q = 1 - p
        source = swapped[(q, 0)]["state"]  # parameters and BN buffers of peer q
        copy = {k.split(".", 1)[1]: v for k, v in r["copies"].items() if k.startswith(f"{q}.")}
        assert copy.keys() == source.keys()
        for k in source:
            torch.testing.assert_close(copy[k], source[k], rtol=0, atol=0, msg=f"peer {p} replica {j}: {k}")
        # identical stale teachers on both replicas of a peer: identical teacher logits
        torch.testing.assert_close(r["probe_logits"], swapped[(p, 1 - j)]["probe_logits"], rtol=0, atol=0)


def test_reported_bytes_are_the_other_peers_states_per_step(swapped):
    for (p, _), r in swapped.items():
        assert r["bytes"] == state_bytes(_build_peer(1 - p)) / 2  # sync_every = 2


def test_teacher_state_round_trips_for_resume(swapped):
    saved = swapped[(0, 1)]["teacher_state"]
    fresh = StalePeerTeacher(TeacherContext(_cfg(), Topology(1, PEERS, REPLICAS), torch.device("cpu"), _build_peer, 10))
    assert not fresh.synced
    fresh.load_state_dict(0, saved)
    assert fresh.synced
    probe = torch.rand(B, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(dense(fresh.logits(probe, [None])[0]), swapped[(0, 1)]["probe_logits"], rtol=0, atol=0)


def test_codistill_cohort_on_disjoint_shards_reports_its_traffic(make_cfg, train_history):
    """The real loop (no Ray: the teacher is all that differs from a DML cohort on Ray)."""
    cfg = make_cfg(train__epochs=1, distill__mode="codistill", distill__sync_every=4, distill__burn_in_steps=2,
                   distill__peer_data="disjoint")
    rows = [r for r in train_history(cfg) if r["member"] != "ensemble"]
    tiny = state_bytes(build_model("tiny_cnn", IMAGES, 10))
    assert [r["exchange_bytes_per_step"] for r in rows] == [tiny / 4, tiny / 4]
    # 1024 examples on 2 disjoint shards of 512 = 8 steps of 64; after the first swap (step 2)
    # the stale copies teach: a KD term appears
    assert all(r["train_kd"] > 0 and r["exchange_share"] > 0 for r in rows)


def test_disjoint_peers_draw_from_disjoint_shards():
    from online_distill.data.datasets import Batches, synthetic
    from online_distill.core.topology import train_shard

    ds = synthetic(config_mod.DataConfig(), n_train=400).train
    seen = []
    for rank in range(PEERS * REPLICAS):
        shard, n = train_shard(rank, PEERS, REPLICAS, disjoint_peers=True)
        seen.append(set(Batches(ds, 10, torch.device("cpu"), shard=shard, num_shards=n)._indices().tolist()))
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 400  # no example seen by two workers
