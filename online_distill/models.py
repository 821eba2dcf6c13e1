"""Model builders: a plain dict from name to `builder(in_channels, num_classes) -> nn.Module`.

torchvision classification models are adapted to small images (28x28, 32x32): a 3x3 stride-1
stem and no early max-pool, as is usual for CIFAR. The small nets train in seconds on a CPU.
Users add their own builders through the Python API (`train(cfg, models={...})`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm

Builder = Callable[[int, int], nn.Module]


def mlp(in_channels: int, num_classes: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _cnn(in_channels: int, num_classes: int, width: int) -> nn.Module:
    return nn.Sequential(
        _conv_bn(in_channels, width), nn.MaxPool2d(2),
        _conv_bn(width, 2 * width), nn.MaxPool2d(2),
        _conv_bn(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4 * width, num_classes),
    )


def tiny_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """About 6k parameters: the student of choice for fast tests and CPU demos."""
    return _cnn(in_channels, num_classes, width=8)


def small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """About 94k parameters; a couple of epochs on Fashion-MNIST on a laptop CPU."""
    return _cnn(in_channels, num_classes, width=32)


def wide_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """About 370k parameters: a larger CPU-sized teacher for small_cnn / tiny_cnn."""
    return _cnn(in_channels, num_classes, width=64)


def _small_image_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)


def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    m = tvm.resnet18(weights=None, num_classes=num_classes)
    m.conv1 = _small_image_stem(m.conv1, in_channels)
    m.maxpool = nn.Identity()
    return m


def resnet34(in_channels: int, num_classes: int) -> nn.Module:
    m = tvm.resnet34(weights=None, num_classes=num_classes)
    m.conv1 = _small_image_stem(m.conv1, in_channels)
    m.maxpool = nn.Identity()
    return m


def mobilenet_v3_small(in_channels: int, num_classes: int) -> nn.Module:
    m = tvm.mobilenet_v3_small(weights=None, num_classes=num_classes)
    first = m.features[0][0]
    m.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride=1, padding=1, bias=False)
    return m


def shufflenet_v2_x0_5(in_channels: int, num_classes: int) -> nn.Module:
    m = tvm.shufflenet_v2_x0_5(weights=None, num_classes=num_classes)
    m.conv1[0] = nn.Conv2d(in_channels, m.conv1[0].out_channels, 3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


MODELS: dict[str, Builder] = {
    "mlp": mlp,
    "tiny_cnn": tiny_cnn,
    "small_cnn": small_cnn,
    "wide_cnn": wide_cnn,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "mobilenet_v3_small": mobilenet_v3_small,
    "shufflenet_v2_x0_5": shufflenet_v2_x0_5,
}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, builders: dict[str, Builder] | None = None) -> nn.Module:
    """Build a model and run one dummy batch so lazy layers get their shapes."""
    table = {**MODELS, **(builders or {})}
    model = table[name](in_channels, num_classes)
    with torch.no_grad():
        model.eval()
        model(torch.zeros(2, in_channels, image_size, image_size))
        model.train()
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
