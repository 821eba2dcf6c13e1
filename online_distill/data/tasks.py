"""Built-in generated text tasks (data.addition wraps them as a dataset) whose answers are several tokens and exactly checkable, for
measuring what a language model gets right when it decodes on its own (on-policy distillation's
exposure bias: benchmarks/onpolicy). Nothing is downloaded.

"addition": three-digit addition written as bytes, one problem per window,
    "123+045=0168\\n"  (13 bytes: a prompt of 8, an answer of 4 digits and a newline)
so a window of data.seq_len 12 (13 bytes) holds exactly one problem. Problems are drawn once
from a fixed generator (not the run's seed: every run sees the same task), distinct, and a
problem is a test problem when crc32 of its text % 10 == 0 (no problem is in both splits).
"""
from __future__ import annotations

import functools
import zlib

import torch

ADDITION_PROMPT = 8
"""Bytes of an addition problem before its answer ("123+045=")."""
ADDITION_LEN = 13
"""Bytes of a whole problem, newline included: windows of data.seq_len 12."""


def addition_text(a: int, b: int) -> str:
    return f"{a:03d}+{b:03d}={a + b:04d}\n"


@functools.lru_cache(maxsize=2)
def addition_problems(n: int = 60_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) problems as (N, 13) uint8 byte windows."""
    g = torch.Generator().manual_seed(20240101)
    pairs = torch.randint(0, 1000, (2 * n, 2), generator=g).tolist()
    seen, train, test = set(), [], []
    for a, b in pairs:
        if (a, b) in seen:
            continue
        seen.add((a, b))
        text = addition_text(a, b).encode()
        (test if zlib.crc32(text) % 10 == 0 else train).append(list(text))
        if len(seen) == n:
            break
    return torch.tensor(train, dtype=torch.uint8), torch.tensor(test, dtype=torch.uint8)


def answers_correct(tokens: torch.Tensor, problems: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the generated rows (prompt + answer ids) hold each problem's 4-digit answer
    exactly. (The newline after it is the 13th byte: a model of 12 positions predicts it but
    cannot append it.)"""
    end = ADDITION_PROMPT + 4
    if tokens.shape[1] < end:
        return torch.zeros(len(tokens), dtype=torch.bool)
    return (tokens[:, ADDITION_PROMPT:end].long() == problems[:, ADDITION_PROMPT:end].long()).all(1)
