"""Sampling continuations from a causal language model: batched, seeded, with a key-value cache.

    out = generate(model, prompts, prompt_lengths, Sampling(max_new_tokens=64, temperature=0.8))

`prompts` (B, P) token ids padded at the right, `prompt_lengths` (B,) the real length of each.
Rows of different lengths decode together as in LLaMA's reference code: decoding starts after
the shortest prompt, and a row whose prompt is longer keeps its own prompt token at each position
until the prompt ends. A row that samples `eos_id` stops there; later positions hold `pad_id`.

- The built-in GPT decodes with a key-value cache (gpt.KVCache): the prompt in one forward pass,
  then one token per pass, each attending to the cached keys and values (O(T) per token instead
  of O(T^2)); benchmarks/onpolicy/kv_cache.py measures the speed-up.
- A Hugging Face causal LM (models.hf.HFCausalLM) decodes through its own `generate`.
- Any other model that maps ids (B, L) to logits (B, L, V) decodes by running the whole prefix
  each token (correct, slow): `reference_generate`, also the reference the tests compare against.

Sampling reads `Sampling`: temperature 0 is greedy; top_k 0 and top_p 1 keep every token. Draws
come from a torch.Generator seeded by `seed`, so the same seed gives the same samples (on one
device type and torch version). The model is run in eval mode without gradients and put back.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .gpt import GPT


@dataclass(frozen=True)
class Sampling:
    """How continuations are drawn."""

    max_new_tokens: int = 64
    """Tokens generated after the prompt at most (fewer where the model has no more positions)."""
    temperature: float = 1.0
    """Softmax temperature of the draws; 0 picks the most likely token (greedy)."""
    top_k: int = 0
    """Draw from the k most likely tokens only; 0: all of them."""
    top_p: float = 1.0
    """Draw from the smallest set of tokens whose probability reaches top_p (nucleus); 1: all."""
    eos_id: int | None = None
    """A token that ends a row's continuation (kept in it); None: rows run to max_new_tokens."""
    pad_id: int = 0
    """What fills a row after it ended, and the padding of the prompts; never drawn."""

    def check(self, prefix: str = "sampling.") -> None:
        """One line naming the field (prefix + its name; prefix "--": a command-line flag) and
        what it may hold."""
        def name(f: str) -> str:
            return prefix + (f.replace("_", "-") if prefix == "--" else f)

        if self.max_new_tokens < 1:
            raise ValueError(f"{name('max_new_tokens')}: got {self.max_new_tokens}; allowed: an integer >= 1")
        if self.temperature < 0:
            raise ValueError(f"{name('temperature')}: got {self.temperature}; allowed: a number >= 0 (0: greedy)")
        if self.top_k < 0:
            raise ValueError(f"{name('top_k')}: got {self.top_k}; allowed: an integer >= 0 (0: every token)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{name('top_p')}: got {self.top_p}; allowed: a number in (0, 1]")


@dataclass
class Generated:
    """Prompts and continuations, (B, P + N) ids padded with pad_id; `lengths` the real length of
    each row (prompt and continuation, eos included); `prompt_lengths` as given."""

    tokens: Tensor
    lengths: Tensor
    prompt_lengths: Tensor

    def continuation(self, i: int) -> Tensor:
        return self.tokens[i, int(self.prompt_lengths[i]): int(self.lengths[i])]


def next_token(logits: Tensor, s: Sampling, generator: torch.Generator | None) -> Tensor:
    """One draw per row from logits (B, V) under s (temperature, top-k, top-p): ids (B,)."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = probs.cumsum(-1) - probs >= s.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _positions(model: nn.Module) -> int | None:
    return getattr(model, "seq_len", None) or getattr(model, "max_positions", None)


@contextlib.contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _setup(model: nn.Module, prompts: Tensor, prompt_lengths: Tensor | None, s: Sampling, seed: int | None):
    s.check()
    if prompts.dim() != 2 or prompts.shape[0] == 0:
        raise ValueError(f"prompts: got shape {tuple(prompts.shape)}; allowed: token ids (B, P) with B >= 1")
    lengths = (torch.full((len(prompts),), prompts.shape[1]) if prompt_lengths is None else prompt_lengths).to(prompts.device)
    if int(lengths.min()) < 1:
        raise ValueError("prompts: every prompt needs at least one token")
    room = _positions(model)
    total = int(lengths.max()) + s.max_new_tokens
    if room is not None:
        total = min(total, int(room))
    if total <= int(lengths.min()):
        raise ValueError(f"prompts of {int(lengths.min())} tokens leave no room to generate in the model's {room} positions")
    tokens = torch.full((len(prompts), total), s.pad_id, dtype=torch.long, device=prompts.device)
    width = min(prompts.shape[1], total)
    tokens[:, :width] = prompts[:, :width]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompts.device)
        generator.manual_seed(seed)
    return tokens, lengths.clamp_max(total), generator


def _decode(tokens: Tensor, lengths: Tensor, s: Sampling, logits_at, generator) -> Generated:
    """The decoding loop shared by the cached and uncached paths: logits_at(pos) gives the
    logits (B, V) that predict position pos."""
    b, total = tokens.shape
    start = int(lengths.min())
    done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
    ends = torch.full((b,), total, dtype=torch.long, device=tokens.device)
    new = torch.zeros(b, dtype=torch.long, device=tokens.device)
    pad = torch.tensor([s.pad_id], device=tokens.device)
    for pos in range(start, total):
        logits = logits_at(pos).index_fill(-1, pad, float("-inf"))  # padding is never a token a row writes
        drawn = next_token(logits, s, generator)
        in_prompt = pos < lengths
        generating = ~in_prompt & ~done
        tok = torch.where(in_prompt, tokens[:, pos], torch.where(done, torch.full_like(drawn, s.pad_id), drawn))
        tokens[:, pos] = tok
        new += generating.long()
        if s.eos_id is not None:
            hit = generating & (drawn == s.eos_id)
            ends = torch.where(hit, torch.full_like(ends, pos + 1), ends)
            done |= hit
        done |= generating & (new >= s.max_new_tokens)
        ends = torch.where(generating & (new >= s.max_new_tokens) & (ends == total), torch.full_like(ends, pos + 1), ends)
        if bool(done.all()):
            break
    tokens[torch.arange(total, device=tokens.device).unsqueeze(0) >= ends.unsqueeze(1)] = s.pad_id
    return Generated(tokens, ends, lengths)


def reference_generate(model: nn.Module, prompts: Tensor, prompt_lengths: Tensor | None = None,
                       s: Sampling = Sampling(), *, seed: int | None = None) -> Generated:
    """Generation without a cache: the whole prefix through the model for every new token.
    Works for any model mapping ids (B, L) to logits (B, L, V)."""
    tokens, lengths, g = _setup(model, prompts, prompt_lengths, s, seed)
    with _eval(model):
        return _decode(tokens, lengths, s, lambda pos: model(tokens[:, :pos])[:, -1].float(), g)


def _gpt_generate(model: GPT, prompts: Tensor, prompt_lengths: Tensor | None, s: Sampling, seed: int | None) -> Generated:
    tokens, lengths, g = _setup(model, prompts, prompt_lengths, s, seed)
    cache = model.new_cache(tokens.shape[1])
    start = int(lengths.min())

    def logits_at(pos: int) -> Tensor:
        if pos == start:  # the shared part of the prompts in one pass
            return model(tokens[:, :start], cache=cache)[:, -1].float()
        return model(tokens[:, pos - 1: pos], cache=cache)[:, -1].float()

    with _eval(model):
        return _decode(tokens, lengths, s, logits_at, g)


def _hf_generate(model: nn.Module, prompts: Tensor, prompt_lengths: Tensor | None, s: Sampling,
                 seed: int | None) -> Generated:
    """Through the Hugging Face model's own generate: prompts left-padded (its convention for
    batched decoding), then put back to the right-padded layout of the other paths."""
    tokens, lengths, _ = _setup(model, prompts, prompt_lengths, s, seed)
    b, p = len(prompts), int(lengths.max())
    left = torch.full((b, p), model.pad_token_id, dtype=torch.long, device=prompts.device)
    mask = torch.zeros(b, p, dtype=torch.long, device=prompts.device)
    for i, n in enumerate(lengths.tolist()):
        left[i, p - n:], mask[i, p - n:] = prompts[i, :n], 1
    room = tokens.shape[1] - p
    kwargs = dict(do_sample=s.temperature > 0, max_new_tokens=room, pad_token_id=model.pad_token_id,
                  eos_token_id=s.eos_id, attention_mask=mask, bad_words_ids=[[model.pad_token_id]])
    if s.temperature > 0:  # top_k 0 switches HF's top-k off (None would take its generation_config's 50)
        kwargs.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    devices = [prompts.device] if prompts.device.type == "cuda" else []
    with _eval(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0 if seed is None else seed)
        out = model.model.generate(left, **kwargs)[:, p:]
    ends = torch.empty(b, dtype=torch.long, device=prompts.device)
    for i, n in enumerate(lengths.tolist()):
        cont = out[i]
        stop = len(cont)
        pads = (cont == model.pad_token_id).nonzero()  # HF pads a row that ended on its own end token
        stop = int(pads[0]) if len(pads) else stop
        if s.eos_id is not None:
            hits = (cont[:stop] == s.eos_id).nonzero()
            stop = int(hits[0]) + 1 if len(hits) else stop
        stop = min(stop, tokens.shape[1] - n)
        tokens[i, n:n + stop] = cont[:stop]
        tokens[i, n + stop:] = s.pad_id
        ends[i] = n + stop
    return Generated(tokens, ends, lengths)


def generate(model: nn.Module, prompts: Tensor, prompt_lengths: Tensor | None = None, s: Sampling = Sampling(), *,
             seed: int | None = None, use_cache: bool = True) -> Generated:
    """Continuations of right-padded prompts (B, P) under s; see the module's docstring.
    use_cache=False decodes a built-in GPT without its key-value cache (for comparison)."""
    model = getattr(model, "module", model)  # a DDP wrapper decodes through the model it wraps
    if isinstance(model, GPT) and use_cache:
        return _gpt_generate(model, prompts, prompt_lengths, s, seed)
    if hasattr(model, "model") and hasattr(model.model, "generate") and hasattr(model, "pad_token_id"):
        return _hf_generate(model, prompts, prompt_lengths, s, seed)
    return reference_generate(model, prompts, prompt_lengths, s, seed=seed)
