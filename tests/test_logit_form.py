"""The teacher's output as one type (distill.form.LogitForm): the only reader of distill.logits*,
one digest and one seed rule for sampled targets, one wire format for every form, and the loss
reading every form through one call."""
from __future__ import annotations

import ast
import math
import os

import pytest
import torch

import online_distill
from online_distill.config import schema as C
from online_distill.distill import sparse
from online_distill.distill.form import LogitForm, example_digests
from online_distill.distill.losses import DenseTarget, distill_loss, per_position_kd

PKG = os.path.dirname(online_distill.__file__)


def sampled(k: int = 6, T: float = 2.0) -> LogitForm:
    return LogitForm("sampled", k, 16, T)


def batch(n: int = 12, L: int = 5, V: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, L), generator=g)
    return x, torch.randn(n, L, V, generator=g) * 2


def test_a_sampled_example_draws_the_same_in_any_batch_order_or_split():
    form = sampled()
    x, z = batch()
    whole = form.output(z, x=x, teacher=3)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    shuffled = form.output(z[perm], x=x[perm], teacher=3)
    halves = [form.output(z[:5], x=x[:5], teacher=3), form.output(z[5:], x=x[5:], teacher=3)]
    assert torch.equal(shuffled.ids, whole.ids[perm]) and torch.equal(shuffled.weight, whole.weight[perm])
    assert torch.equal(torch.cat([h.ids for h in halves]), whole.ids)
    by_digest = form.output(z, digests=example_digests(x), teacher=3)  # a cache has digests, not examples
    assert torch.equal(by_digest.ids, whole.ids) and torch.equal(by_digest.logp, whole.logp)


def test_draws_differ_between_teachers_and_between_examples():
    form = sampled(k=16)
    x, z = batch(n=2)
    z = z[:1].expand(2, -1, -1).clone()  # the same distribution for two different examples
    a, b = form.output(z, x=x, teacher=0), form.output(z, x=x, teacher=1)
    assert not torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids[0], a.ids[1])


def test_keyed_uniforms_are_uniform_and_the_draws_follow_the_teacher():
    u = sparse.keyed_uniforms(torch.arange(2000, dtype=torch.int64), 4, 8).flatten()
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / len(u)
    assert (hist - 0.1).abs().max() < 0.01
    # draws from one fixed distribution over many examples: each id's frequency is its probability
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]), 0)
    n, k = 4000, 4
    t = sampled(k=k, T=1.0).output(p.log().expand(n, -1), digests=[i.to_bytes(8, "little") for i in range(n)],
                                   teacher=0)
    freq = torch.zeros(6).index_add_(0, t.ids.flatten(), t.weight.flatten()) / n
    sigma = (p * (1 - p) / (n * k)).sqrt()
    assert ((freq - p).abs() < 4 * sigma + 1e-4).all(), (freq, p)


def test_the_sampled_forward_kl_is_unbiased_against_the_dense_value():
    n, V, T = 3000, 12, 2.0
    g = torch.Generator().manual_seed(4)
    z_t, z_s = torch.randn(1, V, generator=g).expand(n, -1), torch.randn(1, V, generator=g).expand(n, -1)
    t = sampled(k=4, T=T).output(z_t, digests=[i.to_bytes(8, "little") for i in range(n)], teacher=0)
    est = sparse.sparse_kd(z_s, t, temperature=T, divergence="forward_kl")
    exact = per_position_kd(z_s[:1], z_t[:1].unsqueeze(0), temperature=T, multi_teacher="mean_kl").item()
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / math.sqrt(n)


@pytest.mark.parametrize("form", [LogitForm("dense"), LogitForm("topk", 5, 16, 2.0), LogitForm("topk", 5, 8, 2.0),
                                  sampled(k=5)], ids=["dense", "topk16", "topk8", "sampled"])
def test_every_form_goes_over_the_wire_and_into_a_cache_and_back_as_the_same_numbers(form):
    x, z = batch()
    out = form.output(z, x=x, teacher=1)
    back = form.from_wire(form.to_wire(out))
    stacked = form.stack(form.entries(out), "cpu")
    z_s = torch.randn_like(z)
    y = torch.randint(0, z.shape[-1], z.shape[:-1])
    losses = [distill_loss(z_s, form.target([o, o]), y, temperature=2.0, kd_weight=0.5)[0] for o in (out, back, stacked)]
    assert losses[1] == losses[2]  # exchanged and cached: the same wire, bit for bit
    # made here: the same, except 16-bit log-probs, which the wire rounds to float16 (8-bit ones are
    # rounded where they are made; dense logits travel as float32)
    assert torch.allclose(losses[0], losses[1], rtol=1e-3)
    assert losses[0] == losses[1] or (not form.dense and form.bits == 16)
    assert form.nbytes(form.to_wire(out)) == z.shape[0] * z.shape[1] * form.bytes_per_token(z.shape[-1])


def test_the_loss_reads_dense_and_compressed_targets_through_one_call():
    x, z = batch(V=12)
    y = torch.randint(0, 12, z.shape[:-1])
    z_s = torch.randn_like(z)
    dense = distill_loss(z_s, z.unsqueeze(0), y, temperature=2.0, kd_weight=0.5)[0]
    assert distill_loss(z_s, DenseTarget(z.unsqueeze(0)), y, temperature=2.0, kd_weight=0.5)[0] == dense
    full_topk = LogitForm("topk", 12, 16, 2.0).target_of(z.unsqueeze(0), x=x, teachers=[0])  # k = V: lossless
    assert torch.allclose(distill_loss(z_s, full_topk, y, temperature=2.0, kd_weight=0.5)[0], dense, atol=1e-5)


def test_the_cache_key_and_the_message_read_the_form():
    cfg = C.from_dict({"models": ["mlp"], "distill": {"mode": "offline", "logits": "topk", "logits_k": 10,
                                                      "logits_bits": 8}, "loss": {"temperature": 2.0}})
    form = LogitForm.of(cfg)
    # the dict teacher caches were always filed under (so existing caches stay valid)
    assert form.key() == {"form": "topk", "k": 10, "bits": 8, "T": 2.0}
    assert LogitForm.of(C.from_dict({"models": ["mlp"]})).key() == {"form": "dense", "k": 8, "T": None}
    assert form.describe() == "topk, k 10, 8-bit, T 2"
    with pytest.raises(ValueError, match="needs the batch"):
        sampled().output(torch.randn(2, 5), teacher=0)


def _reads_logit_fields(path: str) -> bool:
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Attribute):
            if node.attr in ("logits_k", "logits_bits"):
                return True
            inner = node.value
            if node.attr == "logits" and ((isinstance(inner, ast.Attribute) and inner.attr == "distill")
                                          or (isinstance(inner, ast.Name) and inner.id in ("d", "distill"))):
                return True
    return False


def test_the_logit_form_fields_are_read_in_few_files():
    readers = sorted(os.path.relpath(os.path.join(dp, f), PKG) for dp, _, files in os.walk(PKG) for f in files
                     if f.endswith(".py") and _reads_logit_fields(os.path.join(dp, f)))
    assert readers == ["config/schema.py", "distill/form.py"], readers  # the field's definition, and its one reader
    assert _reads_logit_fields(os.path.join(PKG, "distill", "form.py"))  # the finder finds a reader
