"""One preflight for every entry point (run/plan.py make_plan): `train`, a born-again chain, a
sweep and every `--dry-run` check once and read each dataset once on the driver. Counted here by
wrapping the dataset builder (every read of a dataset calls it) and the sweep spec's check."""
from __future__ import annotations

import os

import pytest
import yaml

from online_distill.cli import main
from online_distill.config import files as CF
from online_distill.config import schema as C
from online_distill.data import datasets as data_mod


@pytest.fixture
def reads(monkeypatch):
    """Calls of the synthetic dataset's builder in this process: one per read of the dataset."""
    calls = []
    real = data_mod.synthetic

    def counted(cfg):
        calls.append(cfg)
        return real(cfg)

    monkeypatch.setitem(data_mod.DATASETS, "synthetic", counted)
    return calls


def tiny_run(tmp_path, **over) -> C.Config:
    """A cohort of one tiny model that trains in this process in a second or two."""
    base = C.from_dict({
        "models": ["tiny_cnn"],
        "data": {"dataset": "synthetic", "val_size": 200, "train_subset": 256, "test_subset": 200},
        "optim": {"lr": 0.05, "schedule": "constant"},
        "train": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 2},
        "scale": {"cpus_per_worker": 1},
        "run": {"name": "r", "storage_path": str(tmp_path / "runs"), "max_failures": 0},
    })
    return C.with_overrides(base, over)


def written(cfg: C.Config, path) -> str:
    path.write_text(CF.dump(cfg))
    return str(path)


# ---- born-again: the chain's plan is kept across its generations --------------------------------

def born_again(tmp_path, generations: int) -> C.Config:
    return tiny_run(tmp_path, **{"distill.mode": "born_again", "distill.generations": generations, "run.name": "ban"})


@pytest.mark.parametrize("generations", [2, 3])
def test_a_born_again_chain_reads_its_dataset_once(tmp_path, reads, capsys, generations):
    """`train` of a chain of G generations: one read for the whole chain (it was G + 1: the CLI's
    plan was thrown away and every generation read the data again)."""
    path = written(born_again(tmp_path, generations), tmp_path / "ban.yaml")
    assert main(["train", path]) == 0
    assert len(reads) == 1
    run = tmp_path / "runs" / "ban"
    assert all((run / f"gen{g}" / "result.json").exists() for g in range(generations))
    assert (run / "generations.csv").exists() and (run / "result.json").exists()


def test_a_born_again_chain_through_the_python_api_and_its_dry_run_read_once(tmp_path, reads, capsys):
    from online_distill.run import train

    cfg = born_again(tmp_path, 3)
    assert main(["train", written(cfg, tmp_path / "ban.yaml"), "--dry-run"]) == 0
    assert len(reads) == 1 and "born-again: 3 generations" in capsys.readouterr().out
    res = train(cfg, verbose=False)
    assert len(reads) == 2  # the dry run's one, and the run's one
    assert res.final["member"].tolist() == ["gen0", "gen1", "gen2"]
    with pytest.raises(C.ConfigError, match="already finished"):
        train(cfg, verbose=False)
    assert len(reads) == 2  # a finished chain is refused before its data are read


# ---- a sweep: its spec checked once, each dataset read once; its dry run is its preflight ----------

@pytest.fixture
def spec_checks(monkeypatch):
    """Calls of SweepSpec.check: one per check of the sweep file."""
    from online_distill.sweep import spec as S

    calls = []
    real = S.SweepSpec.check

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(S.SweepSpec, "check", counted)
    return calls


def sweep_file(tmp_path, base: dict | None = None, **fields) -> str:
    """Two tiny_cnn peers packed in one worker (each trial in Train's local mode), DML over two
    temperatures and two seeds with the independent baseline: 6 trials on one data config."""
    raw = {"name": "sw", "storage_path": str(tmp_path / "sweeps"),
           "base": {"models": ["tiny_cnn", "tiny_cnn"],
                    "data": {"dataset": "synthetic", "val_size": 200, "train_subset": 256, "test_subset": 200},
                    "distill": {"mode": "dml"}, "optim": {"lr": 0.05, "schedule": "constant"},
                    "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 2},
                    "scale": {"cpus_per_worker": 0.5, "peers_per_worker": 2}, "run": {"max_failures": 0},
                    **(base or {})},
           "space": {"loss.temperature": {"grid": [1.0, 4.0]}}, "seeds": [0, 1], "baseline": True,
           "scheduler": {"name": "none"}, **fields}
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_sweeps_dry_run_checks_the_spec_once_and_reads_each_dataset_once(tmp_path, reads, spec_checks, capsys):
    """10 trials over two data configs (data.train_subset swept): one check of the sweep file (it
    was two for a dry run, three for a sweep) and one read per data config (a dry run read none)."""
    from online_distill.sweep.spec import describe, from_dict

    path = sweep_file(tmp_path, space={"loss.temperature": {"grid": [1.0, 4.0]},
                                       "data.train_subset": {"grid": [256, 512]}})
    assert main(["tune", path, "--dry-run"]) == 0
    assert len(spec_checks) == 1
    assert sorted(c.train_subset for c in reads) == [256, 512]
    out = capsys.readouterr().out
    assert out.startswith("dry run: sweep 'sw'") and "10 trials" in out.splitlines()[0]
    # what it prints is the sweep's table as before, nothing more on this machine
    assert out == describe(from_dict(yaml.safe_load(open(path)), check=False)) + "\n"


def test_a_sweeps_dry_run_refuses_trials_this_machine_cannot_place(tmp_path, reads, spec_checks, capsys):
    """More CPUs per trial than the machine has: one line naming the field, before any data are
    read (a dry run used to say nothing of resources and exit 0)."""
    too_many = (os.cpu_count() or 1) + 1
    path = sweep_file(tmp_path)
    assert main(["tune", path, "--dry-run", "--set", f"scale.cpus_per_worker={too_many}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"online-distill: config error: sweep file {path!r}")
    assert f"scale.cpus_per_worker: got {too_many}; allowed: at most {os.cpu_count()}" in err[0]
    assert reads == [] and len(spec_checks) == 1


def test_refusals_of_a_sweeps_fields_still_come_first(tmp_path, reads, spec_checks, capsys):
    path = sweep_file(tmp_path)
    assert main(["tune", path, "--dry-run", "--set", "num_samples=0", "--set", "models=[tiny_cnn, nope]"]) == 2
    err = capsys.readouterr().err
    assert "num_samples: got 0" in err and reads == []  # the field, before any registry name or data
    assert main(["tune", path, "--dry-run", "--set", "models=[tiny_cnn, nope]"]) == 2
    assert "models[1]: unknown model 'nope'" in capsys.readouterr().err and reads == []


def stand_in_teacher(tmp_path) -> str:
    """An untrained tiny_cnn's state dict: a frozen teacher for an offline sweep."""
    import torch

    from online_distill.models.builders import build_model

    data = data_mod.load_data(tiny_run(tmp_path).data)
    path = tmp_path / "teacher.pt"
    torch.save(build_model("tiny_cnn", data.sample, data.num_classes).state_dict(), path)
    return str(path)


@pytest.mark.e2e
def test_a_sweep_checks_its_spec_once_and_reads_its_dataset_once(ray_session, tmp_path, reads, spec_checks, capsys):
    """`tune` of an offline-KD sweep (a frozen teacher whose outputs the sweep caches before any
    trial) over two batch sizes, with its baseline: 3 trials on one data config. On the driver
    one check of the sweep file (it was 3) and one read of the dataset (it was 4: the teacher's
    check twice and once per batch size); each trial reads it in its own process."""
    teacher = stand_in_teacher(tmp_path)
    reads.clear()
    path = sweep_file(tmp_path, base={"models": ["tiny_cnn"], "scale": {"cpus_per_worker": 0.5},
                                      "distill": {"mode": "offline", "teacher_checkpoint": teacher,
                                                  "teacher_model": "tiny_cnn",
                                                  "teacher_cache_dir": str(tmp_path / "cache")}},
                      space={"train.batch_size": {"grid": [32, 64]}}, seeds=[0])
    assert main(["tune", path]) == 0
    assert len(spec_checks) == 1 and len(reads) == 1
    out = capsys.readouterr().out
    assert "teacher cache" in out and "the teacher ran on" in out  # filled once, before the trials
    trials = __import__("pandas").read_csv(tmp_path / "sweeps" / "sw" / "trials.csv")
    assert len(trials) == 3 and (trials["status"] == "TERMINATED").all()
    # the sweep itself refuses what its dry run refuses: a trial the cluster cannot place
    assert main(["tune", path, "--set", "scale.cpus_per_worker=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scale.cpus_per_worker: got 64; allowed: at most" in err[0]
