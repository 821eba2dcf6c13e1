"""A small decoder-only transformer (GPT) from torch.nn alone, for language-model distillation.

Token ids (B, L) in, next-token logits (B, L, vocab) out: logits[:, t] predicts token t + 1 from
tokens 0..t. Token embedding (id 0 is padding: a zero vector that is never trained), learned
positions, pre-LayerNorm blocks (causal self-attention through
F.scaled_dot_product_attention(is_causal=True), which picks a fused kernel where there is one;
a GELU MLP), a final LayerNorm, and an output head tied to the token embedding (GPT-2, nanoGPT).

Padding goes at the right: a real position attends to itself and to earlier positions only, so
right padding never changes the logits of the real positions.

Builders follow models.py: `builder(input_shape, num_classes) -> nn.Module`, with input_shape
(L,) the sequence length and num_classes the vocabulary (256 for byte-level text, e.g. the
built-in fortunes corpus). gpt_tiny and gpt_small are students, gpt_medium a teacher; sizes and
their CPU speed are in GPT_SIZES.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D/H)
        causal = True
        if cache is not None:  # decoding: this call's keys and values join the earlier positions'
            k, v = cache.extend(k, v)
            # one new position attends to every cached one; a first (prefill) call is causal as usual
            causal = l > 1
            if causal and k.shape[2] != l:
                raise ValueError("a key-value cache takes a prompt first, then one token per call")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, l, d)))


class LayerCache:
    """One attention layer's keys and values of the positions decoded so far, (B, H, T, D/H),
    in buffers of the full length allocated once (no concatenation per token)."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k = self.v = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            shape = (*k.shape[:2], max(self.capacity, k.shape[2]), k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """The key-value cache of one batch being decoded: a LayerCache per block and the number of
    positions fed so far (the next call's first position). GPT(ids, cache=...) feeds the prompt
    first, then one token per call; each call returns the logits of its own positions only."""

    def __init__(self, layers: int, capacity: int):
        self.layers = [LayerCache(capacity) for _ in range(layers)]
        self.pos = 0


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x)); the residual stream is never normalised."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT(vocab, seq_len, dim, layers, heads): model(ids (B, L)) -> logits (B, L, vocab), L <= seq_len."""

    def __init__(self, vocab: int, seq_len: int, dim: int, layers: int, heads: int, mlp_ratio: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.vocab, self.seq_len = vocab, seq_len
        self.tok = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Embedding(seq_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: one matrix reads tokens in and scores them out
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        # GPT-2's: N(0, 0.02), and the projections into the residual stream scaled by 1/sqrt(2 layers)
        # so that the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        with torch.no_grad():
            self.tok.weight[0].zero_()  # the padding row (normal_ above overwrote it)

    def forward(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        if ids.dim() != 2:
            raise ValueError(f"GPT takes token ids of shape (B, L); got {tuple(ids.shape)}")
        b, l = ids.shape
        start = cache.pos if cache is not None else 0
        if start + l > self.seq_len:
            raise ValueError(f"a sequence of {start + l} tokens is longer than the model's {self.seq_len} positions")
        # out of range, an embedding lookup is a device-side assert on CUDA (fatal to the process): refuse here
        hi = int(ids.max()) if ids.numel() else 0
        if hi >= self.vocab or (ids.numel() and int(ids.min()) < 0):
            raise ValueError(f"token ids range up to {hi}, but the model's vocabulary has {self.vocab} ids "
                             f"(0..{self.vocab - 1})")
        x = self.drop(self.tok(ids) + self.pos(torch.arange(start, start + l, device=ids.device)))
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.pos += l
        return self.head(self.ln_f(x))

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty key-value cache for decoding up to `capacity` positions (default: all)."""
        return KVCache(len(self.blocks), capacity or self.seq_len)


GPT_SIZES = {
    # name: (dim, layers, heads). Chosen by measuring on the project's 2-core CPU dev box, 1 torch
    # thread, batch 32 x 128 tokens (forward + backward + SGD step), and by training on the
    # fortunes corpus (byte-level, L = 128; AdamW, weight decay 0.1, 100 warm-up steps, cosine to
    # 10%, gradient clip 1; test bits per byte; a unigram model gets 4.76):
    "gpt_tiny": (64, 2, 4),      # 125k params,  ~65 ms/step: 2.48 bpb after 3000 steps at lr 6e-3 (~3-4 min)
    "gpt_small": (96, 3, 4),     # 373k params, ~160 ms/step: 2.54 bpb after 1600 steps at lr 5e-3 (~4-5 min)
    "gpt_medium": (128, 4, 4),   # 842k params, ~340 ms/step: 2.32 bpb after 2400 steps at lr 4e-3 (~13 min)
}


def _seq_len(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 1:
        raise ValueError(f"a gpt model takes token ids of shape (L,); got examples of shape {tuple(input_shape)}")
    return int(input_shape[0])


def gpt(input_shape: tuple[int, ...], num_classes: int, *, dim: int = 128, layers: int = 4, heads: int = 4,
        mlp_ratio: int = 4, dropout: float = 0.0) -> GPT:
    """A GPT for sequences of input_shape = (L,) token ids in [0, num_classes): logits (B, L, num_classes)."""
    return GPT(num_classes, _seq_len(input_shape), dim, layers, heads, mlp_ratio, dropout)


def _sized(name: str, doc: str):
    dim, layers, heads = GPT_SIZES[name]

    def build(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> GPT:
        return gpt(input_shape, num_classes, **{"dim": dim, "layers": layers, "heads": heads, **kwargs})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"dim {dim}, {layers} layers, {heads} heads: {doc}"
    return build


gpt_tiny = _sized("gpt_tiny", "a student")
gpt_small = _sized("gpt_small", "a bigger student")
gpt_medium = _sized("gpt_medium", "a teacher")
