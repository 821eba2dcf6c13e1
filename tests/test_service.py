"""One frozen teacher for many students (distill.teacher_service) on the shared local Ray: the same
student as with the teacher in its own process, one teacher for a whole sweep, and a teacher
actor lost in the middle of a run that is restarted with no change to the numbers."""
from __future__ import annotations

import threading
import time

import pandas as pd
import pytest
import ray

from online_distill.config import schema as C
from online_distill.run import train
from online_distill.sweep.spec import SchedulerSpec, SweepSpec

pytestmark = pytest.mark.e2e
COLS = ["epoch", "member", "val_acc", "val_nll", "train_ce", "train_kd"]


@pytest.fixture(scope="module")
def teacher_run(ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("service")
    cfg = C.from_dict({
        "models": ["tiny_cnn"], "distill": {"mode": "independent"},
        "data": {"dataset": "synthetic", "val_size": 300, "train_subset": 512, "test_subset": 300},
        "optim": {"lr": 0.05, "schedule": "constant"}, "train": {"epochs": 1, "batch_size": 64},
        "scale": {"cpus_per_worker": 1}, "run": {"name": "teacher", "storage_path": str(storage), "max_failures": 0}})
    return train(cfg, verbose=False).run_dir, storage


def student(teacher_dir: str, storage, name: str, **over) -> C.Config:
    cfg = C.from_dict({
        "models": ["mlp"], "distill": {"mode": "offline", "teacher_checkpoint": teacher_dir},
        "data": {"dataset": "synthetic", "val_size": 300, "train_subset": 512, "test_subset": 300},
        "loss": {"temperature": 3.0, "kd_weight": 0.7}, "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 2, "batch_size": 64}, "scale": {"cpus_per_worker": 1},
        "run": {"name": name, "storage_path": str(storage), "max_failures": 0}})
    return C.with_overrides(cfg, over)


def replicas() -> list:
    from ray.util.state import list_actors

    # this session's address: without it the state API refuses to choose when another Ray runs on the machine
    address = ray.get_runtime_context().gcs_address
    return [a for a in list_actors(address=address, filters=[("class_name", "=", "TeacherReplica")], limit=1000)]


def test_the_service_teaches_what_the_teacher_in_process_teaches(teacher_run):
    teacher_dir, storage = teacher_run
    here = train(student(teacher_dir, storage, "in_process"), verbose=False)
    served = train(student(teacher_dir, storage, "served", **{"distill.teacher_service": True}), verbose=False)
    pd.testing.assert_frame_equal(served.history[COLS], here.history[COLS], rtol=1e-5, atol=1e-6)
    assert served.history["teacher_forwards"].sum() == 0  # the students ran no teacher of their own
    assert served.metrics["service/forwards"] == 512  # the service ran the teacher once per example (2 epochs)
    assert served.metrics["service/requests"] >= 16


def test_a_sampled_target_from_the_service_is_the_one_made_in_process_for_every_peer(teacher_run):
    """The service draws a sampled target's tokens by the example's digest and teacher 0, as the
    teacher in the students' own process does: two peers learn the same either way."""
    teacher_dir, storage = teacher_run
    over = {"models": ["mlp", "tiny_cnn"], "scale.peers_per_worker": 2, "distill.logits": "sampled",
            "distill.logits_k": 3, "distill.logits_bits": 8}  # rounded where made: the same numbers, bit for bit
    here = train(student(teacher_dir, storage, "sampled_here", **over), verbose=False)
    served = train(student(teacher_dir, storage, "sampled_served", **over, **{"distill.teacher_service": True}),
                   verbose=False)
    assert set(here.history["member"]) >= {"peer0", "peer1"}
    pd.testing.assert_frame_equal(served.history[COLS], here.history[COLS], rtol=1e-5, atol=1e-6)


def test_a_lost_teacher_actor_is_restarted_and_the_run_ends_with_the_same_numbers(teacher_run):
    teacher_dir, storage = teacher_run
    calm = train(student(teacher_dir, storage, "calm", **{"distill.teacher_service": True,
                                                           "distill.service_replicas": 1}), verbose=False)
    killed: list = []

    def kill_once() -> None:  # as soon as the students have started asking, a teacher actor dies
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for entry in ray.util.list_named_actors(all_namespaces=True):
                if entry["namespace"] != "online_distill" or not entry["name"].startswith("teacher-"):
                    continue
                try:
                    handle = ray.get_actor(entry["name"], namespace="online_distill")
                    if ray.get(handle.stats.remote(), timeout=10)["requests"] >= 3:
                        ray.kill(handle, no_restart=False)
                        killed.append(entry["name"])
                        return
                except Exception:  # noqa: BLE001 - not up yet, or going: look again
                    pass
            time.sleep(0.05)

    cfg = student(teacher_dir, storage, "storm", **{"distill.teacher_service": True, "distill.service_replicas": 2,
                                                     "distill.service_cpus": 0.5})
    t = threading.Thread(target=kill_once, daemon=True)
    t.start()
    stormy = train(cfg, verbose=False)
    t.join(timeout=5)
    assert killed, "the teacher actor was never killed"
    pd.testing.assert_frame_equal(stormy.history[COLS], calm.history[COLS], rtol=1e-5, atol=1e-6)


def test_a_sweep_of_four_kd_trials_starts_the_teacher_once(teacher_run, tmp_path):
    from online_distill.sweep.driver import run_sweep

    teacher_dir, storage = teacher_run
    before = {a.actor_id for a in replicas()}
    base = student(teacher_dir, tmp_path, "base", **{"distill.teacher_service": True, "scale.cpus_per_worker": 0.5,
                                                        "train.epochs": 1})
    spec = SweepSpec(name="served", base=base, points=tuple({"loss.temperature": t} for t in (1.0, 2.0, 4.0)),
                     seeds=(0,), scheduler=SchedulerSpec(name="none"), storage_path=str(tmp_path / "sweeps"))
    res = run_sweep(spec, verbose=0)
    started = [a for a in replicas() if a.actor_id not in before]
    assert len(started) == 1  # one teacher for every trial
    assert len(res.trials) == 4 and (res.trials["status"] == "TERMINATED").all()
    for t, row in res.trials.set_index("loss.temperature").iterrows():
        own = train(C.with_overrides(base, {"loss.temperature": float(t), "distill.teacher_service": False,
                                            "run.name": f"own-{t}", "run.storage_path": str(tmp_path)}), verbose=False)
        assert row["objective_final"] == pytest.approx(own.history.query("member == 'peer0'")["val_acc"].iloc[-1],
                                                        abs=1e-5)


def test_a_born_again_chain_is_taught_through_the_service_as_in_process(teacher_run):
    """Born-again generation g > 0 is an offline run taught by frozen generation g - 1: with the
    service on, each generation's teacher is served, and the chain learns the same numbers."""
    _, storage = teacher_run
    over = {"distill.mode": "born_again", "distill.generations": 2, "distill.teacher_checkpoint": None}
    here = train(student("", storage, "ba_here", **over), verbose=False)
    served = train(student("", storage, "ba_served", **over, **{"distill.teacher_service": True}), verbose=False)
    pd.testing.assert_frame_equal(served.history[COLS], here.history[COLS], rtol=1e-5, atol=1e-6)
    assert served.metrics["service/forwards"] == 512 and here.history["teacher_forwards"].sum() > 0
    assert served.history["teacher_forwards"].sum() == 0
    assert not replicas() or all(a["state"] == "DEAD" for a in replicas())  # each generation's service ended with it


def test_a_teacher_service_that_cannot_start_is_refused_before_any_student(teacher_run):
    """More CPUs than the cluster has free, or no checkpoint: one line on the driver, no student."""
    import os

    teacher_dir, storage = teacher_run
    with pytest.raises(C.ConfigError, match=r"^distill\.service_cpus: 1 new replica\(s\) of 64 CPU need 64 CPU, and the "
                                            r"cluster has [\d.]+ free\. Allowed: fewer distill\.service_replicas"):
        train(student(teacher_dir, storage, "greedy", **{"distill.teacher_service": True, "distill.service_cpus": 64}),
              verbose=False)
    assert not [n for n in os.listdir(os.path.join(storage, "greedy")) if n.startswith("checkpoint_")]
    with pytest.raises(C.ConfigError, match=r"^distill\.teacher_checkpoint: '.*nowhere' does not exist"):
        train(student(str(storage / "nowhere"), storage, "orphan", **{"distill.teacher_service": True}), verbose=False)
    assert not os.path.exists(os.path.join(storage, "orphan"))
