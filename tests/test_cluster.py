"""A real multi-node Ray cluster on this machine (a head and two worker nodes, token auth on),
a DML cohort submitted to it with `ray job submit`, its workers on different nodes, its results
and checkpoints in a directory every node reaches; submissions without the token refused; a
sweep that loses trial processes and nodes at random times and still ends with the numbers of
the same sweep without faults.

One cluster serves the whole module (starting Ray nodes costs tens of seconds on 2 cores)."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from chaos import Chaos, final_numbers, plan_faults, run_sweep, three_nodes, write_sweep

from online_distill.config import files as config_file
from online_distill.config import schema as config_mod

pytestmark = pytest.mark.e2e

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
RUN = "multinode_dml"
SUBMISSION = "od-multinode-1"


@pytest.fixture(scope="module")
def cluster():
    # short root: Ray's unix socket paths live under it and must stay below ~100 characters
    # one CPU per node and a custom resource naming each: a 2-worker cohort must span two nodes
    c = three_nodes(f"/tmp/odc-{os.getpid()}")
    c.start()
    yield c
    c.stop()
    c.remove()


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory):
    """Submit a 2-peer DML run the way the README says, with the token in the environment."""
    shared = tmp_path_factory.mktemp("shared_storage")  # the "shared filesystem" of all nodes
    workdir = tmp_path_factory.mktemp("job_workdir")
    cfg = config_mod.from_dict({
        "models": ["tiny_cnn", "tiny_cnn"],
        "data": {"dataset": "synthetic", "val_size": 500, "train_subset": 1024, "test_subset": 500},
        "loss": {"temperature": 3.0, "kd_weight": 0.5}, "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 2, "batch_size": 64}, "scale": {"cpus_per_worker": 1},
        "run": {"name": RUN, "storage_path": str(shared), "max_failures": 0},
    })
    (workdir / "run.yaml").write_text(config_file.dump(cfg))
    env = {**_env_without_ray_auth(), **cluster.client_env()}
    out = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", SUBMISSION,
         "--working-dir", str(workdir), "--runtime-env-json", '{"env_vars": {"PYTHONUNBUFFERED": "1"}}',
         "--", "online-distill", "train", "run.yaml"],
        env=env, capture_output=True, text=True, timeout=400)
    return {"out": out, "run_dir": shared / RUN}


def _env_without_ray_auth() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def test_submitted_run_succeeds_and_its_results_table_is_read(cluster, job):
    out = job["out"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    status = cluster.api(f"/api/jobs/{SUBMISSION}")
    assert status["status"] == "SUCCEEDED", status
    assert f"finished '{RUN}'" in out.stdout  # `ray job submit` followed the driver's logs
    final = pd.read_csv(job["run_dir"] / "final.csv")
    assert list(final["member"]) == ["peer0", "peer1", "ensemble"]
    assert (final["test_acc"] > 0.2).all()
    history = pd.read_csv(job["run_dir"] / "metrics.csv")
    assert sorted(history["epoch"].unique()) == [1, 2]


def test_cohort_workers_ran_on_different_worker_nodes(cluster, job):
    nodes = {n["node_id"]: n["resources_total"] for n in cluster.alive_nodes()}
    workers = cluster.actors("RayTrainWorker")
    assert len(workers) == 2, workers
    placed = {w["node_id"] for w in workers}
    assert len(placed) == 2  # one peer per node: their logits crossed nodes every step
    labels = {next(k for k in nodes[n] if k.startswith("node_")) for n in placed}
    assert len(labels) == 2 and labels <= {"node_head", "node_worker1", "node_worker2"}


def test_every_rank_wrote_into_the_shared_checkpoint(job):
    last = job["run_dir"] / "checkpoint_epoch_0002"
    # rank 0 (peer 0) and rank 1 (peer 1) ran on different nodes and wrote into one directory
    for name in ("peer0.pt", "peer1.pt", "rng_rank0.pt", "rng_rank1.pt", "history.json"):
        assert (last / name).is_file(), sorted(p.name for p in last.iterdir())


def test_submissions_without_the_right_token_are_refused(cluster, job, tmp_path):
    # no token at all: a fresh HOME so ~/.ray/auth_token is not found either
    env = {**_env_without_ray_auth(), "HOME": str(tmp_path)}
    out = subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard_url, "--no-wait", "--", "echo", "hi"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "401" in out.stdout + out.stderr or "Unauthorized" in out.stdout + out.stderr

    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match="403|Forbidden|Authentication failed"):
        JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": "Bearer not-the-token"}).submit_job(
            entrypoint="echo hi")
    # the cluster holds the one job we submitted with the token, and nothing else
    jobs = cluster.api("/api/jobs/")
    assert [j["submission_id"] for j in jobs] == [SUBMISSION]


def test_the_cluster_is_not_what_a_plain_ray_init_joins(cluster):
    """`ray start` leaves its address for ray.init() to join; ours leaves it in its own temp dir,
    so other Ray users on this machine never land on it by accident."""
    from online_distill.core.ray_adapter import read_ray_address

    port = cluster.address.rsplit(":", 1)[1]  # Ray writes the machine's IP for 127.0.0.1
    assert read_ray_address(os.path.join(cluster.root, "head")).endswith(f":{port}")
    assert not (read_ray_address() or "").endswith(f":{port}")


def test_a_sweep_that_loses_workers_and_nodes_at_random_ends_with_the_numbers_of_one_that_did_not(cluster, tmp_path):
    """8 trials, 3 at once (a CPU per node). The same sweep twice: without faults, then with two
    trial processes and a worker node killed at seeded random times in the first 40% of the time
    the fault-free sweep spent training (so every fault finds trials running, on a fast machine
    too; the node comes back 3 s later). Tune retries each lost trial from its last checkpoint, in one line;
    every trial finishes, with final numbers equal to the fault-free sweep's, and exit status 0."""
    calm = run_sweep(cluster, write_sweep(tmp_path / "calm.yaml", "calm", tmp_path / "sweeps"))
    assert calm.rc == 0 and calm.retries == 0, calm.text
    window = max(3.0, 0.4 * calm.training_s)  # a fixed 12 s outlasted the whole sweep on a quiet machine
    chaos = Chaos(cluster, plan_faults(seed=0, processes=2, nodes=1, window_s=window), seed=0)
    rough = run_sweep(cluster, write_sweep(tmp_path / "rough.yaml", "rough", tmp_path / "sweeps"), chaos=chaos)
    assert chaos.errors == [] and {f.kind for f in rough.injected} == {"node", "process"}, (chaos.errors, chaos.missed)
    assert rough.rc == 0 and rough.retries >= 1, rough.text
    assert "(raylet)" not in rough.text and "Traceback" not in rough.text and "sweep interrupted" not in rough.text
    assert rough.text.count("] finished: best_peer/val_acc") == 8, rough.text
    calm_numbers, rough_numbers = final_numbers(calm.sweep_dir), final_numbers(rough.sweep_dir)
    assert len(calm_numbers) == 8 and calm_numbers["complete"].all()
    pd.testing.assert_frame_equal(rough_numbers, calm_numbers, check_exact=True)


def test_stopping_the_cluster_leaves_other_ray_sessions_running(cluster, ray_session):
    """`ray stop` would have stopped every Ray on the machine; ours stops only its own nodes."""
    assert cluster.own_pids()
    cluster.stop()
    assert cluster.own_pids() == []

    @ray_session.remote(num_cpus=0)
    def alive() -> int:
        return 1

    assert ray_session.get(alive.remote(), timeout=60) == 1
