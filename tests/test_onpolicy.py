"""On-policy distillation (training/onpolicy.py): a peer's batch holds its own continuations,
where prompt tokens and padding never count and no label does; the policy-gradient estimator
has the reverse KL's gradient in expectation; the exact reverse KL of the val_gen metrics is
the closed form; bad combinations are refused in one line; and through the real loop packed
and spread on-policy mutual learning learn the same, send what the formula says, and a resumed
run continues with the same numbers."""
from __future__ import annotations

import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from online_distill.config import schema as C
from online_distill.data.datasets import IGNORE_INDEX
from online_distill.distill.losses import DenseTarget, distill_loss, policy_gradient_kd
from online_distill.distill.sparse import compress
from online_distill.models.gpt import GPT
from online_distill.training.onpolicy import OnPolicy, generation_metrics, repetition

fortunes = pytest.mark.skipif(not os.path.isdir("/usr/share/games/fortunes"),
                              reason="Debian's fortunes package is not installed (apt-get install fortunes)")
TINY = "gpt(dim=16, layers=1, heads=2)"


def op_cfg(**over) -> C.Config:
    cfg = C.from_dict({"models": [TINY], "data": {"dataset": "fortunes", "seq_len": 16},
                       "onpolicy": {"lmbda": 0.5, "prompt_len": 4}, "train": {"seed": 3},
                       "distill": {"mode": "ema"}})
    return C.with_overrides(cfg, {k.replace("__", "."): v for k, v in over.items()})


def batch(b: int = 8, length: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 50, (b, length + 1), generator=g)
    x[0, 10:] = 0  # a short window: padding at its end
    y = torch.where(x[:, 1:] == 0, torch.full_like(x[:, 1:], IGNORE_INDEX), x[:, 1:])
    return x[:, :-1], y


def test_a_rollout_counts_the_kd_term_only_where_the_student_drew_and_no_label_on_its_rows():
    torch.manual_seed(0)
    model = GPT(vocab=50, seq_len=16, dim=16, layers=1, heads=2)
    x, y = batch()
    op = OnPolicy(op_cfg(), 16)
    r = op.rollout(model, x, y, step=5, peer=0)
    assert torch.equal(r.generated, op.rows(8, 5, x.device)) and 0 < int(r.generated.sum()) < 8
    for i in range(8):
        if r.generated[i]:
            assert torch.equal(r.x[i, :4], x[i, :4])  # the prompt is the window's start
            assert (r.y[i] == IGNORE_INDEX).all()  # no cross-entropy on its own draws
            assert r.kd_mask[i].nonzero().squeeze(1).tolist() == list(range(3, 15))  # prompt's last .. last but one
        else:
            assert torch.equal(r.x[i], x[i]) and torch.equal(r.y[i], y[i])
            assert torch.equal(r.kd_mask[i], y[i] != IGNORE_INDEX)
    late = OnPolicy(op_cfg(onpolicy__start_epochs=0.5), 16, steps_per_epoch=12)  # on-policy from step 6
    assert not late.rollout(model, x, y, step=5, peer=0).generated.any()
    assert torch.equal(late.rollout(model, x, y, step=6, peer=0).generated, op.rows(8, 6, x.device))
    again = op.rollout(model, x, y, step=5, peer=0)
    assert torch.equal(again.x, r.x)  # a pure function of (seed, step, peer) and the weights
    assert not torch.equal(op.rollout(model, x, y, step=5, peer=1).x, r.x)  # each peer draws its own


def test_prompt_and_padding_never_count_in_the_loss():
    torch.manual_seed(0)
    model = GPT(vocab=50, seq_len=16, dim=16, layers=1, heads=2)
    x, y = batch()
    r = OnPolicy(op_cfg(onpolicy__lmbda=1.0), 16).rollout(model, x, y, step=0, peer=0)
    z = model(r.x)
    t = torch.randn(1, *z.shape)
    kw = dict(temperature=1.0, kd_weight=1.0, ce_weight=1.0, kd_mask=r.kd_mask)
    base, parts = distill_loss(z, DenseTarget(t), r.y, **kw)
    moved = t.clone()
    moved[0][~r.kd_mask] += 5 * torch.randn_like(moved[0][~r.kd_mask])  # prompt positions and padding only
    same, _ = distill_loss(z, DenseTarget(moved), r.y, **kw)
    assert torch.equal(base, same) and parts["ce"] == 0 and parts["kd_tokens"] == r.kd_mask.sum()
    moved[0][r.kd_mask] += 1.0 * torch.randn_like(moved[0][r.kd_mask])
    assert not torch.equal(distill_loss(z, DenseTarget(moved), r.y, **kw)[0], base)


def test_the_policy_gradient_has_the_reverse_kl_gradient_in_expectation():
    """Enumerating every token a with weight p_s(a): E[ratio(a) grad log p_s(a)] = grad KL(p_s || p_t)."""
    torch.manual_seed(0)
    v = 7
    z_s = torch.randn(3, v, requires_grad=True)
    z_t = torch.randn(1, 3, v)
    exact = torch.autograd.grad((F.softmax(z_s, -1) * (F.log_softmax(z_s, -1) - F.log_softmax(z_t[0], -1))).sum(), z_s)[0]
    expected = torch.zeros_like(z_s)
    p_s = F.softmax(z_s, -1).detach()
    for a in range(v):
        tokens = torch.full((3,), a)
        surrogate, ratio = policy_gradient_kd(z_s, DenseTarget(z_t), tokens, temperature=1.0)
        g = torch.autograd.grad(surrogate, z_s, grad_outputs=p_s[:, a])[0]
        expected += g
        torch.testing.assert_close(ratio, (F.log_softmax(z_s, -1) - F.log_softmax(z_t[0], -1))[:, a].detach())
    torch.testing.assert_close(expected, exact, rtol=1e-5, atol=1e-6)


def test_a_top_k_teacher_gives_the_log_prob_of_a_token_from_its_top_k_or_its_tail():
    torch.manual_seed(0)
    z = torch.randn(2, 10)
    target = compress(z, temperature=1.0, kind="topk", k=3)
    log_p = F.log_softmax(z, -1)
    top = log_p.topk(3, -1).indices
    inside, outside = top[:, 0], log_p.argmin(-1)
    torch.testing.assert_close(target.token_log_prob(inside, temperature=1.0), log_p.gather(-1, inside[:, None])[:, 0],
                               rtol=1e-3, atol=1e-3)  # float16 on the wire
    tail = 1 - log_p.exp().gather(-1, top).sum(-1)
    torch.testing.assert_close(target.token_log_prob(outside, temperature=1.0), (tail / 7).log(), rtol=1e-3, atol=1e-3)


class Fixed(nn.Module):
    """A 'language model' whose next-token distribution is the same everywhere."""

    def __init__(self, logits: torch.Tensor, seq_len: int = 16):
        super().__init__()
        self.logits, self.seq_len = nn.Parameter(logits), seq_len

    def forward(self, ids):
        return self.logits.expand(*ids.shape, -1)


def test_the_exact_reverse_kl_and_teacher_nll_of_what_a_student_writes_are_the_closed_forms():
    from online_distill.models.generate import Sampling

    p_s, p_t = torch.tensor([0.5, 0.3, 0.2, 0.0]), torch.tensor([0.25, 0.25, 0.25, 0.25])
    student = Fixed(torch.log(p_s.clamp_min(1e-30)))
    teacher = Fixed(torch.log(p_t))
    prompts = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]] * 4)
    m, pairs = generation_metrics(student, prompts, lambda ids: teacher(ids).unsqueeze(0),
                                  Sampling(max_new_tokens=6, temperature=1.0), 3, seed=0,
                                  autocast=__import__("contextlib").nullcontext)
    kl = float((p_s[:3] * (p_s[:3] / p_t[:3]).log()).sum())  # sum over the student's support
    assert m["val_gen_reverse_kl"] == pytest.approx(kl, rel=1e-5)
    assert m["val_gen_teacher_nll"] == pytest.approx(-float(p_t[0].log()), rel=1e-5)
    assert all(len(c) == 6 for _, c in pairs) and 0 <= m["val_gen_repetition"] <= 1
    assert repetition(torch.tensor([1, 2, 1, 2, 1, 2, 1, 2]), n=2) == pytest.approx(1 - 2 / 7)


@pytest.mark.parametrize("over, field", [
    ({"distill__mode": "codistill", "models": [TINY, TINY]}, "onpolicy.lmbda"),
    ({"onpolicy__prompt_len": 16}, "onpolicy.prompt_len"),
    ({"onpolicy__lmbda": 1.0, "distill__mode": "offline", "distill__teacher_checkpoint": "/tmp/t.pt",
      "distill__teacher_model": TINY, "distill__teacher_cache_dir": "/tmp/x"},
     "distill.teacher_cache_dir"),
    ({"onpolicy__estimator": "policy_gradient", "distill__logits": "sampled"}, "onpolicy.estimator"),
    ({"onpolicy__lmbda": 1.5}, "onpolicy.lmbda"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(over, field):
    with pytest.raises(C.ConfigError) as e:
        op_cfg(**over).check_fields()
    assert e.value.field == field and "\n" not in str(e.value)


def lm_cfg(tmp_path, **over) -> C.Config:
    cfg = C.from_dict({
        "models": [TINY, TINY], "distill": {"mode": "dml", "logits": "topk", "logits_k": 4},
        "data": {"dataset": "fortunes", "seq_len": 24, "val_size": 32, "train_subset": 128, "test_subset": 32},
        "loss": {"temperature": 1.0, "kd_weight": 1.0, "ce_weight": 1.0},
        "optim": {"name": "adamw", "lr": 0.003, "schedule": "constant", "grad_clip": 1.0},
        "train": {"epochs": 2, "batch_size": 16, "seed": 0},
        "onpolicy": {"lmbda": 0.5, "prompt_len": 8, "eval_prompts": 8},
        "scale": {"cpus_per_worker": 1}, "run": {"name": "op", "storage_path": str(tmp_path / "runs"), "max_failures": 0}})
    return C.with_overrides(cfg, {k.replace("__", "."): v for k, v in over.items()})


COLS = ["epoch", "member", "val_nll", "val_bpb", "train_ce", "train_kd", "val_gen_repetition"]


@fortunes
@pytest.mark.e2e
def test_packed_and_spread_on_policy_mutual_learning_agree_and_send_the_formulas_bytes(tmp_path, train_history):
    """Each peer generates and the other scores its samples: in one worker from memory, over two
    workers as token ids and top-4 scores through the collective."""
    from online_distill.distill.sparse import bytes_per_token

    a = pd.DataFrame(train_history(lm_cfg(tmp_path, scale__peers_per_worker=2)))
    b = pd.DataFrame(train_history(lm_cfg(tmp_path, scale__peers_per_worker=1)))
    pd.testing.assert_frame_equal(a[COLS], b[COLS], rtol=1e-4, atol=1e-5)
    sent = b[b["member"] == "peer0"]["exchange_bytes_per_step"].iloc[-1]
    b_, l_, k_, n_ = 16, 24, 1, 2  # batch, positions, peers per worker, peers
    assert sent == k_ * (b_ * l_ * 4 + n_ * b_ * l_ * bytes_per_token("topk", 4, 256))
    assert (a["train_kd"].dropna() > 0).all() and (a.query("member != 'ensemble'")["generate_share"] > 0).all()


@fortunes
@pytest.mark.e2e
def test_an_on_policy_run_resumed_mid_way_continues_with_the_same_numbers(tmp_path):
    from online_distill.run import train

    cfg = lm_cfg(tmp_path, models=[TINY], distill__mode="ema", distill__ema_decay=0.9, distill__logits="dense",
                 scale__peers_per_worker=1, train__epochs=2)
    whole = train(C.with_overrides(cfg, {"run.name": "whole"}), verbose=False)
    # the same run losing its worker at the start of epoch 2: retried from epoch 1's checkpoint
    resumed = train(C.with_overrides(cfg, {"run.name": "retried", "run.max_failures": 1, "run.fail_once_at_epoch": 1}),
                    verbose=False)
    assert resumed.history.groupby("epoch")["resumed_from_epoch"].first().tolist() == [0, 1]
    cols = ["epoch", "val_nll", "train_ce", "train_kd", "val_gen_repetition"]
    h1, h2 = whole.history.query("member == 'peer0'"), resumed.history.query("member == 'peer0'")
    pd.testing.assert_frame_equal(h1[cols].reset_index(drop=True), h2[cols].reset_index(drop=True), rtol=1e-5, atol=1e-6)
    assert (resumed.run_dir and os.path.exists(os.path.join(resumed.run_dir, "samples", "epoch_0002.txt")))


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory):
    """A tiny byte-level GPT teacher, trained alone for a few steps."""
    from online_distill.run import train

    tmp = tmp_path_factory.mktemp("onpolicy_teacher")
    cfg = lm_cfg(tmp, models=["gpt(dim=32, layers=1, heads=2)"], distill__mode="independent", distill__logits="dense",
                 onpolicy__lmbda=0.0, train__epochs=1, scale__peers_per_worker=1, run__name="teacher")
    return train(cfg, verbose=False).run_dir, tmp


def student_cfg(lm_teacher, name: str, **over) -> C.Config:
    teacher_dir, tmp = lm_teacher
    return lm_cfg(tmp, models=[TINY], distill__mode="offline", distill__teacher_checkpoint=teacher_dir,
                  distill__logits="dense", scale__peers_per_worker=1, run__name=name, **over)


@fortunes
@pytest.mark.e2e
def test_a_teacher_cache_serves_the_data_rows_and_never_keeps_a_students_sample(lm_teacher):
    from online_distill.run import train

    live = train(student_cfg(lm_teacher, "live"), verbose=False)
    cache = str(lm_teacher[1] / "cache")
    cached = train(student_cfg(lm_teacher, "cached", distill__teacher_cache_dir=cache), verbose=False)
    cols = ["epoch", "member", "val_nll", "train_ce", "train_kd", "val_gen_teacher_nll"]
    pd.testing.assert_frame_equal(cached.history[cols], live.history[cols], rtol=1e-5, atol=1e-6)
    from online_distill.data import load_data
    from online_distill.teachers.cache import DiskCache

    kept = sum(len(DiskCache(cache, d).entries) for d in os.listdir(cache) if os.path.isdir(os.path.join(cache, d)))
    assert kept == len(load_data(student_cfg(lm_teacher, "x").data).train)  # the data rows: no generated row kept
    # generated rows still went through the teacher: more forwards than data rows on epoch 2
    assert cached.history.groupby("epoch")["teacher_forwards"].first().iloc[-1] > 0


@fortunes
@pytest.mark.e2e
def test_the_service_scores_a_students_samples_as_the_teacher_in_process_does(ray_session, lm_teacher):
    from online_distill.run import train

    here = train(student_cfg(lm_teacher, "here_op"), verbose=False)
    served = train(student_cfg(lm_teacher, "served_op", distill__teacher_service=True), verbose=False)
    cols = ["epoch", "member", "val_nll", "train_ce", "train_kd"]
    pd.testing.assert_frame_equal(served.history[cols], here.history[cols], rtol=1e-5, atol=1e-6)
    assert served.history["teacher_forwards"].sum() == 0  # every score came from the service


@fortunes
@pytest.mark.e2e
def test_generate_prints_what_a_trained_student_writes(lm_teacher, capsys):
    from online_distill.cli import main

    teacher_dir, _ = lm_teacher
    argv = ["generate", teacher_dir, "--prompt", "The ", "--prompt", "Why", "--max-new-tokens", "20", "--seed", "5"]
    assert main(argv) == 0
    blocks = capsys.readouterr().out.split("---\n")
    assert blocks[0].startswith("The ") and blocks[1].startswith("Why") and len(blocks[0]) > len("The \n")
    assert main(argv) == 0 and capsys.readouterr().out.split("---\n") == blocks  # the same seed, the same text
    assert main([*argv[:2], "--prompt", "x", "--top-p", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--top-p" in err
