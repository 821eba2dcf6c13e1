"""Channels-last images and the host allocator (online_distill.core.host): speed settings that must
change no model, and a model that cannot take them is refused naming the field."""
import copy

import pytest
import torch
from torch import nn

from online_distill.config import schema as C
from online_distill.core.host import keep_freed_memory, memory_format, to_format
from online_distill.models.builders import build_model, small_cnn


def test_channels_last_is_for_image_batches_only():
    images, table, tokens = torch.zeros(2, 3, 8, 8), torch.zeros(2, 5), torch.zeros(2, 7, dtype=torch.long)
    assert memory_format(images, True) is torch.channels_last
    assert memory_format(images, False) is torch.contiguous_format
    assert memory_format(table, True) is torch.contiguous_format and memory_format(tokens, True) is torch.contiguous_format
    x = to_format(torch.randn(4, 3, 8, 8), torch.channels_last)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert to_format(table, torch.channels_last) is table  # nothing to lay out


def test_a_channels_last_model_is_the_same_model():
    sample = torch.randn(16, 3, 12, 12)
    torch.manual_seed(0)
    plain = build_model("small_cnn", sample, 10)
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert fast[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain.eval(), fast.eval()
        a, b = plain(sample), fast(to_format(sample, torch.channels_last))
    assert torch.allclose(a, b, atol=1e-5) and not torch.equal(a, torch.zeros_like(a))
    # build_model moves it, and its state dict loads into a model of the default layout
    built = build_model("small_cnn", sample, 10, memory_format=torch.channels_last)
    assert built[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    small_cnn((3, 12, 12), 10).load_state_dict(built.state_dict())


class ViewsItsActivations(nn.Module):
    """A forward written for the default layout: .view on a conv's output."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], 4, 3, padding=1)
        self.head = nn.Linear(4 * input_shape[1] * input_shape[2], num_classes)

    def forward(self, x):
        h = self.conv(x)
        return self.head(h.view(len(h), -1))


def test_a_model_that_needs_the_default_layout_is_refused_naming_the_field():
    sample = torch.randn(4, 3, 6, 6)
    build_model("viewer", sample, 10, {"viewer": ViewsItsActivations})  # fine in the default layout
    with pytest.raises(C.ConfigError) as e:
        build_model("viewer", sample, 10, {"viewer": ViewsItsActivations}, memory_format=torch.channels_last)
    msg = str(e.value)
    assert e.value.field == "scale.channels_last"
    assert msg.startswith("scale.channels_last: model 'viewer' (ViewsItsActivations) fails on channels-last images")
    assert "Allowed: scale.channels_last=false" in msg and "\n" not in msg


def test_the_driver_refuses_it_before_any_worker(make_cfg, no_ray):
    from online_distill.data.datasets import ImageTensors, Splits
    from online_distill.run import train

    def images(cfg):
        g = torch.Generator().manual_seed(0)
        ds = ImageTensors(torch.randint(0, 255, (300, 3, 6, 6), generator=g, dtype=torch.uint8),
                          torch.randint(0, 10, (300,), generator=g), (0.5,) * 3, (0.25,) * 3)
        return Splits(ds.subset(torch.arange(200)), ds.subset(torch.arange(200, 300)), 10)

    cfg = make_cfg(models=["viewer", "viewer"], data__dataset="images", data__val_size=50, data__train_subset=None,
                   data__test_subset=None)
    with pytest.raises(C.ConfigError, match="^scale.channels_last: model 'viewer'"):
        train(cfg, models={"viewer": ViewsItsActivations}, datasets={"images": images}, verbose=False)


def test_freed_memory_is_kept_on_linux_glibc():
    import sys

    kept = keep_freed_memory()
    assert kept is keep_freed_memory()  # once per process; later calls only answer
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert kept
