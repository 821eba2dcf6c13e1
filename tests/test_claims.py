"""benchmarks/ tables from CSVs (pure: paired deltas, bars, picks on validation only), sweep
points that pin their seed, and the whole search-then-confirm pipeline on tiny synthetic data."""
import math
import os
import re

import pandas as pd
import pytest
import yaml

from benchmarks.tools import claims, tables
from online_distill.sweep.spec import from_dict as sweep_from_dict


def _rows(arm, seed, accs, *, claim="E1", stage="confirm", val=None, ensemble=None, lr=0.05, form="", t=None):
    """One finished trial's last epoch: one row per peer (test accuracies `accs`), and its ensemble."""
    val = val or accs
    rows = [{"stage": stage, "claim": claim, "arm": arm, "seed": seed, "lr": lr, "form": form, "temperature": t,
             "member": f"peer{i}", "val_acc": v, "test_acc": a, "time_s": 10.0} for i, (a, v) in enumerate(zip(accs, val))]
    if ensemble is not None:
        rows.append({**rows[0], "member": "ensemble", "val_acc": max(val), "test_acc": ensemble})
    return rows


def _runs():
    rows = []
    for seed, (d, i) in enumerate([(0.900, 0.895), (0.905, 0.899), (0.910, 0.906)]):
        # dml2: peer1 is best on validation but worse on test: E2 must use peer1's test accuracy
        rows += _rows("dml2", seed, [d + 0.002, d - 0.002], val=[0.5, 0.6], ensemble=d + 0.004)
        rows += _rows("independent2", seed, [i, i])
        rows += _rows("kd_student", seed, [0.80 + 0.001 * seed], claim="E3")
        rows += _rows("scratch_student", seed, [0.80], claim="E3")
        rows += _rows("ema", seed, [0.85 + (0.001 if seed else -0.001)], claim="E4")
        rows += _rows("plain", seed, [0.85], claim="E4")
    rows += _rows("dml2", 100, [0.7, 0.7], stage="search", val=[0.70, 0.72], form="sum", t=1.0)
    rows += _rows("dml2", 100, [0.9, 0.9], stage="search", val=[0.60, 0.60], form="hinton", t=4.0)
    return pd.DataFrame(rows)


def test_tables_pair_seeds_apply_the_bars_and_rebuild_from_their_own_csvs(tmp_path):
    runs_csv = tmp_path / "runs.csv"
    runs = _runs()
    runs = pd.concat([runs, pd.DataFrame(_rows("teacher", 100, [0.9], claim="E3", stage="search"))])
    runs.to_csv(runs_csv, index=False)
    (tmp_path / "picks.yaml").write_text("dml2: {claim: E1, pick: {lr: 0.05}}\nema: {claim: E4, pick: {lr: 0.1}}\n")
    (tmp_path / "E3_kd").mkdir()
    pd.DataFrame([{"role": "E3 student", "model": "s", "params": 1000, "size_kb": 4.0, "latency_ms": 0.1, "us_per_sample_b256": 2.0},
                  {"role": "E3 teacher", "model": "t", "params": 50000, "size_kb": 200.0, "latency_ms": 0.5, "us_per_sample_b256": 30.0}]
                 ).to_csv(tmp_path / "E3_kd" / "compression.csv", index=False)
    summary = tables.build(str(tmp_path), str(runs_csv)).set_index(["claim", "method"])
    assert list(pd.read_csv(tmp_path / "summary.csv").columns) == tables.SUMMARY_COLUMNS
    e1 = summary.loc[("E1", "dml2")]  # mean peer: deltas 0.5, 0.6, 0.4 points
    assert e1["delta_mean"] == pytest.approx(0.5) and e1["delta_std"] == pytest.approx(0.1) and e1["n_pairs"] == 3
    assert e1["met"]  # >= 0.3 and every delta > 0
    e2 = summary.loc[("E2", "dml2 (ensemble)")]  # ensemble d+0.004 against the val-best peer1's d-0.002
    assert e2["delta_mean"] == pytest.approx(0.6) and e2["met"]
    e3 = summary.loc[("E3", "kd_student")]  # +0.0, +0.1, +0.2: below the 0.5 bar
    assert e3["delta_mean"] == pytest.approx(0.1) and not e3["met"]
    e4 = summary.loc[("E4", "ema")]  # -0.1, +0.1, +0.1
    assert e4["delta_mean"] == pytest.approx(0.1 / 3, abs=1e-3) and e4["met"]
    assert "| dml2 | 90.50 +- 0.50 | independent2 | 90.00 +- 0.56 |" in (tmp_path / "E1_dml" / "table.md").read_text()
    assert "[E3](E3_kd/table.md)" in (tmp_path / "summary.md").read_text()
    e3_table = (tmp_path / "E3_kd" / "table.md").read_text()
    assert "| E3 teacher | t | 90.00 | 50,000 |" in e3_table and "50x fewer parameters and runs 15x faster" in e3_table
    assert yaml.safe_load((tmp_path / "E4_self" / "picks.yaml").read_text()) == {"ema": {"claim": "E4", "pick": {"lr": 0.1}}}
    seeds = pd.read_csv(tmp_path / "E1_dml" / "per_seed.csv")
    assert seeds[seeds["method"] == "dml2"]["delta"].round(3).tolist() == [0.5, 0.6, 0.4]
    # again from the claims' own runs.csv alone: the same summary
    again = tables.build(str(tmp_path)).set_index(["claim", "method"])
    pd.testing.assert_frame_equal(again, summary)


def test_a_miss_on_any_seed_fails_e1_and_no_pairs_is_no_result(tmp_path):
    df = _runs()
    df.loc[(df["arm"] == "dml2") & (df["seed"] == 2) & (df["stage"] == "confirm") & (df["member"] != "ensemble"),
           "test_acc"] = 0.905  # seed 2: -0.1 pt, the mean still above 0.3
    runs_csv = tmp_path / "runs.csv"
    df.to_csv(runs_csv, index=False)
    e1 = tables.build(str(tmp_path), str(runs_csv)).set_index(["claim", "method"]).loc[("E1", "dml2")]
    assert e1["delta_mean"] == pytest.approx((0.5 + 0.6 - 0.1) / 3, abs=1e-3) and not e1["met"]
    c = tables.Comparison("E4", "ema", "plain")
    assert tables.verdict(c, pd.Series([], dtype=float))["met"] is False


def test_pick_reads_validation_never_test():
    runs = _runs()
    chosen = claims.pick(runs, "dml2")  # sum/T1 is best on validation (0.71), hinton/T4 on test
    assert chosen == {"lr": 0.05, "form": "sum", "val_acc": pytest.approx(0.71), "temperature": 1.0}
    with pytest.raises(RuntimeError, match="no finished search trial of 'ema'"):
        claims.pick(runs, "ema")


def test_a_sweep_point_may_pin_its_seed():
    base = {"models": ["tiny_cnn"], "distill": {"mode": "independent"}, "data": {"dataset": "synthetic"}}
    spec = sweep_from_dict({"name": "s", "base": base,
                            "seeds": [0, 1], "points": [{"optim.lr": 0.1}, {"optim.lr": 0.2, "train.seed": 7}]})
    got = sorted((t["optim.lr"], t["train.seed"]) for t in spec.trials())
    assert got == [(0.05, 0), (0.05, 1), (0.1, 0), (0.1, 1), (0.2, 7)]
    with pytest.raises(Exception, match="train.seed cannot be swept"):
        sweep_from_dict({"name": "s", "base": base,
                         "space": {"train.seed": {"grid": [1, 2]}}})


@pytest.mark.e2e
def test_search_then_confirm_end_to_end(ray_session, tmp_path):
    """The smoke profile: every arm searched on seed 100, confirmed on seeds 0 and 1, with E3's
    teacher and born-again's per-seed teachers taken from earlier stages."""
    runs = claims.run(claims.PROFILES["smoke"], str(tmp_path / "out"), str(tmp_path / "work"))
    confirmed = runs[runs["stage"] == "confirm"]
    arms = {"dml2", "independent2", "dml3", "independent3", "plain", "ema", "snapshot", "dlb", "born_again",
            "scratch_student", "kd_student"}
    assert set(confirmed["arm"]) == arms
    assert all(sorted(set(seeds)) == [0, 1] for _, seeds in confirmed.groupby("arm")["seed"])
    assert set(runs[runs["stage"] == "search"]["seed"]) == {100}
    # born-again's teacher on each seed is that seed's confirmed plain run
    ba = confirmed[confirmed["arm"] == "born_again"].drop_duplicates("seed").set_index("seed")["teacher"]
    plain = confirmed[confirmed["arm"] == "plain"].drop_duplicates("seed").set_index("seed")["checkpoint"]
    assert ba.sort_index().to_dict() == plain.sort_index().to_dict()  # trials finish in any order
    assert pd.read_csv(tmp_path / "out" / "runs.csv").shape[0] == len(runs)
    picks = yaml.safe_load((tmp_path / "out" / "picks.yaml").read_text())
    assert picks["kd_student"]["config"]["distill"]["mode"] == "offline" and picks["dml3"]["config"]["scale"]["peers_per_worker"] == 3
    summary = tables.build(str(tmp_path / "bench"), str(tmp_path / "out" / "runs.csv"))
    assert set(summary["claim"]) == {"E1", "E2", "E3", "E4"} and (summary["n_pairs"] == 2).all()
    assert not summary["delta_mean"].map(math.isnan).any()
    assert os.path.exists(tmp_path / "bench" / "E3_kd" / "table.md")


def test_the_committed_results_are_what_their_csvs_give(tmp_path):
    """benchmarks/ (and each variant folder in it that has a summary.csv): every table and
    summary.csv rebuilt from the committed runs.csv files alone is the committed one, and the
    README quotes the main summary's numbers."""
    import glob
    import shutil

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    trees = [root] + sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "*", "summary.csv")))
    summaries = []
    for tree in trees:
        out = tmp_path / os.path.basename(tree)
        for folder in tables.FOLDERS.values():
            for name in ("runs.csv", "compression.csv"):
                if os.path.exists(os.path.join(tree, folder, name)):
                    os.makedirs(out / folder, exist_ok=True)
                    shutil.copy(os.path.join(tree, folder, name), out / folder / name)
        for folder in tables.EXTRA_FOLDERS.values():  # their own scripts build these (tests below)
            if os.path.exists(os.path.join(tree, folder, "summary_rows.csv")):
                os.makedirs(out / folder, exist_ok=True)
                shutil.copy(os.path.join(tree, folder, "summary_rows.csv"), out / folder / "summary_rows.csv")
        summary = tables.build(str(out))
        pd.testing.assert_frame_equal(summary, pd.read_csv(os.path.join(tree, "summary.csv")))
        for folder in tables.FOLDERS.values():
            if os.path.exists(os.path.join(tree, folder, "table.md")):
                assert (out / folder / "table.md").read_text() == open(os.path.join(tree, folder, "table.md")).read()
        if tree == root:
            assert open(os.path.join(root, "summary.md")).read() in open(os.path.join(root, "README.md")).read()
        summaries.append(summary)
    # the README's "delta +- std" figures are rows of these summaries, at the precision it shows;
    # and it quotes every H and L claim's delta
    readme = open(os.path.join(os.path.dirname(root), "README.md")).read()
    quoted = set(re.findall(r"([+-]\d+\.\d+) \+- (\d+\.\d+)", readme))
    rows = [r for summary in summaries for r in summary.itertuples() if pd.notna(r.delta_mean)]
    known = {(f"{r.delta_mean:+.{d}f}", f"{r.delta_std:.{d}f}") for r in rows for d in (2, 3, 4)}
    assert quoted and quoted <= known, sorted(quoted - known)
    for r in summaries[0].itertuples():
        if r.claim[0] in "HL" and pd.notna(r.delta_mean):
            assert any((f"{r.delta_mean:+.{d}f}", f"{r.delta_std:.{d}f}") in quoted for d in (2, 3, 4)), (r.claim, r.method)


def test_a_work_folder_holding_earlier_sweeps_is_refused_before_ray_starts(tmp_path, no_ray, capsys):
    (tmp_path / "work" / "claims-search").mkdir(parents=True)
    code = claims.main(["run", "--profile", "smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 2 and "--work:" in err and "claims-search" in err and "allowed:" in err
    assert not (tmp_path / "out").exists()


def test_a_sweep_setting_matches_its_trials_whatever_the_column_dtypes():
    """The sweep summary may hold a setting's int as a float and None as NaN (pandas groupby);
    best_config_yaml must still find that setting's trials (a stage of the 30-epoch claims run
    stopped there)."""
    from online_distill.sweep.results import _same

    assert _same(3, 3.0) and _same(None, math.nan) and _same("mlp,mlp", "mlp,mlp") and _same(0.1, 0.1)
    assert not _same(0.1, 0.2) and not _same(None, 1.0) and not _same("mlp", "mlp_small") and not _same(1, None)


def _script(name: str):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(root, "benchmarks", name, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,files", [("hinton", ("per_seed.csv", "summary_rows.csv", "table.md")),
                                        ("lm", ("per_seed.csv", "summary_rows.csv", "bytes.csv", "table.md")),
                                        ("onpolicy", ("per_seed.csv", "summary_rows.csv", "table.md"))])
def test_a_benchmarks_tables_are_what_its_runs_csv_gives(tmp_path, monkeypatch, name, files):
    """benchmarks/hinton, lm and onpolicy: every table rebuilt from runs.csv alone is the committed one."""
    import shutil

    h = _script(name)
    committed = {n: open(os.path.join(h.HERE, n)).read() for n in files}
    runs = pd.read_csv(os.path.join(h.HERE, "runs.csv"))
    monkeypatch.setattr(h, "HERE", str(tmp_path))
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", name,
                             "failed.csv"), tmp_path / "failed.csv")
    h.write_tables(runs)
    for n, text in committed.items():
        assert (tmp_path / n).read_text() == text, n
    summary = pd.read_csv(tmp_path / "summary_rows.csv")
    assert list(summary.columns) == tables.SUMMARY_COLUMNS and (summary["n_pairs"] >= 3).all()


def test_hintons_tables_from_a_work_folder_without_the_runs_keep_the_committed_record(tmp_path, monkeypatch):
    """`hinton.py tables` on a work folder that holds none of the runs (e.g. one with only a new
    arm's) plans from the committed picks and keeps every committed row, byte for byte; a run
    that is there replaces its committed rows."""
    import shutil

    h = _script("hinton")
    here = tmp_path / "hinton"
    shutil.copytree(h.HERE, here, ignore=shutil.ignore_patterns("*.png", "configs"))
    monkeypatch.setattr(h, "HERE", str(here))
    (tmp_path / "work").mkdir()
    h.tables(str(tmp_path / "work"))
    for name in ("runs.csv", "peer_terms.csv", "failed.csv", "per_seed.csv", "summary_rows.csv", "table.md"):
        assert (here / name).read_text() == open(os.path.join(os.path.dirname(h.__file__), name)).read(), name
    runs = pd.read_csv(here / "runs.csv")
    pick = h.pick([h.peers_job("3pct", "independent", h.SEARCH_SEED, lr) for lr in h.PEER_LRS], str(tmp_path / "work"))
    search = runs[(runs["arm"] == "ind_3pct") & (runs["stage"] == "search") & (runs["member"] != "ensemble")
                  & (runs["jitter"] == 0) & ~runs["dropout"]]
    assert pick.name == search.groupby("job")["val_acc"].mean().idxmax()


def test_hintons_run_new_only_skips_the_recorded_runs(tmp_path, monkeypatch):
    """`hinton.py run --new-only` hands every stage the names of the runs the committed tables
    hold (finished or diverged), and a skipped job starts no process; without it nothing is skipped."""
    from benchmarks.tools import jobs as jobs_mod

    h = _script("hinton")
    recorded = h.recorded_jobs()
    assert "ind_3pct-s0-lr0.1" in recorded and "ind_3pct-s100-lr0.3" in recorded  # finished; diverged
    seen = []
    monkeypatch.setattr(jobs_mod, "run_jobs", lambda jobs, work, parallel, extra, tag, skip: seen.append(skip))
    assert h.main(["run", "--work", str(tmp_path / "w"), "--new-only"]) == 0
    assert seen and all(skip == frozenset(recorded) for skip in seen)
    seen.clear()
    assert h.main(["run", "--work", str(tmp_path / "w")]) == 0
    assert seen and all(skip == frozenset() for skip in seen)
    monkeypatch.undo()
    job = h.peers_job("3pct", "independent", 0, 0.1)
    jobs_mod.run_jobs([job], str(tmp_path / "w2"), 1, tag="t", skip=frozenset({job.name}))
    assert not (tmp_path / "w2" / "logs" / f"{job.name}.log").exists()


def test_the_bias_shift_is_chosen_on_validation():
    import torch

    h = _script("hinton")
    # class 1 is never predicted until its logit is raised by 2; validation says so, test is then scored
    val = torch.tensor([[2.0, 0.5], [2.0, 0.5], [0.0, -5.0]])
    val_y = torch.tensor([1, 1, 0])
    test = torch.tensor([[1.0, 0.0], [0.0, -5.0]])
    test_y = torch.tensor([1, 0])
    out = h.bias_shift(val, val_y, test, test_y, 1)
    assert 1.5 < out["bias"] <= 5.0 and out["class_correct"] == 1 and out["test_acc"] == 1.0
