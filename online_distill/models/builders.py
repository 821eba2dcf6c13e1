"""Model builders: a plain dict from name to `builder(input_shape, num_classes) -> nn.Module`.

`input_shape` is the shape of one example without the batch dimension, read from the real
first examples of the run's dataset: (C, H, W) for images, (C, L) for 1-D signals, (F,) for
tables, (L,) for token ids. An image model takes its channels from `input_shape[0]`. Every
model is then run on those real examples (so lazy layers get their shapes) and must return
logits of shape (batch, num_classes); a builder that fails is a ConfigError naming it.

torchvision classification models are adapted to small images (28x28, 32x32): a 3x3 stride-1
stem and no early max-pool, as is usual for CIFAR. The small nets train in seconds on a CPU.
The char_* models read token ids in [0, 256) (data.BYTE_VOCAB: the UTF-8 bytes of a text, 0
for padding), e.g. the built-in lang_words dataset. Users add their own builders through the
Python API (`train(cfg, models={...})`); online_distill.models.hf wraps Hugging Face models.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision import models as tvm

from ..config import specs
from ..config.schema import ConfigError
from ..core.host import to_format
from . import gpt

Shape = tuple[int, ...]
Builder = Callable[[Shape, int], nn.Module]
BYTE_VOCAB = 256  # as data.BYTE_VOCAB; kept here so models.py does not import the datasets


def mlp(input_shape: Shape, num_classes: int, hidden: int | Sequence[int] = (256, 256), dropout: float = 0.0,
        input_dropout: float = 0.0, max_norm: float | None = None) -> nn.Module:
    """Any float input, flattened, through ReLU layers of the `hidden` widths (an int: one layer).
    `dropout` after each hidden layer and `input_dropout` on the input (Hinton et al. 2012: 0.5
    and 0.2); `max_norm` caps the L2 norm of each hidden unit's incoming weights after every
    optimizer step (their weight constraint; the loop calls `constrain_`). With neither dropout,
    the layers are those of the plain MLP (same parameter names, same initialisation)."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"hidden: got {hidden!r}; allowed: a positive width or a list of them")
    for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
        if not 0 <= p < 1:
            raise ValueError(f"{name}: got {p!r}; allowed: a probability in [0, 1)")
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm: got {max_norm!r}; allowed: None or a number > 0")
    layers: list[nn.Module] = [nn.Flatten()] + ([nn.Dropout(input_dropout)] if input_dropout else [])
    for i, w in enumerate(widths):
        layers += [nn.LazyLinear(w) if i == 0 else nn.Linear(widths[i - 1], w), nn.ReLU()]
        layers += [nn.Dropout(dropout)] if dropout else []
    layers.append(nn.Linear(widths[-1], num_classes))
    return MLP(*layers, max_norm=max_norm) if max_norm is not None else nn.Sequential(*layers)


class MLP(nn.Sequential):
    """An MLP whose hidden units' incoming weight vectors are kept within an L2 ball of radius
    `max_norm` (Srivastava/Hinton et al.'s max-norm constraint, used with dropout)."""

    def __init__(self, *layers: nn.Module, max_norm: float):
        super().__init__(*layers)
        self.max_norm = max_norm

    @torch.no_grad()
    def constrain_(self) -> None:
        hidden = [m for m in self if isinstance(m, nn.Linear)][:-1]  # not the output layer
        for m in hidden:
            if not isinstance(m.weight, nn.parameter.UninitializedParameter):  # a lazy layer before its first batch
                m.weight.copy_(torch.renorm(m.weight, p=2, dim=0, maxnorm=self.max_norm))


def mlp_small(input_shape: Shape, num_classes: int) -> nn.Module:
    """Hidden layers of 64: about 55k parameters on 28x28 images, a student for the MLPs."""
    return mlp(input_shape, num_classes, hidden=(64, 64))


def mlp_large(input_shape: Shape, num_classes: int) -> nn.Module:
    """Hidden layers of 1200 (the teacher size of Hinton et al. 2015): about 2.4M parameters
    on 28x28 images, yet fast on a CPU (two matrix products)."""
    return mlp(input_shape, num_classes, hidden=(1200, 1200))


def constraints(model: nn.Module) -> list[Callable[[], None]]:
    """What the loop calls after each optimizer step: the `constrain_()` of every module that
    has one (a weight constraint such as MLP's max-norm). A user model may define one too."""
    return [m.constrain_ for m in model.modules() if callable(getattr(m, "constrain_", None))]


def _channels(input_shape: Shape) -> int:
    """The channels of an image (C, H, W); anything else is not an image."""
    if len(input_shape) != 3:
        raise ValueError(f"an image model takes images of shape (C, H, W); got examples of shape {tuple(input_shape)}")
    return input_shape[0]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _cnn(in_channels: int, num_classes: int, width: int) -> nn.Module:
    return nn.Sequential(
        _conv_bn(in_channels, width), nn.MaxPool2d(2),
        _conv_bn(width, 2 * width), nn.MaxPool2d(2),
        _conv_bn(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4 * width, num_classes),
    )


def tiny_cnn(input_shape: Shape, num_classes: int) -> nn.Module:
    """About 6k parameters: the student of choice for fast tests and CPU demos."""
    return _cnn(_channels(input_shape), num_classes, width=8)


def small_cnn(input_shape: Shape, num_classes: int) -> nn.Module:
    """About 94k parameters; a couple of epochs on Fashion-MNIST on a laptop CPU."""
    return _cnn(_channels(input_shape), num_classes, width=32)


def wide_cnn(input_shape: Shape, num_classes: int) -> nn.Module:
    """About 370k parameters: a larger CPU-sized teacher for small_cnn / tiny_cnn."""
    return _cnn(_channels(input_shape), num_classes, width=64)


def _small_image_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)


def resnet18(input_shape: Shape, num_classes: int) -> nn.Module:
    in_channels = _channels(input_shape)
    m = tvm.resnet18(weights=None, num_classes=num_classes)
    m.conv1 = _small_image_stem(m.conv1, in_channels)
    m.maxpool = nn.Identity()
    return m


def resnet34(input_shape: Shape, num_classes: int) -> nn.Module:
    in_channels = _channels(input_shape)
    m = tvm.resnet34(weights=None, num_classes=num_classes)
    m.conv1 = _small_image_stem(m.conv1, in_channels)
    m.maxpool = nn.Identity()
    return m


def mobilenet_v3_small(input_shape: Shape, num_classes: int) -> nn.Module:
    in_channels = _channels(input_shape)
    m = tvm.mobilenet_v3_small(weights=None, num_classes=num_classes)
    first = m.features[0][0]
    m.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride=1, padding=1, bias=False)
    return m


def shufflenet_v2_x0_5(input_shape: Shape, num_classes: int) -> nn.Module:
    in_channels = _channels(input_shape)
    m = tvm.shufflenet_v2_x0_5(weights=None, num_classes=num_classes)
    m.conv1[0] = nn.Conv2d(in_channels, m.conv1[0].out_channels, 3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


# ---- token sequences (characters in) -------------------------------------------------------

class CharCNN(nn.Module):
    """Embedded token ids, two 1-D convolutions, max over positions: a small, fast text model."""

    def __init__(self, num_classes: int, vocab: int = BYTE_VOCAB, dim: int = 32, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.convs = nn.Sequential(nn.Conv1d(dim, width, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv1d(width, width, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.convs(self.embed(tokens).transpose(1, 2))  # (B, width, L)
        return self.head(h.amax(2))


class CharGRU(nn.Module):
    """Embedded token ids through a bidirectional GRU; the mean of its states over the
    non-padding positions: a larger, slower text teacher."""

    def __init__(self, num_classes: int, vocab: int = BYTE_VOCAB, dim: int = 48, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.gru = nn.GRU(dim, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.embed(tokens))  # (B, L, 2 * hidden)
        mask = (tokens != 0).unsqueeze(2).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp_min(1.0))


def _tokens(input_shape: Shape) -> None:
    if len(input_shape) != 1:
        raise ValueError(f"a char_* model takes token ids of shape (L,); got examples of shape {tuple(input_shape)}")


def char_cnn(input_shape: Shape, num_classes: int) -> nn.Module:
    """About 27k parameters: token ids (L,) in [0, 256), e.g. lang_words; trains in seconds on a CPU."""
    _tokens(input_shape)
    return CharCNN(num_classes)


def char_cnn_wide(input_shape: Shape, num_classes: int) -> nn.Module:
    """About 165k parameters: a wider CharCNN."""
    _tokens(input_shape)
    return CharCNN(num_classes, dim=64, width=192)


def char_gru(input_shape: Shape, num_classes: int) -> nn.Module:
    """About 183k parameters: a bidirectional GRU over token ids, a text teacher (3x slower than char_cnn)."""
    _tokens(input_shape)
    return CharGRU(num_classes)


MODELS: dict[str, Builder] = {
    "mlp": mlp,
    "mlp_small": mlp_small,
    "mlp_large": mlp_large,
    "tiny_cnn": tiny_cnn,
    "small_cnn": small_cnn,
    "wide_cnn": wide_cnn,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "mobilenet_v3_small": mobilenet_v3_small,
    "shufflenet_v2_x0_5": shufflenet_v2_x0_5,
    "char_cnn": char_cnn,
    "char_cnn_wide": char_cnn_wide,
    "char_gru": char_gru,
    # decoder-only language models (online_distill.models.gpt): logits (B, L, vocab) for ids (B, L)
    "gpt": gpt.gpt,
    "gpt_tiny": gpt.gpt_tiny,
    "gpt_small": gpt.gpt_small,
    "gpt_medium": gpt.gpt_medium,
}


def resolve_model(spec: str, builders: dict[str, Builder] | None = None, *, field: str = "models") -> Builder:
    """The builder a model spec names (a name, an import path, either with arguments:
    online_distill.config.specs), or a ConfigError of one line starting with `field`."""
    try:
        return specs.resolve(spec, MODELS, builders, fixed=2, what="model")
    except specs.SpecError as e:
        raise ConfigError(f"{field}: {e}", field.split(":")[0]) from None


def build_model(name: str, sample: torch.Tensor, num_classes: int, builders: dict[str, Builder] | None = None,
                *, field: str = "models", memory_format: torch.memory_format = torch.contiguous_format,
                label_shape: tuple[int, ...] = ()) -> nn.Module:
    """Build model `name` (a spec: online_distill.config.specs) for examples like `sample` (a real batch
    of the dataset, a couple of rows) and run it on them: lazy layers take their shapes, and a
    builder that fails, a forward that raises or logits of the wrong shape are a ConfigError that
    starts with `field` and names the builder and the batch it got. Logits are (B, num_classes)
    for one label per example, (B, *label_shape, num_classes) for labels of that shape per
    example (a language model's next token at each of L positions: label_shape (L,)). With
    `memory_format` channels-last (images and scale.channels_last: host.memory_format), the
    model is moved to it and run again so."""
    builder = resolve_model(name, builders, field=field)
    shape = tuple(sample.shape[1:])
    who = f"{field}: model {name!r} ({getattr(builder, '__qualname__', builder)})"
    got = f"examples of shape {shape}, {str(sample.dtype).removeprefix('torch.')}"
    try:
        model = builder(shape, num_classes)
    except Exception as e:
        raise ConfigError(f"{who} failed to build, called as builder(input_shape={shape}, num_classes={num_classes}) "
                          f"for {got}: {type(e).__name__}: {e}. A builder takes (input_shape, num_classes), input_shape "
                          "being one example's shape without the batch dimension (an image's channels are "
                          "input_shape[0])") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{who} returned {type(model).__name__}; allowed: a torch.nn.Module")
    with torch.no_grad():
        model.eval()
        try:
            out = model(sample)
        except Exception as e:
            raise ConfigError(f"{who}: its forward raised on the dataset's first {len(sample)} training examples, a "
                              f"batch of shape {tuple(sample.shape)} ({got}): {type(e).__name__}: {e}") from e
        model.train()
    want = (len(sample), *label_shape, num_classes)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or tuple(out.shape) != want:
        what = f"shape {tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{who}: on a batch of shape {tuple(sample.shape)} ({got}) it returned {what}; allowed: "
                          f"float logits of shape {want}, one column per class of the dataset "
                          f"(num_classes={num_classes})" + (f" at each of the label's {label_shape} positions" if label_shape else ""))
    if memory_format is not torch.contiguous_format:
        _to_memory_format(model, sample, memory_format, who)
    return model


def _to_memory_format(model: nn.Module, sample: torch.Tensor, fmt: torch.memory_format, who: str) -> None:
    """Move a built model to `fmt` and check that its forward still runs on the batch in it: a
    forward that calls .view() on an activation fails on channels-last tensors."""
    model.to(memory_format=fmt)
    with torch.no_grad():
        model.eval()
        try:
            model(to_format(sample, fmt))
        except Exception as e:
            raise ConfigError(f"scale.channels_last: {who.split(': ', 1)[1]} fails on channels-last images of shape "
                              f"{tuple(sample.shape)}: {type(e).__name__}: {e}. Allowed: scale.channels_last=false for "
                              "this model, or a forward that takes any memory layout (.reshape where it calls .view)",
                              "scale.channels_last") from e
        model.train()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
