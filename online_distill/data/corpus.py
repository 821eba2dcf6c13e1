"""A built-in byte-level text corpus for language models: Debian's `fortunes` package.

No download at run time: `apt-get install fortunes` puts about 2.5 MB of English text (quotes,
jokes, definitions, poems) under /usr/share/games/fortunes. Each fortune is one document; a
file holds many, separated by lines holding only "%".

Tokens are the text's bytes: vocabulary 256, id 0 for padding (NUL never occurs in text; any that
does is dropped), as data.BYTE_VOCAB. A document is a test document when crc32 of its bytes % 10
== 0: the split depends on the text alone, never on file order or a seed, and no document is in
both splits (the framework holds its own validation split out of train).

Each document becomes windows of up to L + 1 bytes, consecutive windows overlapping by one byte,
so every byte after the document's first is predicted exactly once; the last window is padded
with 0. Windows start cold (no context from the previous window): a small cost at L = 128.

This module turns text into token tensors and knows nothing of the framework's datasets:
data.fortunes (the builder registered as "fortunes") wraps them in data.SequenceTensors.
"""
from __future__ import annotations

import functools
import os
import zlib

import torch

from ..config.schema import ConfigError

FORTUNES_DIR = "/usr/share/games/fortunes"
SEQ_LEN = 128  # default L when the config has no data.seq_len


def split_documents(text: bytes) -> list[bytes]:
    """The documents of one fortune file: the bytes between lines holding only "%", each kept
    with its own line ends; blank documents are dropped."""
    docs, lines = [], []
    for line in text.splitlines(keepends=True):
        if line.rstrip(b"\r\n") == b"%":
            docs.append(b"".join(lines))
            lines = []
        else:
            lines.append(line)
    docs.append(b"".join(lines))
    return [d for d in docs if d.strip()]


def is_test(doc: bytes) -> bool:
    """The test split: crc32 of the document's bytes % 10 == 0 (about a tenth)."""
    return zlib.crc32(doc) % 10 == 0


def windows(doc: bytes, seq_len: int) -> list[bytes]:
    """Windows of up to seq_len + 1 bytes starting every seq_len bytes (overlap of one byte): each
    byte but the first is a target exactly once. A document of fewer than 2 bytes predicts nothing."""
    return [doc[s: s + seq_len + 1] for s in range(0, max(len(doc) - 1, 0), seq_len)]


def encode_windows(docs: list[bytes], seq_len: int) -> torch.Tensor:
    """(N, seq_len + 1) uint8: every document's windows, each 0-padded at the right."""
    rows = [w for d in docs for w in windows(d, seq_len)]
    width = seq_len + 1
    buf = bytearray(len(rows) * width)
    for i, w in enumerate(rows):
        buf[i * width: i * width + len(w)] = w
    return torch.frombuffer(buf, dtype=torch.uint8).view(len(rows), width).clone() if rows else \
        torch.zeros(0, width, dtype=torch.uint8)


def fortune_files(root: str | None = None) -> list[str]:
    """The fortune text files directly under root: no index files (.dat), no .u8 links (the same
    text again), no other links, no subdirectories (fortunes-off installs its offensive ones in
    one). root None: FORTUNES_DIR."""
    root = FORTUNES_DIR if root is None else root
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, n) for n in os.listdir(root)
                  if not n.endswith((".dat", ".u8")) and os.path.isfile(os.path.join(root, n))
                  and not os.path.islink(os.path.join(root, n)))


def fortunes_tokens(seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) windows of the fortunes corpus, each (N, seq_len + 1) uint8, 0-padded. Kept per
    process (reading and splitting takes about a second, and the driver checks the data more than
    once): the same tensors for the same files (paths and mtimes) and seq_len. A missing package
    is a ConfigError naming data.dataset and the command that installs it."""
    files = fortune_files()
    if not files:
        raise ConfigError(f"data.dataset: 'fortunes' reads Debian's fortunes package in {FORTUNES_DIR}, which is "
                          "missing; install it: apt-get install fortunes", "data.dataset")
    if seq_len < 1:
        raise ConfigError(f"data.seq_len: got {seq_len}; allowed: an integer >= 1", "data.seq_len")
    return _windows(tuple((path, os.path.getmtime(path)) for path in files), seq_len)


def documents(files: tuple[tuple[str, float], ...] | None = None) -> tuple[list[bytes], list[bytes]]:
    """(train, test) documents of the fortune files ((path, mtime) pairs; None: all of them), NUL
    bytes dropped, in file order."""
    files = files if files is not None else tuple((p, os.path.getmtime(p)) for p in fortune_files())
    return _documents(files)


@functools.lru_cache(maxsize=1)
def _documents(files: tuple[tuple[str, float], ...]) -> tuple[list[bytes], list[bytes]]:
    train, test = [], []
    for path, _ in files:
        with open(path, "rb") as f:
            for doc in split_documents(f.read().replace(b"\x00", b"")):
                (test if is_test(doc) else train).append(doc)
    return train, test


@functools.lru_cache(maxsize=4)
def _windows(files: tuple[tuple[str, float], ...], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    train, test = _documents(files)
    return encode_windows(train, seq_len), encode_windows(test, seq_len)
