"""Language models through the framework: every position's next byte distilled, on the built-in
fortunes corpus with tiny GPTs. Packed and spread DML learn the same with compressed logits (and
the bytes crossing the wire are the formula's), a dense teacher cache teaches exactly what the
live teacher does and a later run never runs the teacher, self-teachers and codistillation run,
a Hugging Face causal LM trains through the adapter, and mismatched vocabularies are refused."""
from __future__ import annotations

import os

import pandas as pd
import pytest

from online_distill.config import schema as C
from online_distill.data.datasets import DATASETS
from online_distill.run import train

pytestmark = pytest.mark.skipif(not os.path.isdir("/usr/share/games/fortunes"),
                                reason="Debian's fortunes package is not installed (apt-get install fortunes)")
TINY = "gpt(dim=16, layers=1, heads=2)"
COLS = ["epoch", "member", "val_nll", "val_bpb", "train_ce", "train_kd"]


def lm_cfg(tmp_path, **over) -> C.Config:
    cfg = C.from_dict({
        "models": [TINY, TINY], "distill": {"mode": "dml", "logits": "topk", "logits_k": 4},
        "data": {"dataset": "fortunes", "seq_len": 32, "val_size": 64, "train_subset": 256, "test_subset": 64},
        "loss": {"temperature": 2.0, "kd_weight": 1.0, "ce_weight": 1.0},
        "optim": {"name": "adamw", "lr": 0.003, "schedule": "constant", "grad_clip": 1.0},
        "train": {"epochs": 2, "batch_size": 32, "seed": 0},
        "scale": {"cpus_per_worker": 1}, "run": {"name": "lm", "storage_path": str(tmp_path / "runs"), "max_failures": 0}})
    return C.with_overrides(cfg, {k.replace("__", "."): v for k, v in over.items()})


@pytest.mark.parametrize("kind, bits", [("topk", 16), ("topk", 8), ("sampled", 16)])
def test_packed_and_spread_lm_peers_learn_the_same_and_send_what_the_formula_says(tmp_path, train_history, kind, bits):
    """Packed peers read each other's targets from memory, spread ones get them over the wire: a
    sampled target is the same draws either way (they are seeded by example and peer, not by
    where the peer runs)."""
    from online_distill.distill.sparse import bytes_per_token

    packed = lm_cfg(tmp_path, scale__peers_per_worker=2, distill__logits=kind, distill__logits_bits=bits)
    spread = lm_cfg(tmp_path, scale__peers_per_worker=1, distill__logits=kind, distill__logits_bits=bits)
    a, b = pd.DataFrame(train_history(packed)), pd.DataFrame(train_history(spread))
    pd.testing.assert_frame_equal(a[COLS], b[COLS], rtol=1e-4, atol=1e-5)
    sent = b[b["member"] == "peer0"]["exchange_bytes_per_step"].iloc[-1]
    assert sent == 32 * 32 * bytes_per_token(kind, 4, 256, bits=bits)  # one peer's batch x positions x bytes a token
    assert (a["val_bpb"].dropna() < 8.0).all() and (b["logits_kl"].dropna() >= 0).all()


@pytest.mark.parametrize("mode, extra", [("ema", {"distill.ema_decay": 0.9}), ("dlb", {}),
                                         ("codistill", {"distill.sync_every": 2}),
                                         ("snapshot", {"optim.schedule": "cyclic", "optim.cycles": 2})])
def test_self_teachers_and_codistillation_run_on_language_models(tmp_path, train_history, mode, extra):
    models = [TINY, TINY] if mode == "codistill" else [TINY]
    cfg = lm_cfg(tmp_path, models=models, distill__mode=mode, scale__peers_per_worker=len(models), **extra)
    h = pd.DataFrame(train_history(cfg))
    assert h["val_bpb"].notna().all() and (h.query("member == 'peer0'")["train_kd"].iloc[-1] > 0 or mode == "snapshot")


def test_a_dense_teacher_cache_teaches_what_the_live_teacher_does_and_later_runs_never_run_it(tmp_path, capsys):
    teacher = train(lm_cfg(tmp_path, models=["gpt(dim=32, layers=1, heads=2)"], distill__mode="independent",
                           distill__logits="dense", run__name="teacher"), verbose=False)
    kd = dict(models=[TINY], distill__mode="offline", distill__teacher_checkpoint=teacher.run_dir, distill__logits="dense")
    live = train(lm_cfg(tmp_path, run__name="live", **kd), verbose=False)
    cache = str(tmp_path / "cache")
    capsys.readouterr()
    first = train(lm_cfg(tmp_path, run__name="first", distill__teacher_cache_dir=cache, **kd), verbose=False)
    said_first = capsys.readouterr().err
    second = train(lm_cfg(tmp_path, run__name="second", distill__teacher_cache_dir=cache, **kd), verbose=False)
    said_second = capsys.readouterr().err
    assert "the teacher ran on 256 of 256 training examples, once" in said_first
    assert "all 256 training examples there: the teacher runs 0 times" in said_second
    assert live.history["teacher_forwards"].sum() > 0
    assert first.history["teacher_forwards"].sum() == 0 and second.history["teacher_forwards"].sum() == 0
    for cached in (first, second):
        pd.testing.assert_frame_equal(cached.history[COLS], live.history[COLS], rtol=1e-5, atol=1e-6)


def test_an_eight_bit_top_k_cache_teaches_exactly_what_the_live_teacher_does(tmp_path):
    """8-bit log-probs are rounded where they are made, so the live teacher's targets and the
    ones read back from the cache are the same numbers: the two runs train identically."""
    teacher = train(lm_cfg(tmp_path, models=["gpt(dim=32, layers=1, heads=2)"], distill__mode="independent",
                           run__name="teacher"), verbose=False)
    kd = dict(models=[TINY], distill__mode="offline", distill__teacher_checkpoint=teacher.run_dir,
              distill__logits="topk", distill__logits_k=10, distill__logits_bits=8)
    live = train(lm_cfg(tmp_path, run__name="live", **kd), verbose=False)
    cached = train(lm_cfg(tmp_path, run__name="cached", distill__teacher_cache_dir=str(tmp_path / "cache"), **kd),
                   verbose=False)
    assert live.history["teacher_forwards"].sum() > 0 and cached.history["teacher_forwards"].sum() == 0
    pd.testing.assert_frame_equal(cached.history[COLS], live.history[COLS], rtol=1e-5, atol=1e-6)
    assert (live.history["logits_kl"].dropna() > 0).all()


def test_a_sampled_cache_teaches_every_peer_exactly_what_the_live_teacher_does(tmp_path):
    """Sampled draws are seeded by the example's digest and the teacher (0: a frozen teacher is one
    teacher for every peer), so the cache, filled once on the driver in batches of its own, holds
    the very draws the live teacher makes for peer 0 and peer 1 at any step."""
    teacher = train(lm_cfg(tmp_path, models=["gpt(dim=32, layers=1, heads=2)"], distill__mode="independent",
                           run__name="teacher"), verbose=False)
    kd = dict(models=[TINY, "gpt(dim=8, layers=1, heads=2)"], distill__mode="offline", scale__peers_per_worker=2,
              distill__teacher_checkpoint=teacher.run_dir, distill__logits="sampled", distill__logits_k=6,
              distill__logits_bits=8)  # rounded where made, so live and cached are the same numbers, bit for bit
    live = train(lm_cfg(tmp_path, run__name="live", **kd), verbose=False)
    cached = train(lm_cfg(tmp_path, run__name="cached", distill__teacher_cache_dir=str(tmp_path / "cache"), **kd),
                   verbose=False)
    assert live.history["teacher_forwards"].sum() > 0 and cached.history["teacher_forwards"].sum() == 0
    assert set(live.history["member"]) >= {"peer0", "peer1"}
    pd.testing.assert_frame_equal(cached.history[COLS], live.history[COLS], rtol=1e-5, atol=1e-6)


def test_two_runs_filling_one_teacher_cache_at_once_run_the_teacher_once(tmp_path):
    """Two drivers started together on the same teacher, data and form: one fills the cache, the
    other waits for it and then reads it (before, both ran the teacher on every example)."""
    import threading

    from online_distill.data.datasets import load_data
    from online_distill.models.builders import build_model
    from online_distill.teachers.frozen import fill_disk_cache
    from online_distill.teachers.weights import TeacherSource

    cfg = lm_cfg(tmp_path, models=[TINY], distill__mode="offline", distill__teacher_checkpoint=str(tmp_path),
                 distill__teacher_cache_dir=str(tmp_path / "cache"))
    data = load_data(cfg.data)
    net = build_model(TINY, data.sample, data.num_classes, label_shape=data.label_shape)
    members = [(TeacherSource(str(tmp_path / "t.pt"), TINY, None), net.state_dict())]
    computed = []
    threads = [threading.Thread(target=lambda: computed.append(fill_disk_cache(cfg, data, members)[0])) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    unique = len({bytes(r.numpy().tobytes()) for r, _ in data.train})  # an example seen twice is run once
    assert sorted(computed) == [0, unique]


def test_a_hugging_face_causal_lm_trains_through_the_adapter(tmp_path):
    from transformers import GPT2Config

    from online_distill.models import hf

    tiny = hf.causal_lm(GPT2Config(vocab_size=256, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    cfg = lm_cfg(tmp_path, models=["hf_gpt2", TINY], scale__peers_per_worker=2, train__epochs=2)
    h = train(cfg, models={"hf_gpt2": tiny}, verbose=False).history
    peer0 = h.query("member == 'peer0'")
    assert peer0["train_ce"].iloc[-1] < peer0["train_ce"].iloc[0] and peer0["val_bpb"].iloc[-1] < 8.0


def test_mismatched_vocabularies_and_lengths_are_refused_on_the_driver(tmp_path, no_ray):
    def other_vocab(shape, num_classes):
        from online_distill.models.gpt import gpt

        return gpt(shape, num_classes + 44, dim=16, layers=1, heads=2)

    cfg = lm_cfg(tmp_path, models=[TINY, "wider_vocab"])
    with pytest.raises(C.ConfigError, match=r"^models: models\[0\] 'gpt\(dim=16, layers=1, heads=2\)' predicts 256, models\[1\] 'wider_vocab' predicts 300; "
                                            r"allowed: every model predicting the dataset's 256 classes"):
        train(cfg, models={"wider_vocab": other_vocab}, verbose=False)
    short = lm_cfg(tmp_path, models=["gpt(dim=16, layers=1, heads=2)"], distill__mode="independent", data__seq_len=600)
    with pytest.raises(C.ConfigError, match=r"^models\[0\]: .*"):
        train(C.with_overrides(short, {"models": ["hf_short"]}),
              models={"hf_short": __import__("online_distill.models.hf", fromlist=["x"]).causal_lm(
                  __import__("transformers").GPT2Config(vocab_size=256, n_positions=64, n_embd=16, n_layer=1,
                                                        n_head=2))}, verbose=False)


def test_the_builtin_corpus_is_registered():
    assert "fortunes" in DATASETS


@pytest.mark.e2e
def test_a_sweep_over_the_divergence_judged_by_bits_per_byte(ray_session, tmp_path):
    from online_distill.sweep.driver import run_sweep
    from online_distill.sweep.spec import Dist, SchedulerSpec, SweepSpec

    base = lm_cfg(tmp_path, train__epochs=1, scale__peers_per_worker=2, scale__cpus_per_worker=0.5)
    spec = SweepSpec(name="div", base=base, space={"loss.divergence": Dist("grid", ("forward_kl", "reverse_kl", "jsd"))},
                     seeds=(0,), baseline=True, metric_name="bpb", scheduler=SchedulerSpec(name="none"),
                     storage_path=str(tmp_path / "sweeps"))
    assert spec.metric == "best_peer/val_bpb" and spec.mode == "min"
    res = run_sweep(spec, verbose=0)
    assert len(res.trials) == 4 and (res.trials["status"] == "TERMINATED").all()
    settings = res.summary[res.summary["role"] == "setting"]
    assert settings["objective_mean"].is_monotonic_increasing  # the best (lowest bits per byte) first
    assert set(settings["loss.divergence"]) == {"forward_kl", "reverse_kl", "jsd"}
