"""`online-distill generate RUN --prompt TEXT`: continuations from a run's trained language model,
so a person can read what a student writes.

Text is read as the run's data reads it: UTF-8 bytes for a byte-level corpus (vocabulary 256,
bytes of text per token 1; id 0 is padding and never occurs in text). The peer's weights come
from the run's newest checkpoint (export.load_trained); decoding is models.generate's.
"""
from __future__ import annotations

import torch

from ..config.schema import ConfigError
from ..data.datasets import BYTE_VOCAB
from ..data.text import decode_text, encode_text
from ..models.generate import Sampling, generate


def continuations(model, prompts: list[str], sampling: Sampling, *, seed: int = 0, num: int = 1,
                  device: torch.device | str = "cpu") -> list[list[str]]:
    """For each prompt, `num` sampled continuations (text after the prompt)."""
    rows = [encode_text(p) for p in prompts for _ in range(num)]
    if any(len(r) == 0 for r in rows):
        raise ConfigError("--prompt: got an empty prompt; allowed: text of at least one character", "--prompt")
    lengths = torch.tensor([len(r) for r in rows])
    padded = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    out = generate(model.to(device), padded.to(device), lengths.to(device), sampling, seed=seed)
    texts = [decode_text(out.continuation(i).cpu()) for i in range(len(rows))]
    return [texts[i * num:(i + 1) * num] for i in range(len(prompts))]


def generate_from_run(run_dir: str, prompts: list[str], sampling: Sampling, *, peer: int = 0, seed: int = 0,
                      num: int = 1) -> list[list[str]]:
    """Continuations of each prompt by peer `peer` of the run in run_dir (its newest checkpoint)."""
    from .export import load_trained

    try:
        sampling.check("--")
    except ValueError as e:
        raise ConfigError(str(e), "generate") from None
    cfg, _, model, data = load_trained(run_dir, peer)
    if not data.is_sequence or data.num_classes != BYTE_VOCAB or data.bytes_per_token != 1.0:
        raise ConfigError(f"RUN_DIR: {run_dir!r} trained on {cfg.data.dataset!r}, which is not byte-level text "
                          f"(vocabulary {data.num_classes}); allowed: a language-model run on byte-level text "
                          "(e.g. data.dataset: fortunes)", "RUN_DIR")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return continuations(model, prompts, sampling, seed=seed, num=num, device=device)
