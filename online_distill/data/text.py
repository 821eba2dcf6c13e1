"""Text to token ids and back for byte-level models (vocabulary 256: a text's UTF-8 bytes; id 0
is the padding and never occurs in text)."""
from __future__ import annotations

import torch

from .datasets import BYTE_VOCAB


def encode_text(text: str) -> torch.Tensor:
    """The UTF-8 bytes of `text` as token ids (L,); NUL bytes (id 0, the padding) are dropped."""
    return torch.tensor([b for b in text.encode("utf-8") if b], dtype=torch.long)


def decode_text(ids) -> str:
    """Token ids of a byte-level model as text (undecodable bytes shown as U+FFFD; padding dropped)."""
    return bytes(int(i) for i in ids if 0 < int(i) < BYTE_VOCAB).decode("utf-8", errors="replace")
