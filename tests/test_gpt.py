"""The small GPT: causal, the right shapes, clear refusals, and it learns."""
import pytest
import torch
import torch.nn.functional as F

from online_distill.models import gpt, builders as models


def tiny(seq_len=16, vocab=32):
    torch.manual_seed(0)
    return gpt.GPT(vocab, seq_len, dim=32, layers=2, heads=4)


def test_logits_have_one_row_per_position_and_the_head_is_tied():
    m = tiny()
    ids = torch.randint(1, 32, (3, 16))
    assert m(ids).shape == (3, 16, 32)
    assert m(ids[:, :5]).shape == (3, 5, 32)  # shorter than the positions is fine
    assert m.head.weight is m.tok.weight
    assert torch.equal(m.tok.weight[0], torch.zeros(32))  # the padding id embeds to zero


def test_changing_token_t_does_not_change_the_logits_before_t():
    m = tiny().eval()
    ids = torch.randint(1, 32, (2, 16))
    base = m(ids)
    for t in (0, 7, 15):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] % 31) + 1
        out = m(changed)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])


def test_right_padding_does_not_change_the_real_positions():
    m = tiny().eval()
    ids = torch.randint(1, 32, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], 1)
    assert torch.allclose(m(padded)[:, :10], m(ids), atol=1e-6)


def test_too_long_a_sequence_or_too_large_an_id_is_refused():
    m = tiny(seq_len=16, vocab=32)
    with pytest.raises(ValueError, match="sequence of 17 tokens is longer than the model's 16 positions"):
        m(torch.ones(1, 17, dtype=torch.long))
    bad = torch.ones(1, 4, dtype=torch.long)
    bad[0, 2] = 32
    with pytest.raises(ValueError, match="up to 32.*vocabulary has 32 ids"):
        m(bad)
    with pytest.raises(ValueError, match="multiple of heads"):
        gpt.GPT(32, 16, dim=30, layers=1, heads=4)
    with pytest.raises(ValueError, match=r"shape \(L,\)"):
        gpt.gpt_tiny((1, 16), 32)


def test_a_few_steps_learn_a_repeated_string():
    m = tiny(seq_len=32, vocab=128)
    text = b"abcabdabcabdabcabdabcabdabcabdabc"
    ids = torch.tensor(list(text)).unsqueeze(0).repeat(4, 1)
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(m(x).reshape(-1, 128), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("name", ["gpt", "gpt_tiny", "gpt_small", "gpt_medium"])
def test_builders_are_registered_and_take_the_framework_signature(name):
    m = models.MODELS[name]((128,), 256)
    assert isinstance(m, gpt.GPT) and m.seq_len == 128 and m.vocab == 256
    with torch.no_grad():
        assert m(torch.randint(0, 256, (2, 128))).shape == (2, 128, 256)


def test_sizes_grow_from_student_to_teacher():
    n = {k: models.num_parameters(getattr(gpt, k)((128,), 256)) for k in gpt.GPT_SIZES}
    assert n["gpt_tiny"] < n["gpt_small"] < n["gpt_medium"]
    assert gpt.gpt((8,), 16, dim=16, layers=1, heads=2, dropout=0.1).blocks[0].attn.dropout == 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the same model on CUDA")
def test_on_cuda():
    m = gpt.gpt_tiny((128,), 256).cuda()
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    assert m(ids).shape == (2, 128, 256)
    with pytest.raises(ValueError, match="vocabulary"):
        m(torch.full((1, 4), 256, device="cuda"))
