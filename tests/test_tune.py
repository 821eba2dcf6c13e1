"""Ray Tune sweeps: sweep files refused on the driver, trials resolved as intended, and on the
shared local Ray an ASHA sweep that is interrupted, has a failing trial, resumes, retries on
request and leaves a full table; and a PBT sweep that really copies checkpoints."""
from __future__ import annotations

import glob
import json
import os
import re
import signal

import pandas as pd
import pytest
import ray
import yaml
from ray.tune import Callback

from online_distill.config import schema as C
from online_distill.config import files as CF
from online_distill.sweep import spec as S
from online_distill.config.schema import ConfigError
from online_distill.run.plan import concurrency
from online_distill.run.report import report_run
from online_distill.sweep.driver import load_sweep, run_sweep
from online_distill.sweep.results import report_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tune_configs", "tiny.yaml")


def tiny(tmp_path, datasets=None, **sets):
    """The tiny sweep of tune_configs/ under tmp_path: 2 tiny_cnn peers packed in one worker at
    0.5 CPU, each trial in Train's local mode in its own process (with scale.peers_per_worker=1:
    a worker group of 2 workers per trial)."""
    base = {"storage_path": str(tmp_path / "sweeps"), "scale.cpus_per_worker": 0.5}
    return load_sweep(TINY, {**base, **sets}, datasets=datasets)


# ---- sweep files: refused before anything starts, naming the field --------------------------

@pytest.mark.parametrize("sets, field, allowed", [
    ({"space.loss.temprature": {"uniform": [1, 4]}}, "space.loss.temprature", "unknown field"),
    ({"space.loss.kd_weight": {"uniform": [0.5, 1.5]}}, "space.loss.kd_weight", "[0, 1]"),
    ({"space.loss.temperature": {"uniform": [0, 4]}}, "space.loss.temperature", "> 0"),
    ({"space.optim.lr": {"loguniform": [0, 0.1]}}, "space.optim.lr", "low > 0"),
    ({"space.optim.lr": {"loguniform": [0.1, 0.01]}}, "space.optim.lr", "low < high"),
    ({"space.loss.temperature": {"normal": [1, 2]}}, "space.loss.temperature", "{uniform: [low, high]}"),
    ({"space.models": {"choice": [["tiny_cnn", "nope"]]}}, "space.models", "models[1]"),
    ({"space.train.seed": {"grid": [0, 1]}}, "train.seed", "seeds:"),
    ({"objective": "test_acc"}, "objective", "'best_peer', 'mean', 'ensemble'"),
    ({"scheduler.name": "hyperband"}, "scheduler.name", "'asha', 'pbt', 'none'"),
    ({"scheduler.grace_period": 9}, "scheduler.grace_period", "[1, train.epochs=3]"),
    ({"scheduler.name": "pbt"}, "baseline", "PBT copies weights"),
    ({"num_samples": 0}, "num_samples", ">= 1"),
    ({"seeds": [0, 0]}, "seeds", "distinct"),
    ({"max_trials": 3}, "max_trials", "unknown sweep field"),
    ({"points": [{"loss.kd_weight": 2.0}]}, "points[0]", "loss.kd_weight"),
])
def test_bad_sweeps_are_refused_naming_the_field(sets, field, allowed):
    with pytest.raises(ConfigError) as e:
        load_sweep(TINY, sets)
    assert str(e.value).startswith(field) or field in str(e.value), e.value
    assert allowed in str(e.value), e.value


def test_pbt_needs_a_knob_it_may_change_mid_trial():
    with pytest.raises(ConfigError, match="space: .*loss.temperature"):
        load_sweep(TINY, {"scheduler.name": "pbt", "baseline": False, "space": {"optim.lr": {"uniform": [0.01, 0.1]}}})
    spec = load_sweep(TINY, {"scheduler.name": "pbt", "baseline": False, "space.optim.lr": {"uniform": [0.01, 0.1]}})
    assert set(spec.mutations) == {"loss.temperature", "loss.kd_weight"}  # lr is drawn, but never perturbed


def test_trials_pair_every_setting_with_the_same_seeds_and_one_baseline_per_seed():
    spec = load_sweep(TINY, {"num_samples": 3, "seeds": [0, 1, 2]})
    trials = spec.trials()
    settings = [t for t in trials if not t["baseline"]]
    base = [t for t in trials if t["baseline"]]
    assert len(settings) == 2 * 3 * 3 and len(base) == 3  # (grid 2 x draws 3) x seeds 3, baseline x seeds
    by_setting = pd.DataFrame(settings).groupby(["loss.temperature", "loss.kd_weight"])["train.seed"].apply(sorted)
    assert len(by_setting) == 6 and all(s == [0, 1, 2] for s in by_setting)
    assert all(0.2 <= t["loss.kd_weight"] <= 0.8 for t in settings)
    assert [(t["distill.mode"], t["train.seed"]) for t in base] == [("independent", 0), ("independent", 1), ("independent", 2)]
    assert all(t.keys() == trials[0].keys() for t in trials)  # one table, the same columns
    assert load_sweep(TINY, {"num_samples": 3, "seeds": [0, 1, 2]}).trials() == trials  # the file decides the trials
    assert load_sweep(TINY, {"num_samples": 3, "search_seed": 1}).trials() != load_sweep(TINY, {"num_samples": 3}).trials()


def test_overrides_reach_the_base_config_or_the_sweep():
    spec = load_sweep(TINY, {"train.epochs": 5, "name": "other", "scheduler.grace_period": 2,
                             "space.models": {"choice": [["tiny_cnn", "tiny_cnn"], ["mlp", "tiny_cnn", "mlp", "tiny_cnn"]]}})
    assert spec.base.train.epochs == 5 and spec.name == "other" and spec.scheduler.grace_period == 2
    cfgs = spec.check()
    assert {c.models for c in cfgs} >= {("tiny_cnn", "tiny_cnn")}
    assert all(isinstance(t["models"], str) for t in spec.trials())  # lists travel as one Tune value


def test_sweeps_can_search_the_loss_form():
    # null is the convex mix (1 - kd_weight), 1.0 the online papers' CE + T^2 KL
    spec = load_sweep(TINY, {"space.loss.ce_weight": {"grid": [None, 1.0]}, "space.loss.kd_weight": {"grid": [0.5, 1.0]}})
    forms = {(c.loss.ce_weight, c.loss.kd_weight) for c in spec.check() if c.distill.mode == "dml"}
    assert forms == {(None, 0.5), (None, 1.0), (1.0, 0.5), (1.0, 1.0)}


def test_concurrency_fits_whole_cohorts_into_the_cluster(make_cfg):
    two, three = make_cfg(), make_cfg(models=["tiny_cnn"] * 3)
    assert concurrency([two], {"CPU": 4}) == 2
    assert concurrency([two, three], {"CPU": 4}) == 1  # sized for the biggest trial
    assert concurrency([make_cfg(scale__cpus_per_worker=0.5)], {"CPU": 4}) == 4
    assert concurrency([make_cfg(scale__cpus_per_worker=2)], {"CPU": 2}) == 1  # never 0
    gpu = make_cfg(scale__use_gpu=True)
    assert concurrency([gpu], {"CPU": 64, "GPU": 4}) == 2
    # whole cohorts in one worker with a quarter of a GPU each: four cohorts share one GPU
    shared = make_cfg(scale__use_gpu=True, scale__peers_per_worker=2, scale__gpus_per_worker=0.25)
    assert concurrency([shared], {"CPU": 64, "GPU": 1}) == 4


def test_a_trial_holds_its_cohorts_resources_only_in_local_mode(make_cfg):
    from online_distill.sweep.driver import trial_resources

    packed = make_cfg(scale__peers_per_worker=2, scale__cpus_per_worker=2, scale__use_gpu=True,
                      scale__gpus_per_worker=0.5)
    assert trial_resources(packed) == {"cpu": 2, "gpu": 0.5}  # the trial's process trains the cohort
    assert trial_resources(make_cfg()) == {"cpu": 0, "memory": 1}  # the Train workers hold them


def test_asha_never_stops_the_baseline_and_the_baseline_sets_no_cutoff():
    from ray.tune.experiment import Trial

    from online_distill.sweep.driver import _scheduler

    spec = load_sweep(TINY, {"train.epochs": 4})
    asha = _scheduler(spec, 4, n_trials=6, n_at_once=2)
    asha.set_search_properties(spec.metric, "max")
    base, good, bad = (Trial("t", config={"baseline": b}, stub=True) for b in (True, False, False))
    for t in (base, good, bad):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, base, {"epoch": 1, spec.metric: 0.9}) == "CONTINUE"
    assert asha.on_trial_result(None, good, {"epoch": 1, spec.metric: 0.3}) == "CONTINUE"  # 0.9 set no bar
    assert asha.on_trial_result(None, bad, {"epoch": 1, spec.metric: 0.1}) == "STOP"
    assert asha.on_trial_result(None, base, {"epoch": 2, spec.metric: 0.0}) == "CONTINUE"  # never stopped


def test_pbt_explore_stays_inside_the_space():
    d = S.Dist("uniform", (0.2, 0.8))
    assert d.clip(0.96) == 0.8 and d.clip(0.1) == 0.2 and d.clip(0.5) == 0.5


def _stand_in_teacher(teacher_config: str, tmp_path) -> dict:
    """A sweep whose first line trains its teacher first: the teacher's model, untrained, as a
    state dict, so the rest of the sweep is checked without the run that trains it."""
    import torch

    from online_distill.data.datasets import load_data
    from online_distill.models.builders import build_model

    cfg = CF.load(teacher_config)
    data = load_data(cfg.data)
    model = build_model(cfg.models[0], data.sample, data.num_classes, label_shape=data.label_shape)
    torch.save(model.state_dict(), tmp_path / "teacher.pt")
    return {"distill.teacher_checkpoint": str(tmp_path / "teacher.pt"), "distill.teacher_model": cfg.models[0]}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "tune_configs", "*.yaml"))))
def test_ready_sweeps_validate_and_say_how_to_run_them(path, tmp_path):
    first = open(path).readline().strip()
    rel = os.path.relpath(path, ROOT)
    assert first.startswith("# online-distill ") and first.endswith(f"online-distill tune {rel}"), first  # maybe after its teacher's run
    raw = yaml.safe_load(open(path))
    if raw["base"].get("distill", {}).get("mode") not in __import__("online_distill.teachers", fromlist=["TEACHERS"]).TEACHERS:
        pytest.skip(f"{rel}: distill.mode {raw['base']['distill']['mode']!r} has not landed yet")
    teacher = re.match(r"# online-distill train (\S+) && ", first)
    overrides = _stand_in_teacher(os.path.join(ROOT, teacher.group(1)), tmp_path) if teacher else {}
    spec = load_sweep(path, overrides)
    assert len(spec.trials()) >= 4 and spec.objective in S.OBJECTIVES


# ---- end to end on the shared local Ray ------------------------------------------------------

class InterruptAfterAFailure(Callback):
    """Ctrl+C (SIGINT) the sweep once a trial has failed and another trial has reported its
    second epoch after that: the sweep went on past the failure, then was interrupted. Once per marker file, since
    Tune keeps its callbacks for the resumed run."""

    def __init__(self, marker: str):
        self.marker, self.failed = marker, None

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed = trial.trial_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # epoch >= 2: the checkpoint of epoch 1 is registered by then (Tune registers a checkpoint
        # after the callbacks for its result have run)
        if self.failed and trial.trial_id != self.failed and result["epoch"] >= 2 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGINT)


def _cohort_runs(sweep_dir: str, trial_id: str) -> list[str]:
    """The Train runs a trial started (one per start of its driver), oldest first: their names
    carry the start time (os.listdir's own order is arbitrary)."""
    d = os.path.join(sweep_dir, "cohorts")
    return sorted(r for r in os.listdir(d) if r.startswith(trial_id + "-")) if os.path.isdir(d) else []


def _reported_epochs(sweep_dir: str, trial_id: str) -> list[int]:
    path = os.path.join(sweep_dir, trial_id, "result.json")
    return [json.loads(line)["epoch"] for line in open(path)] if os.path.exists(path) else []


def flaky_dataset(marker: str):
    """The synthetic data, except that the first time a Train worker reads it, it fails (like
    storage that drops out once). The driver's preflight reads it fine."""
    from online_distill.data.datasets import synthetic

    def build(cfg):
        if ray.get_runtime_context().get_actor_id() is not None and not os.path.exists(marker):
            open(marker, "w").close()
            raise OSError("flaky storage: the dataset could not be read")
        return synthetic(cfg)

    return build


@pytest.mark.e2e
def test_asha_sweep_survives_a_failing_trial_and_an_interruption(ray_session, tmp_path):
    # 4 trials: two DML settings, the independent baseline, and a setting whose data cannot be
    # read the first time (the trial errors: no retries inside Train, run.max_failures=0)
    datasets = {"flaky": flaky_dataset(str(tmp_path / "flaked"))}
    spec = tiny(tmp_path, datasets, **{"name": "asha", "seeds": [0], "train.epochs": 6,
                                       "points": [{"data.dataset": "flaky"}]})
    assert spec.scheduler.name == "asha" and len(spec.trials()) == 4
    marker = str(tmp_path / "interrupted")

    first = run_sweep(spec, datasets=datasets, callbacks=[InterruptAfterAFailure(marker)], verbose=0)
    assert os.path.exists(marker) and not first.complete  # the sweep went on after the failure, then Ctrl+C
    t = first.trials.set_index("trial_id")
    failed = t.index[t["status"] == "ERROR"].tolist()
    assert len(failed) == 1 and "flaky storage" in t.loc[failed[0], "error"]  # reported, with its cause
    assert t.loc[failed[0], "data.dataset"] == "flaky"
    unfinished = t.index[~t["status"].isin(["TERMINATED", "ERROR"])].tolist()
    assert unfinished, "the interruption should have caught a trial mid-way"
    before = {tid: _reported_epochs(spec.sweep_dir, tid) for tid in t.index}

    # the same command resumes: interrupted trials go on from their last checkpoints, and the
    # errored one (asked for) is rerun
    second = run_sweep(spec, datasets=datasets, retry_errored=True, verbose=0)
    t2 = second.trials.set_index("trial_id")
    assert second.complete and len(t2) == 4 and (t2["status"] == "TERMINATED").all(), t2["status"]
    assert t2.loc[failed[0], "epochs"] >= 1 and t2.loc[failed[0], "error"] == ""  # (ASHA may stop it, like any)
    sched = pd.read_csv(os.path.join(spec.sweep_dir, "schedules.csv"))
    resumed = []
    for tid in unfinished:
        mine = sched[sched["trial_id"] == tid].sort_values("epoch")
        assert mine["epoch"].tolist() == list(range(1, len(mine) + 1))  # one unbroken history
        runs = mine["run"].unique()
        if len(before[tid]) >= 2 and len(runs) == 2:  # its second Train run went on from a checkpoint
            start = mine.loc[mine["run"] == runs[1], "resumed_from_epoch"].iloc[0]
            # the last one Tune had registered: Ctrl+C may beat the registration of the newest
            assert start in (len(before[tid]) - 1, len(before[tid])), (start, before[tid])
            resumed.append(tid)
    assert resumed, "no interrupted trial went on from its checkpoint"

    # once more: a finished sweep reruns nothing
    done = {tid: (_reported_epochs(spec.sweep_dir, tid), _cohort_runs(spec.sweep_dir, tid)) for tid in t.index}
    third = run_sweep(spec, datasets=datasets, retry_errored=True, verbose=0)
    assert third.complete
    assert {tid: (_reported_epochs(spec.sweep_dir, tid), _cohort_runs(spec.sweep_dir, tid)) for tid in t.index} == done

    # the full table: config values as columns, final and best objective, time; a summary with
    # the paired delta to the baseline; the best setting as a run config that loads
    table = third.trials
    assert {"loss.temperature", "loss.kd_weight", "train.seed", "distill.mode", "data.dataset", "status",
            "objective_final", "objective_best", "best_epoch", "time_s", "stopped_early"} <= set(table.columns)
    assert table["objective_best"].notna().all() and (table["time_s"] > 0).all()
    assert (table["complete"] | table["stopped_early"]).all()
    summary = third.summary
    assert set(summary["role"]) == {"setting", "baseline"} and "delta_to_baseline" in summary
    best = CF.load(third.best_config)
    assert best.distill.mode == "dml" and best.run.name == "asha-best"
    ran = summary[(summary["role"] == "setting") & (summary["n_complete"] > 0)]
    best_row = ran[ran["n_complete"] == ran["n"]].iloc[0]  # seeds: [0], so every setting that finished
    assert best.loss.temperature == best_row["loss.temperature"] and best.data.dataset == best_row["data.dataset"]
    for name in ("trials.csv", "summary.csv", "objective_vs_knobs.png", "learning_curves.png"):
        assert os.path.getsize(os.path.join(spec.sweep_dir, name)) > 100, name

    # `online-distill report` rebuilds the same tables from disk
    written = pd.read_csv(os.path.join(spec.sweep_dir, "trials.csv"))
    os.remove(os.path.join(spec.sweep_dir, "trials.csv"))
    report_sweep(spec.sweep_dir, verbose=False)
    pd.testing.assert_frame_equal(pd.read_csv(os.path.join(spec.sweep_dir, "trials.csv")), written)
    # ... and a run's tables from its latest checkpoint: here the baseline trial's (its cohort ran
    # in Train's local mode, in the trial's process; like any cohort it had a run directory of its
    # own for each start of its driver, and Tune copied each epoch's checkpoint into the trial's)
    base_id = table.loc[table["role"] == "baseline", "trial_id"].item()
    cohorts = _cohort_runs(spec.sweep_dir, base_id)
    assert cohorts and all(os.path.exists(os.path.join(spec.sweep_dir, "cohorts", c, "config.yaml")) for c in cohorts)
    run_dir = os.path.join(spec.sweep_dir, "cohorts", cohorts[-1])  # the last start's: the whole history
    report_run(run_dir, verbose=False)
    metrics = pd.read_csv(os.path.join(run_dir, "metrics.csv"))
    assert metrics["epoch"].max() == 6 and set(metrics["member"]) == {"peer0", "peer1", "ensemble"}
    final = pd.read_csv(os.path.join(run_dir, "final.csv")).set_index("member")
    assert final.loc["ensemble", "val_acc"] == pytest.approx(table.loc[table["role"] == "baseline", "final_ensemble_val_acc"].item())
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 1000


@pytest.mark.e2e
def test_pbt_exploits_by_restoring_the_donors_checkpoint(ray_session, tmp_path):
    # three DML cohorts with drawn knobs and one that learns far too slowly: PBT must copy a
    # better trial's checkpoint into it and perturb the knobs it inherited
    # one peer per worker: each trial fits a 2-worker TorchTrainer (the relay path of the driver)
    spec = tiny(tmp_path, **{"name": "pbt", "seeds": [0], "baseline": False, "num_samples": 3, "train.epochs": 4,
                             "scale.peers_per_worker": 1,
                             "objective": "mean", "space": {"loss.temperature": {"uniform": [1.0, 8.0]},
                                                           "loss.kd_weight": {"uniform": [0.1, 0.9]}},
                             "points": [{"optim.lr": 0.0005}],
                             "scheduler": {"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.25}})
    res = run_sweep(spec, verbose=0)
    assert res.complete and len(res.trials) == 4
    sched = pd.read_csv(os.path.join(spec.sweep_dir, "schedules.csv"))
    sched["lineage"] = sched["run"].str.split("-").str[0]  # the trial whose Train run produced the epoch
    exploited = sorted(set(sched.loc[sched["lineage"] != sched["trial_id"], "trial_id"]))
    assert exploited, sched

    for tid in exploited:
        mine = sched[sched["trial_id"] == tid].sort_values("epoch")
        assert mine["epoch"].tolist() == [1, 2, 3, 4]  # one unbroken history
        inherited = mine[mine["lineage"] != tid]
        donor_run, donor = inherited["run"].iloc[-1], inherited["lineage"].iloc[-1]
        k = int(inherited["epoch"].max())
        # those epochs are the donor's: the same numbers are in the donor's own checkpoint of epoch k
        donor_hist = None
        for path in glob.glob(os.path.join(spec.sweep_dir, donor, "checkpoint_*", "history.json")):
            rows = pd.DataFrame(json.load(open(path))["history"])
            if ((rows["run"] == donor_run) & (rows["epoch"] == k)).any() and rows["epoch"].max() == k:
                donor_hist = rows
        assert donor_hist is not None, f"no checkpoint of {donor} at epoch {k}"
        donor_obj = donor_hist[donor_hist["member"] != "ensemble"].groupby("epoch")["val_acc"].mean()
        for _, r in inherited.iterrows():
            assert r["objective"] == pytest.approx(donor_obj[r["epoch"]])
        # after the exploit: this trial's own Train run, started at epoch k with the perturbed knobs
        own = mine[mine["epoch"] > k]
        final_cfg = res.trials.set_index("trial_id").loc[tid]
        if len(own):  # (none when the exploit came at the last epoch)
            assert (own["lineage"] == tid).all() and (own["resumed_from_epoch"] == k).all()
            assert own["temperature"].iloc[-1] == pytest.approx(final_cfg["loss.temperature"])
            assert own["kd_weight"].iloc[-1] == pytest.approx(final_cfg["loss.kd_weight"])
            before = inherited.iloc[-1]
            assert (before["temperature"], before["kd_weight"]) != (own["temperature"].iloc[0], own["kd_weight"].iloc[0])
            assert 1.0 <= own["temperature"].iloc[0] <= 8.0 and 0.1 <= own["kd_weight"].iloc[0] <= 0.9
    # Tune's own record of the exploits
    assert glob.glob(os.path.join(spec.sweep_dir, "pbt_policy_*.txt"))


WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


@pytest.mark.e2e
def test_a_sweep_prints_our_lines_only(ray_session, tmp_path, capfd):
    """`online-distill tune tune_configs/tiny.yaml`: a header, a line per trial event led by the
    trial's label, progress, the final table and verdict; Tune's tables go to the sweep's log."""
    from online_distill.cli import main

    capfd.readouterr()
    assert main(["tune", TINY, "--set", f"storage_path={tmp_path}", "--set", "scale.cpus_per_worker=0.5"]) == 0
    out = capfd.readouterr()
    # the tests' shared Ray session forwards workers' output (log_to_driver); the command in its own
    # process starts Ray without it (init_ray(workers_print=False)), so a stopped trial's dying words
    # never reach its terminal: they are not ours to count here
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.strip() and not WORKER_LINE.match(ln)]
    assert len(lines) <= 60, "\n".join(lines)
    assert lines[0].startswith("starting sweep 'tiny': 6 trials (asha, objective ensemble/val_acc)")
    trial_lines = [ln for ln in lines if ln.startswith("[t")]
    assert len(trial_lines) >= 6 * 2  # started and finished (or stopped early), at least
    assert all(re.match(r"^\[t0[0-5] (baseline seed=[01]|T=[14] kd=0\.\d+ seed=[01])\] ", ln) for ln in trial_lines)
    assert not [ln for ln in lines if "╭" in ln or "Trial status" in ln or "tensorboard --logdir" in ln]
    assert lines[-1].startswith("verdict: ")
    assert os.path.getsize(os.path.join(tmp_path, "tiny", "run.log")) > 0  # Tune's own lines are kept there
