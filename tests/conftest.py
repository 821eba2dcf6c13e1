"""Shared test fixtures: one local Ray session for every end-to-end test, and tiny configs."""
from __future__ import annotations

import logging
import os

import pytest

from online_distill.config import schema as config_mod

# End-to-end tests start their own embedded Ray, never a cluster a developer has running.
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (Ray start-up costs seconds).
    4 logical CPUs on a 2-core machine: enough for a 2-peer x 2-replica cohort or two
    2-worker Tune trials at once; the tiny models do not mind the oversubscription."""
    import ray

    from online_distill.run.env import use_local_ray_env

    use_local_ray_env()  # as an embedded run of online-distill has it
    ray.init(num_cpus=4, num_gpus=0, logging_level=logging.WARNING, include_dashboard=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def spawn_world():
    """Run worker(rank, *args) in `nprocs` processes, e.g. one torch.distributed world of gloo
    ranks. Forkserver: torch and the package are imported once, not once per rank (2 cores here)."""
    import torch.multiprocessing as mp

    def spawn(worker, args: tuple, nprocs: int) -> None:
        mp.get_context("forkserver").set_forkserver_preload(["torch", "online_distill.training.loop"])
        mp.start_processes(worker, args=args, nprocs=nprocs, start_method="forkserver")

    return spawn


def tiny_cfg(root, **overrides) -> config_mod.Config:
    """A tiny, fast run config under root/runs; keyword overrides use dotted names (`__` for `.`)."""
    base = config_mod.from_dict({
        "models": ["tiny_cnn", "tiny_cnn"],
        "data": {"dataset": "synthetic", "val_size": 500, "train_subset": 1024, "test_subset": 500},
        "loss": {"temperature": 3.0, "kd_weight": 0.5},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 2, "batch_size": 64, "seed": 0},
        "scale": {"cpus_per_worker": 1},
        "run": {"name": "t", "storage_path": str(root / "runs"), "max_failures": 0},
    })
    return config_mod.with_overrides(base, {k.replace("__", "."): v for k, v in overrides.items()})


@pytest.fixture
def make_cfg(tmp_path):
    """A tiny, fast run config under tmp_path; keyword overrides use dotted names."""

    def make(**overrides) -> config_mod.Config:
        return tiny_cfg(tmp_path, **overrides)

    return make


@pytest.fixture
def no_ray(monkeypatch):
    """A run must be refused before Ray: starting it (or a trainer) fails the test."""
    import time

    import online_distill.run.env as env
    import online_distill.run.launch as launch

    def started(*a, **k):
        raise AssertionError("Ray was started for a run the driver should have refused")

    monkeypatch.setattr(env, "init_ray", started)
    monkeypatch.setattr(launch, "make_trainer", started)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.perf_counter()
    yield
    assert time.perf_counter() - t0 < 30


def _world_worker(rank: int, cfg, tmp: str) -> None:
    """One rank of a gloo world running the real training loop; rank 0 writes the history."""
    import json

    import torch
    import torch.distributed as dist

    from online_distill.training.loop import run

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=cfg.world_size)
    history = run(cfg, rank, torch.device("cpu"))
    if rank == 0:
        with open(os.path.join(tmp, "history.json"), "w") as f:
            json.dump(history, f)
    dist.destroy_process_group()


@pytest.fixture
def train_history(tmp_path, spawn_world):
    """History of a cohort trained by the real loop without Ray: in this process when it has one
    worker, else in a gloo world of one process per worker."""
    import itertools
    import json

    import torch

    from online_distill.run.checks import check
    from online_distill.training.loop import run

    counter = itertools.count()

    def train(cfg) -> list[dict]:
        check(cfg)
        if cfg.world_size == 1:
            before = torch.get_num_threads()
            try:
                return run(cfg, 0, torch.device("cpu"))
            finally:
                torch.set_num_threads(before)  # the loop sets its worker's thread count
        tmp = tmp_path / f"world{next(counter)}"
        tmp.mkdir()
        spawn_world(_world_worker, (cfg, str(tmp)), cfg.world_size)
        return json.loads((tmp / "history.json").read_text())

    return train
