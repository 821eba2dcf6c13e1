"""Which checkpoint a rerun resumes from when files are damaged or saves never finished: run
directories made here with the checkpoint writer every rank uses, no Ray."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from online_distill.rundir import checkpoint as ckpt
from online_distill.config import schema as C
from online_distill.rundir.layout import RunDir, checkpoint_name
from online_distill.run.resume import check_resume, find_resume_point
from online_distill.core.topology import Topology

NUM_PEERS = 2


def verify(directory: str, num_peers: int) -> list[str]:
    return [f"{n}: {what}" for n, what in sorted(ckpt.verify(directory, num_peers).problems.items())]


def save_checkpoint(run_dir, epoch: int) -> str:
    """checkpoint_epoch_{epoch+1} as two ranks (one peer each) write it: each its own files into
    the one directory, its manifest last."""
    name = checkpoint_name(epoch)
    for rank in range(NUM_PEERS):
        net = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1)
        record = ckpt.Epoch(epoch, {"epoch": epoch + 1} if rank == 0 else {},
                            [{"epoch": e + 1} for e in range(epoch + 1)] if rank == 0 else [],
                            Topology(rank, NUM_PEERS, 1), [(net, opt, sched)], SimpleNamespace(state_dict=lambda i: {}))
        ckpt.save(str(run_dir / name), record)
    return name


def make_run(tmp_path, epochs: int = 3):
    """A run directory with `epochs` checkpoints, latest last."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir, [save_checkpoint(run_dir, e) for e in range(epochs)]


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def cfg(run_dir):
    return C.from_dict({"models": ["tiny_cnn"] * NUM_PEERS, "data": {"dataset": "synthetic"},
                        "run": {"name": run_dir.name, "storage_path": str(run_dir.parent)}})


def test_an_intact_run_resumes_from_its_newest_checkpoint(tmp_path):
    run_dir, names = make_run(tmp_path)
    assert verify(str(run_dir / names[-1]), NUM_PEERS) == []
    point = find_resume_point(RunDir(run_dir), NUM_PEERS)
    assert point.checkpoint == str(run_dir / names[-1]) and point.epoch == 2 and not point.needs_fallback
    assert check_resume(cfg(run_dir), RunDir(run_dir)) == (None, str(run_dir / names[-1]))
    assert sorted(p for p in os.listdir(run_dir) if "checkpoint_epoch" in p) == names
    # each rank's manifest lists the files it wrote, and how many ranks save into the checkpoint
    manifest = json.loads((run_dir / names[-1] / "manifest_rank1.json").read_text())
    assert set(manifest["files"]) == {"peer1.pt", "rng_rank1.pt"} and manifest["world_size"] == NUM_PEERS


def test_a_cut_short_peer_file_falls_back_to_the_previous_checkpoint(tmp_path):
    run_dir, names = make_run(tmp_path)
    truncate(run_dir / names[-1] / "peer0.pt")
    damaged = (run_dir / names[-1] / "peer0.pt").read_bytes()
    line, start = check_resume(cfg(run_dir), RunDir(run_dir))
    assert line.startswith(f"resume: {names[-1]} is damaged (peer0.pt: ")
    assert line.endswith(f"moved to damaged-{names[-1]}; resuming from {names[-2]} (epoch 2 done) in {run_dir}")
    assert "\n" not in line and start == str(run_dir / names[-2])
    # kept, under a name no tool takes for a checkpoint
    assert (run_dir / f"damaged-{names[-1]}" / "peer0.pt").read_bytes() == damaged
    assert not (run_dir / names[-1]).exists()
    assert check_resume(cfg(run_dir), RunDir(run_dir)) == (None, start)  # a second rerun finds nothing more to do


@pytest.mark.parametrize("damage, expect", [
    (lambda d: os.remove(d / "peer1.pt"), "peer1.pt: missing (manifest_rank1.json lists it)"),
    (lambda d: truncate(d / "rng_rank1.pt"), "rng_rank1.pt: "),
    (lambda d: (d / "history.json").write_text('{"epoch": 2, "hist'), "history.json: "),
    (lambda d: (d / "manifest_rank0.json").write_text("{"), "manifest_rank0.json: unreadable"),
])
def test_every_file_a_resume_reads_is_checked(tmp_path, damage, expect):
    run_dir, names = make_run(tmp_path, epochs=2)
    damage(run_dir / names[-1])
    problems = verify(str(run_dir / names[-1]), NUM_PEERS)
    assert len(problems) == 1 and problems[0].startswith(expect), problems
    assert find_resume_point(RunDir(run_dir), NUM_PEERS).checkpoint == str(run_dir / names[0])


def test_checkpoints_are_checked_by_loading_and_tolerate_a_missing_rng_file(tmp_path):
    run_dir, names = make_run(tmp_path, epochs=1)
    d = run_dir / names[0]
    manifest = json.loads((d / "manifest_rank1.json").read_text())
    del manifest["files"]["rng_rank1.pt"]  # e.g. written by a world of another size
    (d / "manifest_rank1.json").write_text(json.dumps(manifest))
    os.remove(d / "rng_rank1.pt")
    assert verify(str(d), NUM_PEERS) == []
    for m in d.glob("manifest_rank*.json"):
        m.unlink()
    assert verify(str(d), NUM_PEERS) == ["(manifests): none says how many ranks saved into it"]


def test_a_file_that_does_not_load_is_damage_even_at_its_listed_size(tmp_path):
    run_dir, names = make_run(tmp_path, epochs=1)
    d = run_dir / names[0]
    data = bytearray((d / "peer1.pt").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"x" * 64  # same size, garbled
    (d / "peer1.pt").write_bytes(bytes(data))
    (problem,) = verify(str(d), NUM_PEERS)
    assert problem.startswith("peer1.pt: unreadable ("), problem
    assert verify(str(d), 3)[-1] == "peer2.pt: missing"  # a peer the run has and the checkpoint lacks


def test_files_of_two_saves_in_one_directory_are_damage(tmp_path):
    run_dir, names = make_run(tmp_path, epochs=2)
    old = json.loads((run_dir / names[0] / "history.json").read_text())
    manifest = json.loads((run_dir / names[1] / "manifest_rank0.json").read_text())
    data = json.dumps(old)
    (run_dir / names[1] / "history.json").write_text(data)
    manifest["files"]["history.json"] = len(data)
    (run_dir / names[1] / "manifest_rank0.json").write_text(json.dumps(manifest))
    assert verify(str(run_dir / names[1]), NUM_PEERS) == [
        "(all files): from different epochs: history.json 0, peer0.pt 1, peer1.pt 1"]


def test_no_intact_checkpoint_is_refused_naming_the_files_and_how_to_start_over(tmp_path):
    run_dir, names = make_run(tmp_path, epochs=2)
    truncate(run_dir / names[1] / "peer0.pt")
    (run_dir / names[0] / "history.json").write_text("")
    before = sorted(os.listdir(run_dir))
    with pytest.raises(C.ConfigError) as e:
        check_resume(cfg(run_dir), RunDir(run_dir))
    msg = str(e.value)
    assert msg.startswith(f"run.name: 'run' cannot resume, no checkpoint in {run_dir} loads (")
    assert f"{names[1]}: peer0.pt: " in msg and f"{names[0]}: history.json: " in msg
    assert "--set run.name=run-2" in msg and f"move {run_dir} away" in msg and "\n" not in msg
    assert sorted(os.listdir(run_dir)) == before  # nothing moved


def test_a_save_that_never_finished_is_moved_aside_before_the_rerun_writes_that_name_again(tmp_path):
    run_dir, names = make_run(tmp_path, epochs=2)
    save_checkpoint(run_dir, 2)
    os.remove(run_dir / "checkpoint_epoch_0003" / "manifest_rank1.json")  # rank 1 never finished it
    line, start = check_resume(cfg(run_dir), RunDir(run_dir))
    assert line == (f"resume: checkpoint_epoch_0003 was never completed, moved to incomplete-checkpoint_epoch_0003; "
                    f"resuming from {names[-1]} (epoch 2 done) in {run_dir}")
    assert start == str(run_dir / names[-1])
    assert sorted(p for p in os.listdir(run_dir) if "checkpoint_epoch" in p) == [*names, "incomplete-checkpoint_epoch_0003"]


def test_the_newest_complete_checkpoint_by_epoch_is_resumed_from(tmp_path):
    run_dir, names = make_run(tmp_path, epochs=2)
    newest = save_checkpoint(run_dir, 2)
    assert check_resume(cfg(run_dir), RunDir(run_dir)) == (None, str(run_dir / newest))
    # the newest by epoch, whatever the order they were written in
    shutil.rmtree(run_dir / names[0])
    save_checkpoint(run_dir, 0)
    assert find_resume_point(RunDir(run_dir), NUM_PEERS).checkpoint == str(run_dir / newest)


def test_a_run_whose_only_checkpoint_never_finished_starts_from_scratch(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    only = save_checkpoint(run_dir, 0)
    os.remove(run_dir / only / "manifest_rank0.json")
    line, start = check_resume(cfg(run_dir), RunDir(run_dir))
    assert start is None and line.endswith(f"moved to incomplete-{only}; starting from scratch in {run_dir}")


def test_a_new_run_starts_from_scratch(tmp_path):
    point = find_resume_point(RunDir(tmp_path / "new"), NUM_PEERS)
    assert point.checkpoint is None and not point.needs_fallback and point.describe() == "from scratch"
