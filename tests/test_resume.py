"""Which checkpoint a rerun resumes from when files are damaged or saves never finished: run
directories made here, no Ray cluster (Ray's own Result.from_path reads its record of checkpoints)."""
import json
import os
import shutil
from importlib.metadata import version
from types import SimpleNamespace

import pytest
import torch

from online_distill import checkpoint as ckpt
from online_distill import config as C
from online_distill.run.resume import SNAPSHOT, SUPERSEDED, check_resume, find_resume_point, verify
from online_distill.topology import Topology

NUM_PEERS = 2


def save_checkpoint(run_dir, epoch: int) -> str:
    """checkpoint_epoch_{epoch+1} as Ray gathers it: each rank saves into a directory of its own,
    whose files are then copied into the one checkpoint directory."""
    name = f"checkpoint_epoch_{epoch + 1:04d}"
    for rank in range(NUM_PEERS):
        own = run_dir / f"tmp_rank{rank}"
        own.mkdir()
        net = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1)
        ckpt.save(str(own), Topology(rank, NUM_PEERS, 1), epoch, [(net, opt, sched)],
                  SimpleNamespace(state_dict=lambda i: {}), [{"epoch": e + 1} for e in range(epoch + 1)])
        shutil.copytree(own, run_dir / name, dirs_exist_ok=True)
        shutil.rmtree(own)
    return name


def make_run(tmp_path, epochs: int = 3):
    """A run directory with `epochs` checkpoints and Ray's snapshot listing them, latest last."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    names = [save_checkpoint(run_dir, e) for e in range(epochs)]
    results = [{"version": 0, "checkpoint_dir_name": n, "metrics": {"epoch": i + 1}} for i, n in enumerate(names)]
    snap = {"ray_version": version("ray"), "checkpoint_results": results, "checkpoint_report_indices": list(range(epochs)),
            "latest_checkpoint_result": results[-1], "pending_training_results": [], "pending_validation_specs": [],
            "current_report_index": epochs, "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}
    (run_dir / SNAPSHOT).write_text(json.dumps(snap))
    return run_dir, names


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def cfg(run_dir):
    return C.from_dict({"models": ["tiny_cnn"] * NUM_PEERS, "data": {"dataset": "synthetic"},
                        "run": {"name": run_dir.name, "storage_path": str(run_dir.parent)}})


def test_an_intact_run_resumes_from_its_newest_checkpoint_and_sets_rays_record_aside(tmp_path):
    run_dir, names = make_run(tmp_path)
    before = (run_dir / SNAPSHOT).read_text()
    assert verify(str(run_dir / names[-1]), NUM_PEERS) == []
    point = find_resume_point(str(run_dir), NUM_PEERS)
    assert point.checkpoint == names[-1] and not point.needs_fallback
    assert check_resume(cfg(run_dir), str(run_dir)) == (None, str(run_dir / names[-1]))
    # Ray's record of the earlier attempt is kept aside; the checkpoint is handed to the loop
    assert not (run_dir / SNAPSHOT).exists() and (run_dir / (SUPERSEDED + SNAPSHOT)).read_text() == before
    assert sorted(p for p in os.listdir(run_dir) if "checkpoint_epoch" in p) == names
    # each rank's manifest lists the files it wrote, and how many ranks save into the checkpoint
    manifest = json.loads((run_dir / names[-1] / "manifest_rank1.json").read_text())
    assert set(manifest["files"]) == {"peer1.pt", "rng_rank1.pt"} and manifest["world_size"] == NUM_PEERS


def test_a_cut_short_peer_file_falls_back_to_the_previous_checkpoint(tmp_path):
    run_dir, names = make_run(tmp_path)
    truncate(run_dir / names[-1] / "peer0.pt")
    damaged = (run_dir / names[-1] / "peer0.pt").read_bytes()
    line, start = check_resume(cfg(run_dir), str(run_dir))
    assert line.startswith(f"resume: {names[-1]} is damaged (peer0.pt: ")
    assert line.endswith(f"moved to damaged-{names[-1]}; resuming from {names[-2]} in {run_dir}") and "\n" not in line
    assert start == str(run_dir / names[-2])
    # kept, under a name no tool takes for a checkpoint
    assert (run_dir / f"damaged-{names[-1]}" / "peer0.pt").read_bytes() == damaged
    assert not (run_dir / names[-1]).exists()
    assert check_resume(cfg(run_dir), str(run_dir)) == (None, start)  # a second rerun finds nothing more to do


def test_a_directory_rays_record_lists_but_that_is_gone_no_longer_stops_a_rerun(tmp_path):
    # Ray refuses a record that lists a missing directory; the rerun no longer hands Ray that record
    run_dir, names = make_run(tmp_path, epochs=2)
    os.rename(run_dir / names[-1], run_dir / f"elsewhere-{names[-1]}")
    from ray.train import Result

    with pytest.raises(Exception, match="does not exist anymore"):
        Result.from_path(str(run_dir))
    assert check_resume(cfg(run_dir), str(run_dir)) == (None, str(run_dir / names[0]))
    assert not (run_dir / SNAPSHOT).exists()


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
    assert find_resume_point(str(run_dir), NUM_PEERS).checkpoint == names[0]


def test_checkpoints_without_manifests_are_checked_by_loading_and_tolerate_a_missing_rng_file(tmp_path):
    run_dir, names = make_run(tmp_path, epochs=1)
    d = run_dir / names[0]
    for m in d.glob("manifest_rank*.json"):
        m.unlink()
    os.remove(d / "rng_rank1.pt")  # e.g. the world size changed
    assert verify(str(d), NUM_PEERS) == []  # listed by Ray: complete
    # unlisted, nothing says every rank finished
    assert verify(str(d), NUM_PEERS, listed=False) == [
        "(manifests): none says how many ranks saved into it, and Ray's record does not list it"]
    truncate(d / "peer1.pt")
    (problem,) = verify(str(d), NUM_PEERS)
    assert problem.startswith("peer1.pt: unreadable (RuntimeError: PytorchStreamReader failed"), problem
    os.remove(d / "peer0.pt")
    assert verify(str(d), NUM_PEERS)[0] == "peer0.pt: missing"
    assert verify(str(d), 3)[-1] == "peer2.pt: missing"  # a peer the run has and the checkpoint lacks


def test_files_of_two_saves_in_one_directory_are_damage(tmp_path):
    run_dir, names = make_run(tmp_path, epochs=2)
    shutil.copy(run_dir / names[0] / "history.json", run_dir / names[1] / "history.json")
    for m in (run_dir / names[1]).glob("manifest_rank*.json"):
        m.unlink()
    assert verify(str(run_dir / names[1]), NUM_PEERS) == [
        "(all files): from different epochs: history.json 0, peer0.pt 1, peer1.pt 1"]


def test_no_intact_checkpoint_is_refused_naming_the_files_and_how_to_start_over(tmp_path):
    run_dir, names = make_run(tmp_path, epochs=2)
    truncate(run_dir / names[1] / "peer0.pt")
    (run_dir / names[0] / "history.json").write_text("")
    before = sorted(os.listdir(run_dir)), (run_dir / SNAPSHOT).read_text()
    with pytest.raises(C.ConfigError) as e:
        check_resume(cfg(run_dir), str(run_dir))
    msg = str(e.value)
    assert msg.startswith(f"run.name: 'run' cannot resume, no checkpoint in {run_dir} loads (")
    assert f"{names[1]}: peer0.pt: " in msg and f"{names[0]}: history.json: " in msg
    assert "--set run.name=run-2" in msg and f"move {run_dir} away" in msg and "\n" not in msg
    assert (sorted(os.listdir(run_dir)), (run_dir / SNAPSHOT).read_text()) == before  # nothing moved


def test_a_save_that_never_finished_is_moved_aside_before_the_rerun_writes_that_name_again(tmp_path):
    run_dir, names = make_run(tmp_path, epochs=2)
    save_checkpoint(run_dir, 2)  # on disk, not in Ray's record ...
    os.remove(run_dir / "checkpoint_epoch_0003" / "manifest_rank1.json")  # ... and rank 1 never finished it
    line, start = check_resume(cfg(run_dir), str(run_dir))
    assert line == (f"resume: checkpoint_epoch_0003 was never completed, moved to incomplete-checkpoint_epoch_0003; "
                    f"resuming from {names[-1]} in {run_dir}")
    assert start == str(run_dir / names[-1])
    assert sorted(p for p in os.listdir(run_dir) if "checkpoint_epoch" in p) == [*names, "incomplete-checkpoint_epoch_0003"]


def test_a_complete_checkpoint_ray_never_listed_is_resumed_from(tmp_path):
    # written by a cohort trained in the driver's process (run.in_process), or every rank finished
    # saving and the driver died before Ray listed it: its manifests say it is complete
    run_dir, names = make_run(tmp_path, epochs=2)
    newest = save_checkpoint(run_dir, 2)
    assert check_resume(cfg(run_dir), str(run_dir)) == (None, str(run_dir / newest))
    # a run directory with no record of Ray's at all (only ever trained in-process)
    (run_dir / (SUPERSEDED + SNAPSHOT)).unlink()
    assert find_resume_point(str(run_dir), NUM_PEERS).checkpoint == newest
    # the newest by epoch, whatever the order they were written in
    shutil.rmtree(run_dir / names[0])
    save_checkpoint(run_dir, 0)
    assert find_resume_point(str(run_dir), NUM_PEERS).checkpoint == newest


def test_a_run_whose_only_checkpoint_never_finished_starts_from_scratch(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    only = save_checkpoint(run_dir, 0)
    os.remove(run_dir / only / "manifest_rank0.json")
    line, start = check_resume(cfg(run_dir), str(run_dir))
    assert start is None and line.endswith(f"moved to incomplete-{only}; starting from scratch in {run_dir}")


def test_a_run_without_a_snapshot_starts_from_scratch(tmp_path):
    assert not find_resume_point(str(tmp_path / "new"), NUM_PEERS).needs_fallback
    run_dir, _ = make_run(tmp_path, epochs=1)
    (run_dir / SNAPSHOT).write_text("{not json")
    with pytest.raises(C.ConfigError, match="is unreadable .*new run.name"):
        find_resume_point(str(run_dir), NUM_PEERS)


def test_the_snapshot_name_is_rays():
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
