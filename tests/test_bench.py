"""The benchmark's plain-PyTorch side (the Ray side is the loop that the e2e tests run)."""
import math

from online_distill.run.bench import bench_config, plain_step_time


def test_plain_pytorch_dml_cohort_steps(tmp_path):
    cfg = bench_config("dml", 2, "tiny_cnn", 32, 8, str(tmp_path), "plain")
    t = plain_step_time(cfg)  # two spawned processes that all-gather their logits over gloo every step
    assert math.isfinite(t) and 0 < t < 5


def test_paired_ratio_cancels_drift_between_repeats():
    import pytest

    from online_distill.run.bench import paired_ratio

    # the machine got 2x slower for the second repeat: each pair still says 1.1
    assert paired_ratio([110.0, 220.0, 110.0], [100.0, 200.0, 100.0]) == pytest.approx((1.1, 1.1, 1.1))
    # the ratio of the medians would say 1.0 here; the pairs say 1.0, 2.0, 0.5
    assert paired_ratio([100.0, 400.0, 50.0], [100.0, 200.0, 100.0]) == pytest.approx((1.0, 0.5, 2.0))
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0], [1.0, 2.0])


def test_bench_refuses_bad_arguments_before_starting_anything(capsys):
    from online_distill.cli import main

    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats: got 0; allowed: an integer >= 1" in capsys.readouterr().err
