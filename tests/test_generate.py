"""Generation (models/generate.py): the key-value cache decodes exactly what the whole prefix
does, token for token; the same seed draws the same samples; rows of different prompt lengths,
an end token and padding are handled; a Hugging Face causal LM decodes through its generate;
`online-distill generate` prints what a trained run's student writes."""
from __future__ import annotations

import pytest
import torch

from online_distill.models.generate import Sampling, generate, next_token, reference_generate
from online_distill.models.gpt import GPT


def tiny(seq_len: int = 32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab=50, seq_len=seq_len, dim=16, layers=2, heads=2)


def ragged_prompts(b: int = 5, width: int = 7):
    g = torch.Generator().manual_seed(1)
    p = torch.randint(1, 50, (b, width), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6][:b])
    p[torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return p, lengths


def test_the_cache_gives_the_logits_of_the_whole_prefix():
    m = tiny().eval()
    x = torch.randint(1, 50, (3, 12))
    full = m(x)
    cache = m.new_cache()
    steps = [m(x[:, :5], cache=cache)] + [m(x[:, t: t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_with_the_cache_equals_the_reference_loop_token_for_token():
    m = tiny()
    p, lengths = ragged_prompts()
    s = Sampling(max_new_tokens=15, temperature=0)
    a, b = generate(m, p, lengths, s), reference_generate(m, p, lengths, s)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.lengths, lengths + 15)  # every row its own 15 new tokens
    for i in range(len(p)):  # prompts kept as they were; padding after each row's end
        assert torch.equal(a.tokens[i, : lengths[i]], p[i, : lengths[i]])
        assert (a.tokens[i, a.lengths[i]:] == 0).all()
    assert m.training  # put back in the mode it came in


def test_the_same_seed_draws_the_same_samples_and_another_seed_others():
    m = tiny()
    p, lengths = ragged_prompts()
    s = Sampling(max_new_tokens=15, temperature=1.0, top_k=20, top_p=0.95)
    a, b, c = (generate(m, p, lengths, s, seed=k) for k in (3, 3, 4))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert torch.equal(a.tokens, reference_generate(m, p, lengths, s, seed=3).tokens)


def test_an_end_token_stops_its_row_and_the_model_never_overruns_its_positions():
    m = tiny(seq_len=16)
    p, lengths = ragged_prompts()
    greedy = generate(m, p, lengths, Sampling(max_new_tokens=40, temperature=0))
    assert greedy.tokens.shape[1] == 16 and (greedy.lengths == 16).all()  # capped by the 16 positions
    eos = int(greedy.tokens[0, 7])  # row 0's first new token: make it the end
    out = generate(m, p, lengths, Sampling(max_new_tokens=40, temperature=0, eos_id=eos))
    assert int(out.lengths[0]) == 8 and (out.tokens[0, 8:] == 0).all()
    for i in range(len(p)):
        cont = out.continuation(i)
        assert (cont[:-1] != eos).all()  # a row ends at its first end token
    with pytest.raises(ValueError, match="sampling.top_p"):
        generate(m, p, lengths, Sampling(top_p=0))


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]] * 2000)
    g = torch.Generator().manual_seed(0)
    assert (next_token(logits, Sampling(temperature=1.0, top_k=1), g) == 0).all()
    p = logits[0].softmax(-1)  # 0.61, 0.22, 0.14, 0.03: top_p 0.7 keeps the first two
    drawn = next_token(logits, Sampling(temperature=1.0, top_p=0.7), g)
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - float(p[0] / p[:2].sum())) < 0.05


def test_a_hugging_face_causal_lm_decodes_through_its_generate():
    transformers = pytest.importorskip("transformers")
    from online_distill.models.hf import causal_lm

    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    m = causal_lm(cfg)((32,), 50)
    p, lengths = ragged_prompts()
    s = Sampling(max_new_tokens=10, temperature=0)
    a, b = generate(m, p, lengths, s), reference_generate(m, p, lengths, s)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.tokens, b.tokens)


def test_the_padding_id_is_never_drawn():
    """A byte GPT's padding row scores 0 for every state (a zero embedding, tied head): here it is
    made the most likely token, and still no row writes it."""
    m = tiny()
    with torch.no_grad():
        m.head.weight[0] = 10 * m.ln_f.weight.sign()  # id 0 now dominates (the head is tied: tok[0] too)
    p, lengths = ragged_prompts()
    for s in (Sampling(max_new_tokens=10, temperature=0), Sampling(max_new_tokens=10, temperature=1.0)):
        out = generate(m, p, lengths, s, seed=0)
        assert all((out.continuation(i) != 0).all() for i in range(len(p)))
