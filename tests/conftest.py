"""Shared test fixtures: one local Ray session for every end-to-end test, and tiny configs."""
from __future__ import annotations

import logging
import os

import pytest

from online_distill import config as config_mod

# End-to-end tests start their own embedded Ray, never a cluster a developer has running.
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (Ray start-up costs seconds).
    4 logical CPUs on a 2-core machine: enough for a 2-peer x 2-replica cohort or two
    2-worker Tune trials at once; the tiny models do not mind the oversubscription."""
    import ray

    from online_distill.run.launch import use_local_ray_env

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
        mp.get_context("forkserver").set_forkserver_preload(["torch", "online_distill.loop"])
        mp.start_processes(worker, args=args, nprocs=nprocs, start_method="forkserver")

    return spawn


@pytest.fixture
def make_cfg(tmp_path):
    """A tiny, fast run config under tmp_path; keyword overrides use dotted names."""

    def make(**overrides) -> config_mod.Config:
        base = config_mod.from_dict({
            "models": ["tiny_cnn", "tiny_cnn"],
            "data": {"dataset": "synthetic", "val_size": 500, "train_subset": 1024, "test_subset": 500},
            "loss": {"temperature": 3.0, "kd_weight": 0.5},
            "optim": {"lr": 0.05, "schedule": "constant"},
            "train": {"epochs": 2, "batch_size": 64, "seed": 0},
            "scale": {"cpus_per_worker": 1},
            "run": {"name": "t", "storage_path": str(tmp_path / "runs"), "max_failures": 0},
        })
        return config_mod.with_overrides(base, {k.replace("__", "."): v for k, v in overrides.items()})

    return make
