"""hf.causal_lm on a tiny random GPT-2 (nothing downloaded): shapes, padding, sizes, learning."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from online_distill.models import hf  # noqa: E402

V, L = 64, 16


def tiny_config(**kw):
    return transformers.GPT2Config(vocab_size=V, n_positions=L, n_embd=32, n_layer=2, n_head=2,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hf.causal_lm(tiny_config())((L,), V).eval()


def test_logits_are_one_row_per_position(model):
    ids = torch.randint(1, V, (3, L))
    assert model(ids).shape == (3, L, V)
    assert model(ids[:, :5]).shape == (3, 5, V)


def test_padding_does_not_change_the_real_positions(model):
    """Left-aligned sequences: the same tokens with and without padding after them."""
    ids = torch.randint(1, V, (2, 9))
    padded = torch.cat([ids, torch.zeros(2, L - 9, dtype=torch.long)], 1)
    assert torch.allclose(model(padded)[:, :9], model(ids), atol=1e-5)
    # rows of different real lengths in one batch
    mixed = torch.cat([ids[:1, :7], torch.zeros(1, L - 7, dtype=torch.long)], 1)
    assert torch.allclose(model(torch.cat([mixed, padded[1:]]))[0, :7], model(ids[:1, :7])[0], atol=1e-5)


def test_a_vocab_or_length_the_config_cannot_hold_is_refused():
    with pytest.raises(ValueError, match="vocabulary has 64 tokens but the dataset has num_classes=256"):
        hf.causal_lm(tiny_config())((L,), 256)
    with pytest.raises(ValueError, match="sequences of 17 tokens are longer than the model's 16 positions"):
        hf.causal_lm(tiny_config())((L + 1,), V)
    with pytest.raises(ValueError, match="one of them"):
        hf.causal_lm()
    with pytest.raises(ValueError, match=r"shape \(L,\)"):
        hf.causal_lm(tiny_config())((2, L), V)


def test_a_longer_batch_than_the_positions_is_refused_in_forward(model):
    with pytest.raises(ValueError, match="17 tokens is longer than the model's 16 positions"):
        model(torch.ones(1, L + 1, dtype=torch.long))


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(1)
    m = hf.causal_lm(tiny_config())((L,), V)
    ids = torch.tensor([[5, 6, 7, 8] * 4] * 4)
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(m(x).reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
