"""Compressed teacher targets: top-k is exact at k = V, sampling is unbiased, the wire format is
as small as its formula says, and padding never counts."""
import math

import pytest
import torch
import torch.nn.functional as F

from online_distill.distill import sparse
from online_distill.distill.losses import distill_loss, per_position_kd
from online_distill.distill.sparse import SparseTarget, compress, fold_topk, sparse_kd

DIVS = ["forward_kl", "reverse_kl", "jsd"]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    V = 12
    return 3 * torch.randn(2, 5, V, generator=g), torch.randn(2, 5, V, generator=g)  # teacher, student


def dense(z_t, z_s, T, div, beta=0.5):
    return per_position_kd(z_s, z_t.unsqueeze(0), temperature=T, multi_teacher="mean_kl", divergence=div, jsd_beta=beta)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_topk_with_k_equal_to_vocab_is_the_dense_divergence(logits, div, T):
    z_t, z_s = logits
    target = compress(z_t, temperature=T, kind="topk", k=z_t.shape[-1])
    got = sparse_kd(z_s, target, temperature=T, divergence=div, jsd_beta=0.3)
    assert torch.allclose(got, dense(z_t, z_s, T, div, 0.3), atol=1e-6)


@pytest.mark.parametrize("div", DIVS)
def test_topk_folds_both_sides_into_distributions_and_never_exceeds_dense(logits, div):
    z_t, z_s = logits
    target = compress(z_t, temperature=2.0, kind="topk", k=4)
    log_t, log_s = fold_topk(z_s, target, 2.0)
    assert log_t.shape == log_s.shape == (2, 5, 5)  # k + 1 buckets
    assert torch.allclose(log_t.exp().sum(-1), torch.ones(2, 5), atol=1e-6)
    assert torch.allclose(log_s.exp().sum(-1), torch.ones(2, 5), atol=1e-6)
    # folding is a function of the outcome: a divergence can only go down (data processing)
    assert (sparse_kd(z_s, target, temperature=2.0, divergence=div) <= dense(z_t, z_s, 2.0, div) + 1e-6).all()


def test_topk_keeps_the_largest_and_the_tail_is_implied(logits):
    z_t, _ = logits
    target = compress(z_t, temperature=1.0, kind="topk", k=3)
    logp = F.log_softmax(z_t, -1)
    assert torch.equal(target.logp, logp.topk(3, -1).values) and target.weight is None
    tail = 1 - target.logp.exp().sum(-1)
    assert torch.allclose(tail, logp.exp().sum(-1) - logp.topk(3, -1).values.exp().sum(-1), atol=1e-6)


def test_the_student_tail_is_finite_when_the_topk_hold_almost_all_mass():
    """1 - sum(p) would be 0 (or negative) in float32 here; the logsumexp of the other logits is not."""
    z_s = torch.tensor([[40.0, 39.0, 0.0, -1.0]])
    target = compress(torch.tensor([[5.0, 4.0, 0.0, 0.0]]), temperature=1.0, kind="topk", k=2)
    log_t, log_s = fold_topk(z_s, target, 1.0)
    assert torch.isfinite(log_s).all() and log_s[0, 2].item() == pytest.approx(math.log(1 + math.exp(-1)) - 40.3133, abs=1e-3)
    for div in DIVS:
        assert torch.isfinite(sparse_kd(z_s, target, temperature=1.0, divergence=div)).all()


def test_sampled_merges_duplicates_and_pads_with_zero_weight():
    g = torch.Generator().manual_seed(1)
    z_t = torch.tensor([[4.0, 0.0, 0.0, -2.0, 1.0]]).repeat(50, 1)
    t = compress(z_t, temperature=1.0, kind="sampled", k=8, generator=g)
    assert t.ids.shape == t.logp.shape == t.weight.shape == (50, 8)
    assert torch.allclose(t.weight.sum(-1), torch.ones(50))
    filled = t.weight > 0
    assert (~filled).any()  # five ids, eight draws: every row has padding
    for row in range(50):
        ids = t.ids[row][filled[row]]
        assert len(set(ids.tolist())) == len(ids)  # unique
        assert torch.allclose(t.logp[row][filled[row]], F.log_softmax(z_t[row], -1)[ids])
    assert (t.ids[~filled] == 0).all() and (t.logp[~filled] == 0).all()
    assert torch.allclose(t.weight * 8, (t.weight * 8).round())  # count / k


def test_padding_slots_do_not_change_the_sampled_estimate(logits):
    z_t, z_s = logits
    t = compress(z_t, temperature=2.0, kind="sampled", k=32, generator=torch.Generator().manual_seed(2))
    base = sparse_kd(z_s, t, temperature=2.0, divergence="forward_kl")
    pad = t.weight == 0
    assert pad.any()
    junk = SparseTarget("sampled", torch.where(pad, torch.full_like(t.ids, 7), t.ids),
                        torch.where(pad, torch.full_like(t.logp, -1e30), t.logp), t.weight, t.vocab, t.temperature)
    assert torch.equal(sparse_kd(z_s, junk, temperature=2.0, divergence="forward_kl"), base)
    # the same sum written over the unique ids alone
    log_s = F.log_softmax(z_s / 2.0, -1)
    want = torch.stack([sum(w * (lt - log_s[b, l, i]) for i, lt, w in zip(t.ids[b, l], t.logp[b, l], t.weight[b, l]) if w > 0)
                        for b in range(2) for l in range(5)]).view(2, 5)
    assert torch.allclose(base, want, atol=1e-6)


def test_sampled_forward_kl_estimate_is_unbiased():
    """The mean of many independent seeded estimates is the dense forward KL (within 4 standard errors)."""
    g = torch.Generator().manual_seed(3)
    V, n, T = 20, 4000, 1.5
    z_t, z_s = 2 * torch.randn(1, V, generator=g), torch.randn(1, V, generator=g)
    t = compress(z_t.repeat(n, 1), temperature=T, kind="sampled", k=4, generator=g)  # n independent draws of k
    est = sparse_kd(z_s.repeat(n, 1), t, temperature=T, divergence="forward_kl").double()
    want = dense(z_t, z_s, T, "forward_kl").double().item()
    se = est.std().item() / math.sqrt(n)
    assert abs(est.mean().item() - want) < 4 * se, (est.mean().item(), want, se)
    assert se < 0.05 * want  # the check has teeth: top-4 folding would be off by more
    assert abs(sparse_kd(z_s, compress(z_t, temperature=T, kind="topk", k=4), temperature=T,
                         divergence="forward_kl").item() - want) > 4 * se


def test_sampled_targets_support_forward_kl_only(logits):
    z_t, z_s = logits
    t = compress(z_t, temperature=1.0, kind="sampled", k=4, generator=torch.Generator().manual_seed(0))
    for div in ("reverse_kl", "jsd"):
        with pytest.raises(ValueError, match="loss.divergence.*sampled targets support forward_kl only"):
            sparse_kd(z_s, t, temperature=1.0, divergence=div)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_gradients_reach_only_the_student(logits, kind):
    z_t, z_s = logits
    teacher = z_t.clone().requires_grad_(True)
    student = z_s.clone().requires_grad_(True)
    t = compress(teacher, temperature=2.0, kind=kind, k=5, generator=torch.Generator().manual_seed(0))
    assert not t.logp.requires_grad
    sparse_kd(student, t, temperature=2.0, divergence="forward_kl").sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_mismatched_vocab_positions_or_temperature_are_refused(logits):
    z_t, z_s = logits
    t = compress(z_t, temperature=2.0, kind="topk", k=3)
    with pytest.raises(ValueError, match="vocab"):
        sparse_kd(z_s[..., :10], t, temperature=2.0, divergence="forward_kl")
    with pytest.raises(ValueError, match="positions"):
        sparse_kd(z_s[:1], t, temperature=2.0, divergence="forward_kl")
    with pytest.raises(ValueError, match="temperature"):
        sparse_kd(z_s, t, temperature=1.0, divergence="forward_kl")
    with pytest.raises(ValueError, match="kind"):
        compress(z_t, temperature=1.0, kind="top", k=3)
    with pytest.raises(ValueError, match="k: got 13"):
        compress(z_t, temperature=1.0, kind="topk", k=13)


# ---- wire format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,dtype", [(256, torch.uint8), (257, torch.int16), (32768, torch.int16),
                                         (32769, torch.int32)])
@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_wire_round_trip_and_bytes_formula(vocab, dtype, kind):
    g = torch.Generator().manual_seed(4)
    z = 3 * torch.randn(2, 3, vocab, generator=g)
    z[..., vocab - 1] = 30.0  # the largest id is in every target: it must survive the small dtype
    t = compress(z, temperature=1.0, kind=kind, k=6, generator=g)
    wire = sparse.to_wire(t)
    assert wire["ids"].dtype == dtype and wire["logp"].dtype == torch.float16
    back = sparse.from_wire(wire)
    assert back.kind == kind and back.vocab == vocab and back.temperature == 1.0
    assert torch.equal(back.ids, t.ids) and (back.ids == vocab - 1).any()
    assert torch.allclose(back.logp, t.logp, atol=1e-2, rtol=1e-3)
    if kind == "sampled":
        assert wire["counts"].dtype == torch.uint8 and torch.equal(back.weight, t.weight)
    assert sparse.nbytes(wire) == sparse.bytes_per_token(kind, 6, vocab) * 6
    assert sparse.bytes_per_token(kind, 6, vocab) < sparse.dense_bytes_per_token(vocab)


def test_bytes_per_token_formula():
    assert sparse.bytes_per_token("topk", 8, 256) == 8 * (1 + 2)
    assert sparse.bytes_per_token("sampled", 8, 256) == 8 * (1 + 2 + 1)
    assert sparse.bytes_per_token("topk", 20, 50_257) == 20 * (4 + 2)
    assert sparse.bytes_per_token("sampled", 300, 32_000) == 300 * (2 + 2 + 2)
    assert sparse.dense_bytes_per_token(50_257) == 201_028


def test_eight_bit_log_probs_on_their_grid():
    """Codes are 255 sqrt(-logp / 16): the ends exact, the middle on the closed form, monotone,
    and the error at most half a step, finest near 0 where the big probabilities are."""
    lp = torch.tensor([0.0, -0.105360516, -4.0, -16.0, -40.0])  # p = 1, 0.9, e^-4, e^-16, below the range
    q = sparse.quantize_logp(lp)
    assert q.dtype == torch.uint8 and q.tolist() == [0, 21, 128, 255, 255]
    back = sparse.dequantize_logp(q)
    assert back[0] == 0.0 and back[3] == -16.0 and back[4] == -16.0
    assert math.isclose(back[2].item(), -16 * (128 / 255) ** 2, rel_tol=1e-6)
    grid = torch.linspace(-16, 0, 10_001)
    err = (sparse.dequantize_logp(sparse.quantize_logp(grid)) - grid).abs()
    half_step = math.sqrt(16 * grid.abs().max().item()) / 255 + 1e-6  # d(logp)/dq / 2 at the far end
    assert err.max() <= half_step
    p = torch.tensor([0.9, 0.5])
    assert ((sparse.dequantize_logp(sparse.quantize_logp(p.log())).exp() / p - 1).abs() < 0.011).all()
    assert torch.equal(sparse.quantize_logp(grid).diff().clamp(max=0), torch.zeros(10_000, dtype=torch.uint8))


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_an_eight_bit_target_is_what_its_wire_carries(kind):
    g = torch.Generator().manual_seed(5)
    z = 3 * torch.randn(2, 3, 256, generator=g)
    t = compress(z, temperature=2.0, kind=kind, k=10, generator=g, bits=8)
    wire = sparse.to_wire(t)
    assert wire["logp"].dtype == torch.uint8 and t.bits == 8
    back = sparse.from_wire(wire)
    assert back.bits == 8 and torch.equal(back.ids, t.ids) and torch.equal(back.logp, t.logp)  # exact: already on the grid
    assert sparse.nbytes(wire) == sparse.bytes_per_token(kind, 10, 256, bits=8) * 6
    full = compress(z, temperature=2.0, kind=kind, k=10, generator=torch.Generator().manual_seed(5), bits=16)
    if kind == "topk":
        err = (t.logp - full.logp).abs()  # half a step; the top token's p is 1 - tail - the others
        assert torch.equal(full.ids, t.ids) and (err[..., 1:] <= 0.06).all() and (err[..., 0] <= 0.15).all()
        s = torch.randn(2, 3, 256, generator=g)
        a = sparse_kd(s, t, temperature=2.0, divergence="forward_kl")
        b = sparse_kd(s, full, temperature=2.0, divergence="forward_kl")
        assert torch.allclose(a, b, rtol=0.05, atol=0.02)
    with pytest.raises(ValueError, match="bits: got 4; allowed: 16"):
        compress(z, temperature=2.0, kind=kind, k=10, bits=4)


@pytest.mark.parametrize("top", [0.5, 0.99, 0.9999])
def test_eight_bit_top_k_keeps_the_tail_mass_even_when_one_token_holds_almost_all(top):
    """The tail is the bucket the student's tail is matched to: stored in its own slot it keeps
    its relative precision (3% at most), where rounding the top token's log-prob would lose it."""
    V, k = 256, 10
    p = torch.full((V,), (1 - top) / (V - 1))
    p[7] = top
    z = p.log().expand(4, V)
    t = compress(z, temperature=1.0, kind="topk", k=k, bits=8)
    assert t.ids[0, 0] == 7
    kept = t.logp.double().exp().sum(-1)
    tail_true = (V - k) * (1 - top) / (V - 1)
    assert ((1 - kept) / tail_true - 1).abs().max() < 0.03
    back = sparse.from_wire(sparse.to_wire(t))
    assert torch.equal(back.logp, t.logp) and torch.equal(back.codes, t.codes)


def test_eight_bit_top_10_of_a_byte_vocabulary_fits_in_two_percent_of_dense():
    assert sparse.bytes_per_token("topk", 10, 256, bits=8) == 10 * (1 + 1) == 20
    assert 20 / sparse.dense_bytes_per_token(256) < 0.02
    assert sparse.bytes_per_token("sampled", 10, 256, bits=8) == 10 * (1 + 1 + 1)
    assert sparse.bytes_per_token("topk", 32, 50_257, bits=8) == 32 * (4 + 1)


def test_a_target_read_back_from_the_wire_gives_nearly_the_same_loss(logits):
    z_t, z_s = logits
    t = compress(z_t, temperature=2.0, kind="topk", k=4)
    a = sparse_kd(z_s, t, temperature=2.0, divergence="reverse_kl")
    b = sparse_kd(z_s, sparse.from_wire(sparse.to_wire(t)), temperature=2.0, divergence="reverse_kl")
    assert torch.allclose(a, b, atol=1e-2)


# ---- reconstruction and fidelity ---------------------------------------------------------------------

def test_reconstruct_spreads_the_tail_uniformly(logits):
    z_t, _ = logits
    t = compress(z_t, temperature=1.0, kind="topk", k=4)
    rec = sparse.reconstruct(t)
    assert rec.shape == z_t.shape and torch.allclose(rec.exp().sum(-1), torch.ones(2, 5), atol=1e-6)
    assert torch.allclose(rec.gather(-1, t.ids), t.logp, atol=1e-6)
    others = rec.scatter(-1, t.ids, float("nan"))
    vals = others[~others.isnan()].view(2, 5, 8)
    assert torch.allclose(vals, vals[..., :1].expand_as(vals))
    full = sparse.reconstruct(compress(z_t, temperature=1.0, kind="topk", k=12))
    assert torch.allclose(full, F.log_softmax(z_t, -1), atol=1e-6)
    with pytest.raises(ValueError, match="topk"):
        sparse.reconstruct(compress(z_t, temperature=1.0, kind="sampled", k=4))


def test_fidelity_reports_what_compression_loses(logits):
    z_t, z_s = logits
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    exact = sparse.fidelity(z_t, z_s, compress(z_t, temperature=2.0, kind="topk", k=12), temperature=2.0,
                            divergence="forward_kl", mask=mask)
    assert exact["kl_dense_to_reconstructed"] == pytest.approx(0, abs=1e-6) and exact["kd_rel_error"] < 1e-5
    lossy = sparse.fidelity(z_t, z_s, compress(z_t, temperature=2.0, kind="topk", k=2), temperature=2.0,
                            divergence="jsd", mask=mask)
    assert lossy["kl_dense_to_reconstructed"] > 0 and lossy["kd_sparse"] <= lossy["kd_dense"]
    assert lossy["kd_rel_error"] == pytest.approx(abs(lossy["kd_sparse"] - lossy["kd_dense"]) / lossy["kd_dense"])
    sampled = sparse.fidelity(z_t, z_s, compress(z_t, temperature=2.0, kind="sampled", k=8), temperature=2.0,
                              divergence="forward_kl")
    assert math.isnan(sampled["kl_dense_to_reconstructed"]) and sampled["kd_dense"] > 0


# ---- through distill_loss ------------------------------------------------------------------------------

def test_distill_loss_takes_sparse_targets(logits):
    z_t, z_s = logits
    y = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(5))
    y[1, 2:] = -100
    kw = dict(temperature=2.0, kd_weight=0.5, divergence="reverse_kl")
    dense_loss, _ = distill_loss(z_s, z_t.unsqueeze(0), y, **kw)
    one, _ = distill_loss(z_s, compress(z_t, temperature=2.0, kind="topk", k=12), y, **kw)
    assert torch.allclose(one, dense_loss, atol=1e-6)
    two_dense = torch.stack([z_t, z_t.flip(-1)])
    targets = [compress(t, temperature=2.0, kind="topk", k=12) for t in two_dense]
    listed, _ = distill_loss(z_s, sparse.SparseTeachers(targets), y, **kw)
    stacked, _ = distill_loss(z_s, compress(two_dense, temperature=2.0, kind="topk", k=12), y, **kw)
    assert torch.allclose(listed, distill_loss(z_s, two_dense, y, **kw)[0], atol=1e-6)
    assert torch.allclose(listed, stacked, atol=1e-6)
    with pytest.raises(ValueError, match="mean_probs"):
        distill_loss(z_s, sparse.SparseTeachers(targets), y, multi_teacher="mean_probs", **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the same code on CUDA tensors")
def test_on_cuda_tensors():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    z_t, z_s = torch.randn(2, 5, 300, device=dev), torch.randn(2, 5, 300, device=dev, requires_grad=True)
    y = torch.randint(0, 300, (2, 5), device=dev)
    y[0, 3:] = -100
    for kind in ("topk", "sampled"):
        t = compress(z_t, temperature=2.0, kind=kind, k=8, generator=g)
        back = sparse.from_wire({k: v.cpu() if torch.is_tensor(v) else v for k, v in sparse.to_wire(t).items()})
        loss, parts = distill_loss(z_s, back, y, temperature=2.0, kd_weight=0.5)  # a CPU target, CUDA logits
        loss.backward()
        assert loss.device.type == "cuda" and torch.isfinite(z_s.grad).all() and parts["tokens"].item() == 8
    dense_loss, _ = distill_loss(z_s, z_t.unsqueeze(0), y, temperature=2.0, kd_weight=0.5, divergence="jsd")
    assert torch.isfinite(dense_loss)
