"""Born-again generations and offline KD end to end on the shared local Ray."""
from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.rundir.checkpoint import load_peer
from online_distill.run import train
from online_distill.rundir.layout import checkpoint_dir_of as find_checkpoint_dir

pytestmark = pytest.mark.e2e


def final_model(run_dir: str) -> dict:
    return load_peer(find_checkpoint_dir(run_dir), 0)["model"]


@pytest.fixture(scope="module")
def born_again(ray_session, tmp_path_factory):
    """Two generations of tiny_cnn, one epoch each, in one call of train(); each generation is
    two data-parallel replicas (DDP), each holding its own copy of the frozen teacher."""
    storage = tmp_path_factory.mktemp("ban")
    cfg = C.from_dict({
        "models": ["tiny_cnn"], "distill": {"mode": "born_again", "generations": 2},
        "data": {"dataset": "synthetic", "val_size": 500, "train_subset": 1024, "test_subset": 500},
        "loss": {"temperature": 3.0, "kd_weight": 0.5}, "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 1, "batch_size": 64}, "scale": {"cpus_per_worker": 1, "replicas": 2},
        "run": {"name": "ban", "storage_path": str(storage), "max_failures": 0},
    })
    return cfg, train(cfg, verbose=False)


def test_born_again_trains_each_generation_from_scratch_taught_by_the_last(born_again):
    cfg, res = born_again
    gen0, gen1 = (os.path.join(res.run_dir, f"gen{g}") for g in (0, 1))
    # every generation is an ordinary run whose results are kept
    for d in (gen0, gen1):
        assert {"config.yaml", "final.csv", "metrics.csv", "compression.csv", "result.json"} <= set(os.listdir(d))
    g0_cfg, g1_cfg = CF.load(os.path.join(gen0, "config.yaml")), CF.load(os.path.join(gen1, "config.yaml"))
    assert g0_cfg.distill.mode == "independent"
    assert g1_cfg.distill.mode == "offline" and g1_cfg.distill.teacher_checkpoint == gen0
    assert g1_cfg.train.seed == g0_cfg.train.seed  # same init and batches: the teacher is the only difference
    # generation 1's teacher is generation 0's final model, frozen through the whole run, stored
    # once in the run (teacher.pt), never again in a checkpoint
    named = load_peer(find_checkpoint_dir(gen1), 0)["teacher"]
    assert named["model_name"] == "tiny_cnn" and "model" not in named
    teacher = torch.load(os.path.join(gen1, "teacher.pt"), weights_only=True)
    assert teacher["model_name"] == "tiny_cnn"
    for k, v in final_model(gen0).items():
        assert torch.equal(teacher["model"][k], v), k
    h = res.history
    assert res.metrics["exchange_bytes_per_step"] == 0  # the teacher lives on each worker: no traffic
    assert res.final["member"].tolist() == ["gen0", "gen1"]
    assert (h.query("member == 'gen0'")["train_kd"] == 0).all() and (h.query("member == 'gen1'")["train_kd"] > 0).all()
    # the born-again directory has one table over the generations, and both compression reports
    gens = pd.read_csv(os.path.join(res.run_dir, "generations.csv"))
    assert gens["generation"].tolist() == [0, 1] and gens["model"].tolist() == ["tiny_cnn", "tiny_cnn"]
    comp = pd.read_csv(os.path.join(res.run_dir, "compression.csv"))
    g0_student = comp.query("generation == 0 and role == 'student'")["test_acc"].item()
    g1_teacher = comp.query("generation == 1 and member == 'peer0/teacher'")["test_acc"].item()
    assert g1_teacher == pytest.approx(g0_student)  # the teacher row is generation 0, evaluated again
    assert g0_student == pytest.approx(gens.query("generation == 0")["test_acc"].item())
    with pytest.raises(C.ConfigError, match="already finished"):
        train(cfg, verbose=False)


def test_offline_kd_of_another_architecture_from_an_earlier_run(born_again, tmp_path, monkeypatch):
    _, res = born_again
    monkeypatch.chdir(os.path.dirname(res.run_dir))  # a relative path, as written in a config file
    cfg = C.from_dict({
        "models": ["mlp"], "distill": {"mode": "offline", "teacher_checkpoint": "ban/gen1"},
        "data": {"dataset": "synthetic", "val_size": 500, "train_subset": 1024, "test_subset": 500},
        "loss": {"temperature": 3.0, "kd_weight": 0.7}, "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 1, "batch_size": 64}, "scale": {"cpus_per_worker": 1},
        "run": {"name": "kd", "storage_path": str(tmp_path), "max_failures": 0},
    })
    out = train(cfg, verbose=False)
    assert out.metrics["peer0/train_kd"] > 0 and out.metrics["exchange_bytes_per_step"] == 0
    assert out.metrics["peer0/exchange_share"] > 0  # the teacher's forward pass is part of the step time
    # the teacher stayed frozen: the run's copy is generation 1's final model, unchanged
    teacher = torch.load(os.path.join(out.run_dir, "teacher.pt"), weights_only=True)
    assert "model" not in load_peer(find_checkpoint_dir(out.run_dir), 0)["teacher"]
    for k, v in final_model(os.path.join(res.run_dir, "gen1")).items():
        assert torch.equal(teacher["model"][k], v), k
    comp = pd.read_csv(os.path.join(out.run_dir, "compression.csv")).set_index("member")
    assert comp.loc["peer0", "model"] == "mlp" and comp.loc["peer0/teacher", "model"] == "tiny_cnn"
    assert comp.loc["peer0", "params"] > comp.loc["peer0/teacher", "params"]  # here the "student" is the bigger one
    assert comp.loc["peer0", "test_acc"] == pytest.approx(out.metrics["peer0/test_acc"])
    assert (comp["latency_ms"] > 0).all() and (comp["size_kb"] > 0).all()
    saved = CF.load(os.path.join(out.run_dir, "config.yaml"))
    assert saved.distill.teacher_checkpoint == os.path.join(res.run_dir, "gen1")  # made absolute for the workers
