"""The Hinton KD loss against closed forms and a straightforward reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from online_distill.distill.losses import distill_loss, kd_term, kl_to_student


def reference_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, written out the textbook way."""
    return torch.tensor([sum(pi * math.log(pi / qi) for pi, qi in zip(pr.tolist(), qr.tolist())) for pr, qr in zip(p, q)],
                        dtype=torch.float64)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(3, 8, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (8,), generator=g))


def test_kl_of_a_distribution_to_itself_is_zero(batch):
    z, _, _ = batch
    assert torch.allclose(kl_to_student(z, z, temperature=2.0), torch.zeros(8, dtype=torch.float32), atol=1e-6)


def test_kl_matches_the_textbook_formula(batch):
    z_s, z_t, _ = batch
    T = 3.0
    got = kl_to_student(z_t[0], z_s, T)
    want = reference_kl(F.softmax(z_t[0] / T, 1), F.softmax(z_s / T, 1))
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_kd_weight_zero_is_plain_cross_entropy(batch):
    z_s, z_t, y = batch
    loss, parts = distill_loss(z_s, z_t, y, temperature=4.0, kd_weight=0.0)
    assert torch.allclose(loss.double(), F.cross_entropy(z_s, y), atol=1e-6)
    assert parts["kd"] > 0  # the KD part is still measured for logging


def test_no_teacher_is_plain_cross_entropy(batch):
    z_s, _, y = batch
    loss, parts = distill_loss(z_s, None, y, temperature=4.0, kd_weight=0.7)
    assert torch.allclose(loss.double(), F.cross_entropy(z_s, y), atol=1e-6)
    assert parts["kd"] == 0


def test_mix_is_weighted_with_t_squared(batch):
    z_s, z_t, y = batch
    T, w = 2.5, 0.3
    loss, parts = distill_loss(z_s, z_t[:1], y, temperature=T, kd_weight=w)
    kl = reference_kl(F.softmax(z_t[0] / T, 1), F.softmax(z_s / T, 1)).mean()
    want = (1 - w) * F.cross_entropy(z_s, y) + w * T**2 * kl
    assert torch.allclose(loss.double(), want, atol=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_gradient_matches_closed_form(batch, T):
    """d loss / d z_s = (1-w) (softmax(z_s) - onehot(y)) / B + w T (softmax(z_s/T) - softmax(z_t/T)) / B."""
    z_s, z_t, y = batch
    w, B = 0.6, z_s.shape[0]
    z = z_s.clone().float().requires_grad_(True)
    teacher = z_t[:1].float().clone().requires_grad_(True)
    loss, _ = distill_loss(z, teacher, y, temperature=T, kd_weight=w)
    loss.backward()
    onehot = F.one_hot(y, 5).float()
    want = (1 - w) * (F.softmax(z.detach(), 1) - onehot) / B + w * T * (F.softmax(z.detach() / T, 1) - F.softmax(teacher.detach()[0] / T, 1)) / B
    assert torch.allclose(z.grad, want, atol=1e-6)
    assert teacher.grad is None  # teachers are detached: no gradient reaches them


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_online_form_ce_plus_t2_kl_has_the_closed_form_gradient(batch, T):
    """ce_weight 1, kd_weight 1 (DML, ONE, MCL-OKD): loss = CE + T^2 KL, and
    d loss / d z_s = (softmax(z_s) - onehot(y)) / B + T (softmax(z_s/T) - softmax(z_t/T)) / B."""
    z_s, z_t, y = batch
    B = z_s.shape[0]
    z = z_s.clone().float().requires_grad_(True)
    loss, parts = distill_loss(z, z_t[:1].float(), y, temperature=T, kd_weight=1.0, ce_weight=1.0)
    kl = reference_kl(F.softmax(z_t[0] / T, 1), F.softmax(z_s / T, 1)).mean()
    assert torch.allclose(loss.double(), F.cross_entropy(z_s, y) + T**2 * kl, atol=1e-5)
    loss.backward()
    onehot = F.one_hot(y, 5).float()
    want = (F.softmax(z.detach(), 1) - onehot) / B + T * (F.softmax(z.detach() / T, 1) - F.softmax(z_t[0].float() / T, 1)) / B
    assert torch.allclose(z.grad, want, atol=1e-6)


def test_ce_weight_none_is_the_convex_mix_and_any_weight_can_be_set(batch):
    z_s, z_t, y = batch
    convex, _ = distill_loss(z_s, z_t, y, temperature=2.0, kd_weight=0.3)
    explicit, _ = distill_loss(z_s, z_t, y, temperature=2.0, kd_weight=0.3, ce_weight=0.7)
    assert torch.allclose(convex, explicit)
    only_kd, parts = distill_loss(z_s, z_t, y, temperature=2.0, kd_weight=0.3, ce_weight=0.0)
    assert torch.allclose(only_kd, 0.3 * 4.0 * parts["kd"])


def test_mean_kl_averages_the_teachers(batch):
    z_s, z_t, _ = batch
    T = 2.0
    got = kd_term(z_s, z_t, temperature=T, multi_teacher="mean_kl")
    want = torch.stack([reference_kl(F.softmax(t / T, 1), F.softmax(z_s / T, 1)).mean() for t in z_t]).mean()
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_mean_probs_distils_from_the_ensemble(batch):
    z_s, z_t, _ = batch
    T = 2.0
    got = kd_term(z_s, z_t, temperature=T, multi_teacher="mean_probs")
    p_ens = F.softmax(z_t / T, -1).mean(0)
    want = reference_kl(p_ens, F.softmax(z_s / T, 1)).mean()
    assert torch.allclose(got.double(), want, atol=1e-5)
    # the KL to the mean is never above the mean of the KLs (convexity of KL in its first argument)
    assert got <= kd_term(z_s, z_t, temperature=T, multi_teacher="mean_kl") + 1e-6


def test_one_teacher_same_under_both_reductions(batch):
    z_s, z_t, _ = batch
    a = kd_term(z_s, z_t[:1], temperature=3.0, multi_teacher="mean_kl")
    b = kd_term(z_s, z_t[:1], temperature=3.0, multi_teacher="mean_probs")
    assert torch.allclose(a, b, atol=1e-6)


def test_bad_teacher_shape_and_reduction_are_refused(batch):
    z_s, z_t, _ = batch
    with pytest.raises(ValueError, match="n_teachers"):
        kd_term(z_s, z_t[0], temperature=1.0, multi_teacher="mean_kl")
    with pytest.raises(ValueError, match="multi_teacher"):
        kd_term(z_s, z_t, temperature=1.0, multi_teacher="max")
