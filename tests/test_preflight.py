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
