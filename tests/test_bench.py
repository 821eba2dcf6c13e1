"""The benchmark's plain-PyTorch side (the Ray side is the loop that the e2e tests run)."""
import math

from online_distill.bench import bench_config, plain_step_time


def test_plain_pytorch_dml_cohort_steps(tmp_path):
    cfg = bench_config("dml", 2, "tiny_cnn", 32, 8, str(tmp_path), "plain")
    t = plain_step_time(cfg)  # two spawned processes that all-gather their logits over gloo every step
    assert math.isfinite(t) and 0 < t < 5
