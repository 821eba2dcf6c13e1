"""online_distill.rundir.trackers against the real libraries: log a small run, read it back with each
library's own reader.

- tensorboard: tensorboard's EventAccumulator, as `tensorboard --logdir` loads it;
- mlflow: MlflowClient on the same SQLite store (metric history, params, artifacts, status);
- wandb (offline): wandb 0.31 ships no Python reader of its run files any more (the old
  `wandb.sdk.internal.datastore` went with the Python backend; wandb-core reads them in Go), so
  `wandb_records` below undoes the file's framing (LevelDB log: 7-byte header ':W&B' + 0xBEE1 +
  version, then 32 KiB blocks of [crc32, length, type] + payload) and parses each record with
  wandb's own protobuf schema, `wandb.proto.wandb_internal_pb2.Record`: what `wandb sync` uploads.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pandas as pd
import pytest

from online_distill.rundir import trackers as tr
from online_distill.config.schema import ConfigError

CONFIG = {"models": ["resnet18", "resnet18"], "loss": {"temperature": 3.0, "kd_weight": 0.5},
          "train": {"epochs": 3, "seed": 0}, "run": {"name": "a", "notes": "x" * 7000}}


@pytest.fixture(autouse=True)
def tracker_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # tests do not phone home
    for var in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # anything a library drops in the cwd shows up here


def acc(run: str, peer: int, epoch: int, attempt: int = 0) -> float:
    """A distinct, realistic accuracy per (run, peer, epoch, attempt)."""
    return round(0.6 + 0.1 * epoch + 0.01 * peer + (0.003 if run == "b" else 0) + 0.0007 * attempt, 6)


def epoch_metrics(run: str, epoch: int, attempt: int = 0) -> dict:
    """What metrics.merge_rank_stats hands rank 0 for 2 peers, plus a string and a NaN."""
    m: dict = {"epoch": epoch, "lr": 0.1 / epoch, "kd_weight": 0.5, "resumed_from_epoch": 0, "mode": "dml"}
    for p in range(2):
        m.update({f"peer{p}/val_acc": acc(run, p, epoch, attempt), f"peer{p}/val_nll": 1.0 / epoch,
                  f"peer{p}/train_ce": 0.9 / epoch, f"peer{p}/train_kd": 0.2 / epoch,
                  f"peer{p}/step_time_s": math.nan if epoch == 1 else 0.012})
    m.update({"ensemble/val_acc": acc(run, 0, epoch, attempt) + 0.02, "ensemble/val_nll": 0.8 / epoch,
              "mean/val_acc": acc(run, 0, epoch, attempt) + 0.005})
    return m


def final_table(run: str, epoch: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"member": ["peer0", "peer1", "ensemble"], "model": ["resnet18", "resnet18", "resnet18+resnet18"],
                         "val_acc": [acc(run, 0, epoch), acc(run, 1, epoch), acc(run, 0, epoch) + 0.02],
                         "val_nll": [0.33, 0.34, 0.3]})


def tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / tr.TB_DIR))
    ea.Reload()
    return [(e.step, pytest.approx(e.value, abs=1e-6)) for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else []


def tb_text(run_dir: Path, tag: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / tr.TB_DIR))
    ea.Reload()
    return ea.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def mlflow_client(storage: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{storage / tr.MLFLOW_DB}")


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, payload = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(payload)
            records.append(rec)
            payload = b""
    return records


def wandb_attempts(run_dir: Path) -> list[dict]:
    """One dict per attempt (offline-run folder), oldest first: run record, history by step, exit."""
    out = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        recs = wandb_records(f)
        kinds = [r.WhichOneof("record_type") for r in recs]
        run = next(r.run for r, k in zip(recs, kinds) if k == "run")
        steps = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                 for r, k in zip(recs, kinds) if k == "history"]
        exits = [r.exit.exit_code for r, k in zip(recs, kinds) if k == "exit"]
        out.append({"run": run, "steps": steps, "exit": exits, "dir": f.parent})
    return out


def log_run(t: tr.Trackers, run: str, epochs, attempt: int = 0) -> None:
    for e in epochs:
        t.log_epoch(e, epoch_metrics(run, e, attempt))


def test_each_tracker_logs_what_it_reads_back(tmp_path, capfd):
    """Two runs of one sweep log side by side from one process (as sweep trials may)."""
    storage = tmp_path / "runs"
    runs = {r: tr.TrackerRun(str(storage / r), r, "sweep1", {**CONFIG, "run": {**CONFIG["run"], "name": r}}, {})
            for r in ("a", "b")}
    opened = {r: tr.open_trackers(tr.TRACKERS, run) for r, run in runs.items()}
    for e in (1, 2, 3):
        for r, t in opened.items():
            t.log_epoch(e, epoch_metrics(r, e))
    for r, t in opened.items():
        t.log_table("final", final_table(r))
        t.finish()
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), "trackers must not talk on the terminal"
    assert list((tmp_path / "cwd").iterdir()) == []

    client = mlflow_client(storage)
    experiment = client.get_experiment_by_name("sweep1")
    for r, t in opened.items():
        ids, run_dir = t.ids, storage / r
        assert set(ids) == set(tr.TRACKERS)
        want = {p: [(e, pytest.approx(acc(r, p, e))) for e in (1, 2, 3)] for p in (0, 1)}

        # tensorboard
        for p in (0, 1):
            assert tb_scalars(run_dir, f"peer{p}/val_acc") == want[p]
        assert [s for s, _ in tb_scalars(run_dir, "peer0/step_time_s")] == [2, 3]  # NaN left out
        assert tb_scalars(run_dir, "mode") == []  # not a number
        assert "| ensemble | resnet18+resnet18 |" in tb_text(run_dir, "final")
        assert "temperature: 3.0" in tb_text(run_dir, "config")

        # mlflow
        info = client.get_run(ids["mlflow"])
        assert (info.info.run_name, info.info.experiment_id, info.info.status) == (r, experiment.experiment_id, "FINISHED")
        for p in (0, 1):
            history = client.get_metric_history(ids["mlflow"], f"peer{p}/val_acc")
            assert sorted((m.step, m.value) for m in history) == want[p]
        params = info.data.params
        assert (params["loss.temperature"], params["run.name"], params["models"]) == ("3.0", r, "['resnet18', 'resnet18']")
        assert len(params["run.notes"]) == tr.MLFLOW_PARAM_MAX and params["run.notes"].endswith("...")
        assert {a.path for a in client.list_artifacts(ids["mlflow"])} == {"config.yaml", "final.csv"}
        got = pd.read_csv(client.download_artifacts(ids["mlflow"], "final.csv", str(tmp_path)))
        pd.testing.assert_frame_equal(got, final_table(r))
        assert info.info.artifact_uri.startswith((storage / tr.MLFLOW_ARTIFACTS).as_uri())

        # wandb
        (attempt,) = wandb_attempts(run_dir)
        run = attempt["run"]
        assert (run.run_id, run.project, run.run_group, run.display_name) == (ids["wandb"], "sweep1", "sweep1", r)
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["loss"] == CONFIG["loss"] and config["run"]["name"] == r
        steps = attempt["steps"]
        assert [s["_step"] for s in steps] == [1, 2, 3]
        for p in (0, 1):
            assert [(s["_step"], s[f"peer{p}/val_acc"]) for s in steps] == want[p]
        assert "mode" not in steps[0] and "peer0/step_time_s" not in steps[0]
        (table_file,) = attempt["dir"].glob("files/media/table/final_*.table.json")
        table = json.loads(table_file.read_text())
        assert table["columns"] == list(final_table(r).columns) and table["data"][2][0] == "ensemble"
        assert steps[-1]["final/_type"] == "table-file"  # the table sits at the last epoch's step
        assert attempt["exit"] == [0]


def test_resume_continues_the_same_run(tmp_path):
    """Attempt 1 logs epochs 1-3 and is interrupted; attempt 2 resumes from the checkpoint of
    epoch 2, so it logs epoch 3 again, then 4 and 5."""
    storage = tmp_path / "runs"
    run = tr.TrackerRun(str(storage / "a"), "a", None, CONFIG, {})
    first = tr.open_trackers(tr.TRACKERS, run)
    log_run(first, "a", (1, 2, 3))
    first.finish("interrupted")
    ids = first.ids
    assert mlflow_client(storage).get_run(ids["mlflow"]).info.status == "KILLED"

    again = tr.open_trackers(tr.TRACKERS, tr.TrackerRun(run.run_dir, "a", None, CONFIG, ids))
    assert again.ids == ids
    log_run(again, "a", (3, 4, 5), attempt=1)
    again.log_table("final", final_table("a", 5))
    again.finish()

    steps = [1, 2, 3, 4, 5]
    # tensorboard: one folder; epoch 3 once, with the value of the attempt that wrote it last
    tb = tb_scalars(Path(run.run_dir), "peer0/val_acc")
    assert [s for s, _ in tb] == steps and tb[2][1] == acc("a", 0, 3, attempt=1)
    assert len(list((Path(run.run_dir) / tr.TB_DIR).glob("events.out.tfevents.*"))) == 2

    # mlflow: the same run, each step once (MLflow cannot delete a value: the first one stays)
    client = mlflow_client(storage)
    info = client.get_run(ids["mlflow"]).info
    assert (info.status, info.run_name) == ("FINISHED", "a")
    assert client.get_experiment(info.experiment_id).name == "online_distill"
    history = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "peer1/val_acc"))
    assert [s for s, _ in history] == steps and history[2][1] == pytest.approx(acc("a", 1, 3))
    assert client.get_run(ids["mlflow"]).data.params["loss.kd_weight"] == "0.5"

    # wandb offline: each attempt is a file of the same run id, replayed in order by `wandb sync`
    # (which, like the online service, drops steps at or below what the run already has)
    first_w, second_w = wandb_attempts(Path(run.run_dir))
    assert first_w["run"].run_id == second_w["run"].run_id == ids["wandb"]
    assert first_w["run"].project == "online_distill" and first_w["exit"] == [255] and second_w["exit"] == [0]
    assert [s["_step"] for s in first_w["steps"]] == [1, 2, 3]
    assert [s["_step"] for s in second_w["steps"]] == [3, 4, 5]
    kept = {s["_step"]: s for w in (second_w, first_w) for s in w["steps"]}  # first attempt wins, as sync does
    assert sorted(kept) == steps and kept[3]["peer0/val_acc"] == pytest.approx(acc("a", 0, 3))


def test_check_trackers_refuses_in_one_line(monkeypatch):
    tr.check_trackers(tr.TRACKERS)
    tr.check_trackers([])
    for names, words in ((["tensorboard", "neptune"], ["'neptune'", "allowed: tensorboard, mlflow, wandb"]),
                         (["wandb", "wandb"], ["'wandb' twice"]),
                         ("mlflow", ["a list of"])):
        with pytest.raises(ConfigError) as e:
            tr.check_trackers(names, field="run.loggers")
        assert e.value.field == "run.loggers" and "\n" not in str(e.value)
        assert str(e.value).startswith("run.loggers: got ") and all(w in str(e.value) for w in words)

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    with pytest.raises(ConfigError) as e:
        tr.check_trackers(["tensorboard", "mlflow"], field="sweep.run.loggers")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("sweep.run.loggers: got 'mlflow'")
    assert "pip install 'online_distill[trackers]'" in msg and "pip install mlflow-skinny" in msg

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"got 'tensorboard'.*pip install tensorboard\)$"):
        tr.check_trackers(["tensorboard"])


def test_a_failing_tracker_is_switched_off_and_the_others_go_on(tmp_path, monkeypatch, capfd):
    import wandb
    from torch.utils.tensorboard import SummaryWriter

    storage = tmp_path / "runs"
    run = tr.TrackerRun(str(storage / "a"), "a", "g", CONFIG, {})
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: (_ for _ in ()).throw(RuntimeError("wandb service down")))
    t = tr.open_trackers(tr.TRACKERS, run)
    assert set(t.ids) == {"tensorboard", "mlflow"}
    monkeypatch.setattr(wandb, "init", real_init)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full)
    log_run(t, "a", (1, 2, 3))
    t.log_table("final", final_table("a"))
    t.finish()
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("online-distill: wandb tracker could not start") and "wandb service down" in lines[0]
    assert "tensorboard tracker failed in log_epoch" in lines[1] and "No space left on device" in lines[1]
    history = mlflow_client(storage).get_metric_history(t.ids["mlflow"], "peer0/val_acc")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert t.ids["tensorboard"].endswith(tr.TB_DIR)  # still there for a resume


def test_wandb_mode(monkeypatch, tmp_path):
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tr.wandb_mode() is None  # WANDB_MODE=offline from the fixture: wandb reads it itself
    monkeypatch.delenv("WANDB_MODE")
    assert tr.wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert tr.wandb_mode() == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tr.wandb_mode() == "online"


def test_a_run_with_every_tracker_logs_each_epochs_per_peer_accuracy(make_cfg, tmp_path):
    """`run.loggers: [tensorboard, mlflow, wandb]` on a real (in-process) run: each tracker, read
    back through its own library, has every epoch's per-peer validation accuracy, as metrics.csv."""
    from online_distill.run import train

    cfg = make_cfg(models=["mlp", "mlp"], train__epochs=2, scale__peers_per_worker=2, run__name="tracked",
                   run__loggers=["tensorboard", "mlflow", "wandb"])
    res = train(cfg, verbose=False)
    run_dir = Path(res.run_dir)
    expect = {(int(r.epoch), r.member): r.val_acc for r in res.history.itertuples() if r.member != "ensemble"}
    for (epoch, member), value in expect.items():
        assert (epoch, pytest.approx(value, abs=1e-6)) in tb_scalars(run_dir, f"{member}/val_acc")
    client = mlflow_client(run_dir.parent)
    ids = json.loads((run_dir / "trackers.json").read_text())
    for member in ("peer0", "peer1"):
        got = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], f"{member}/val_acc")}
        assert got == {e: pytest.approx(v, abs=1e-6) for (e, m), v in expect.items() if m == member}
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    (attempt,) = wandb_attempts(run_dir)
    by_step = {int(s["epoch"]): s for s in attempt["steps"] if "epoch" in s}
    for (epoch, member), value in expect.items():
        assert by_step[epoch][f"{member}/val_acc"] == pytest.approx(value, abs=1e-6)
    assert attempt["exit"] == [0]
