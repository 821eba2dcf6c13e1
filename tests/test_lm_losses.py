"""The KD loss for language models: per-position divergences, padding, and the (B, C) case
unchanged. Checked against closed forms and hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from online_distill.distill.losses import distill_loss, divergence_from_log_probs, kd_term

DIVS = ["forward_kl", "reverse_kl", "jsd"]


def logp(z, T=1.0):
    return F.log_softmax(torch.as_tensor(z, dtype=torch.float64) / T, dim=-1)


@pytest.fixture
def seq():
    """Student (B, L, C), two teachers, labels with trailing padding of different lengths."""
    g = torch.Generator().manual_seed(0)
    B, L, C = 3, 6, 7
    z_s = torch.randn(B, L, C, generator=g)
    z_t = 2 * torch.randn(2, B, L, C, generator=g)
    y = torch.randint(0, C, (B, L), generator=g)
    lengths = [6, 4, 2]
    for b, n in enumerate(lengths):
        y[b, n:] = -100
    return z_s, z_t, y, lengths


# ---- each divergence against closed forms ------------------------------------------------------

@pytest.mark.parametrize("div", DIVS)
def test_divergence_of_a_distribution_to_itself_is_zero(div):
    lp = logp(torch.randn(4, 9, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(divergence_from_log_probs(lp, lp, divergence=div), torch.zeros(4, dtype=lp.dtype), atol=1e-12)


# p_t = (1/2, 1/2) (logits 0, 0); p_s = (3/4, 1/4) (logits ln 3, 0)
P_T, P_S = [0.0, 0.0], [math.log(3.0), 0.0]
HAND = {
    "forward_kl": 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25),     # = ln(4/3) / 2
    "reverse_kl": 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),   # = 3/4 ln 1.5 - 1/4 ln 2
    # beta 0.5: m = (0.625, 0.375)
    "jsd": 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375))
    + 0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)),
}


@pytest.mark.parametrize("div", DIVS)
def test_two_class_values_by_hand(div):
    got = divergence_from_log_probs(logp(P_T), logp(P_S), divergence=div).item()
    assert got == pytest.approx(HAND[div], abs=1e-12)
    assert HAND["forward_kl"] == pytest.approx(0.5 * math.log(4 / 3))


def test_three_class_jsd_with_beta_a_quarter_by_hand():
    """TRL's convention: m = beta p_t + (1 - beta) p_s; JSD = beta KL(p_t||m) + (1 - beta) KL(p_s||m)."""
    p_t, p_s, beta = [0.2, 0.3, 0.5], [0.6, 0.3, 0.1], 0.25
    m = [0.25 * 0.2 + 0.75 * 0.6, 0.25 * 0.3 + 0.75 * 0.3, 0.25 * 0.5 + 0.75 * 0.1]  # (0.5, 0.3, 0.2)
    assert m == pytest.approx([0.5, 0.3, 0.2])
    want = 0.25 * sum(p * math.log(p / q) for p, q in zip(p_t, m)) + 0.75 * sum(p * math.log(p / q) for p, q in zip(p_s, m))
    got = divergence_from_log_probs(torch.tensor(p_t, dtype=torch.float64).log(), torch.tensor(p_s, dtype=torch.float64).log(),
                                    divergence="jsd", jsd_beta=beta)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_jsd_half_is_symmetric_and_at_most_log_two():
    g = torch.Generator().manual_seed(2)
    a, b = logp(3 * torch.randn(5, 11, generator=g)), logp(3 * torch.randn(5, 11, generator=g))
    ab = divergence_from_log_probs(a, b, divergence="jsd", jsd_beta=0.5)
    ba = divergence_from_log_probs(b, a, divergence="jsd", jsd_beta=0.5)
    assert torch.allclose(ab, ba, atol=1e-12)
    assert (ab <= math.log(2) + 1e-12).all() and (ab > 0).all()
    # a not-half beta is not symmetric
    assert not torch.allclose(divergence_from_log_probs(a, b, divergence="jsd", jsd_beta=0.2),
                              divergence_from_log_probs(b, a, divergence="jsd", jsd_beta=0.2))


def test_beta_endpoints_are_the_two_kls_as_in_trl():
    """TRL GKDTrainer.generalized_jsd_loss: beta == 0 is KL(teacher || student), beta == 1 is
    KL(student || teacher); the mixture formula itself tends to 0 at both ends."""
    t, s = logp(P_T), logp(P_S)
    assert divergence_from_log_probs(t, s, divergence="jsd", jsd_beta=0.0).item() == pytest.approx(HAND["forward_kl"])
    assert divergence_from_log_probs(t, s, divergence="jsd", jsd_beta=1.0).item() == pytest.approx(HAND["reverse_kl"])
    for near in (1e-7, 1 - 1e-7):
        assert divergence_from_log_probs(t, s, divergence="jsd", jsd_beta=near).item() < 1e-6


def test_bad_divergence_and_beta_are_refused(seq):
    z_s, z_t, y, _ = seq
    with pytest.raises(ValueError, match="loss.divergence.*'forward_kl', 'reverse_kl', 'jsd'"):
        distill_loss(z_s, z_t, y, temperature=1.0, kd_weight=0.5, divergence="kl")
    with pytest.raises(ValueError, match=r"loss.jsd_beta.*\[0, 1\]"):
        distill_loss(z_s, z_t, y, temperature=1.0, kd_weight=0.5, divergence="jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match="labels must have shape"):
        distill_loss(z_s, z_t, y[:, :3], temperature=1.0, kd_weight=0.5)
    with pytest.raises(ValueError, match="n_teachers"):
        distill_loss(z_s, z_t[0], y, temperature=1.0, kd_weight=0.5)
    with pytest.raises(ValueError, match="teacher_logits: got dict; allowed: a tensor"):
        distill_loss(z_s, {"ids": None}, y, temperature=1.0, kd_weight=0.5)


# ---- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 3.0])
def test_forward_kl_gradient_on_sequences_is_the_closed_form(seq, T):
    """d loss / d z_s = kd_weight T (softmax(z_s/T) - softmax(z_t/T)) / N_real at real positions, 0 at padding."""
    z_s, z_t, y, _ = seq
    w = 0.7
    z = z_s.clone().double().requires_grad_(True)
    teacher = z_t[:1].double().clone().requires_grad_(True)
    loss, parts = distill_loss(z, teacher, y, temperature=T, kd_weight=w, ce_weight=0.0)
    loss.backward()
    real = (y != -100).unsqueeze(-1)
    n = real.sum()
    assert parts["tokens"].item() == n.item() == 12
    want = w * T * (F.softmax(z.detach() / T, -1) - F.softmax(teacher.detach()[0] / T, -1)) / n * real
    assert torch.allclose(z.grad, want, atol=1e-8)  # the loss computes in float32
    assert teacher.grad is None


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_reverse_kl_gradient_is_the_closed_form(seq, T):
    """KL(p_s || p_t), p_s = softmax(z/T): d/dz_j = (1/T) p_s,j (log p_s,j - log p_t,j - KL); times
    kd_weight T^2 / N_real: kd_weight T p_s (log p_s - log p_t - KL) / N_real, written without autograd."""
    z_s, z_t, y, _ = seq
    w = 0.4
    z = z_s.clone().double().requires_grad_(True)
    loss, _ = distill_loss(z, z_t[:1].double(), y, temperature=T, kd_weight=w, ce_weight=0.0, divergence="reverse_kl")
    loss.backward()
    real = (y != -100).unsqueeze(-1)
    p_s = torch.softmax(z_s.double() / T, -1)
    d = torch.log(p_s) - torch.log(torch.softmax(z_t[0].double() / T, -1))
    kl = (p_s * d).sum(-1, keepdim=True)
    want = w * T * p_s * (d - kl) / real.sum() * real
    assert torch.allclose(z.grad, want, atol=1e-8)  # the loss computes in float32


# ---- padding ------------------------------------------------------------------------------------

def _unpadded(z_s, z_t, y, lengths):
    """The real positions only, as a flat (N, C) batch."""
    zs = torch.cat([z_s[b, :n] for b, n in enumerate(lengths)])
    zt = torch.cat([z_t[:, b, :n] for b, n in enumerate(lengths)], dim=1)
    yy = torch.cat([y[b, :n] for b, n in enumerate(lengths)])
    return zs, zt, yy


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("multi", ["mean_kl", "mean_probs"])
def test_padded_batch_gives_the_unpadded_loss(seq, div, multi):
    z_s, z_t, y, lengths = seq
    kw = dict(temperature=2.0, kd_weight=0.6, ce_weight=1.0, divergence=div, multi_teacher=multi, jsd_beta=0.3)
    padded, parts = distill_loss(z_s, z_t, y, **kw)
    flat, flat_parts = distill_loss(*_unpadded(z_s, z_t, y, lengths), **kw)
    assert abs(padded.item() - flat.item()) < 1e-6
    assert parts["tokens"] == flat_parts["tokens"] == sum(lengths)
    # whatever the models say at padded positions does not count
    pad = (y == -100).unsqueeze(-1)
    noisy_s = torch.where(pad, 1e4 * torch.randn_like(z_s), z_s)
    noisy_t = torch.where(pad, torch.full_like(z_t, 1e4), z_t)
    noisy, _ = distill_loss(noisy_s, noisy_t, y, **kw)
    assert abs(noisy.item() - padded.item()) < 1e-6


def test_all_padding_is_zero_not_nan(seq):
    z_s, z_t, y, _ = seq
    loss, parts = distill_loss(z_s, z_t, torch.full_like(y, -100), temperature=2.0, kd_weight=0.5)
    assert loss.item() == 0.0 and parts["tokens"] == 0


def test_kd_weight_zero_is_plain_cross_entropy_over_real_tokens(seq):
    z_s, z_t, y, _ = seq
    loss, parts = distill_loss(z_s, z_t, y, temperature=4.0, kd_weight=0.0, divergence="jsd")
    want = F.cross_entropy(z_s.reshape(-1, 7), y.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, want, atol=1e-6)
    assert parts["kd"] > 0


def test_no_teacher_is_plain_cross_entropy_with_a_token_count(seq):
    z_s, _, y, lengths = seq
    loss, parts = distill_loss(z_s, None, y, temperature=4.0, kd_weight=0.5)
    assert torch.allclose(loss, F.cross_entropy(z_s.reshape(-1, 7), y.reshape(-1)), atol=1e-6)
    assert parts["kd"] == 0 and parts["tokens"] == sum(lengths)


@pytest.mark.parametrize("div", DIVS)
def test_mean_kl_and_mean_probs_on_sequences(seq, div):
    z_s, z_t, y, _ = seq
    mask = y != -100
    T = 2.0
    per_teacher = [divergence_from_log_probs(logp(t, T), logp(z_s, T), divergence=div) for t in z_t]
    want_kl = torch.stack(per_teacher).mean(0)[mask].mean()
    got_kl = kd_term(z_s, z_t, temperature=T, multi_teacher="mean_kl", divergence=div, mask=mask)
    assert torch.allclose(got_kl.double(), want_kl, atol=1e-5)
    ensemble = torch.softmax(z_t.double() / T, -1).mean(0).log()
    want_probs = divergence_from_log_probs(ensemble, logp(z_s, T), divergence=div)[mask].mean()
    got_probs = kd_term(z_s, z_t, temperature=T, multi_teacher="mean_probs", divergence=div, mask=mask)
    assert torch.allclose(got_probs.double(), want_probs, atol=1e-5)


# ---- (B, C): exactly as before -------------------------------------------------------------------

def _old_distill_loss(logits, teacher_logits, labels, *, temperature, kd_weight, multi_teacher, ce_weight=None):
    """The losses.py of before sequences, verbatim in substance."""
    ce = F.cross_entropy(logits.float(), labels)
    log_p_s = F.log_softmax(logits.float() / temperature, dim=-1)
    if multi_teacher == "mean_kl":
        log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        kd = (log_p_t.exp() * (log_p_t - log_p_s.unsqueeze(0))).sum(-1).mean()
    else:
        p_t = F.softmax(teacher_logits.float() / temperature, dim=-1).mean(0)
        kd = (torch.xlogy(p_t, p_t) - p_t * log_p_s).sum(-1).mean()
    w_ce = 1.0 - kd_weight if ce_weight is None else ce_weight
    return w_ce * ce + kd_weight * temperature**2 * kd, kd


@pytest.mark.parametrize("multi", ["mean_kl", "mean_probs"])
@pytest.mark.parametrize("ce_weight", [None, 1.0])
def test_classifier_inputs_behave_as_before(multi, ce_weight):
    g = torch.Generator().manual_seed(3)
    z_s, z_t, y = torch.randn(16, 10, generator=g), torch.randn(3, 16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    a = z_s.clone().requires_grad_(True)
    b = z_s.clone().requires_grad_(True)
    new, parts = distill_loss(a, z_t, y, temperature=3.0, kd_weight=0.4, multi_teacher=multi, ce_weight=ce_weight)
    old, old_kd = _old_distill_loss(b, z_t, y, temperature=3.0, kd_weight=0.4, multi_teacher=multi, ce_weight=ce_weight)
    assert torch.allclose(new, old, atol=1e-6) and torch.allclose(parts["kd"], old_kd, atol=1e-6)
    new.backward()
    old.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)
    assert parts["tokens"] == 16
