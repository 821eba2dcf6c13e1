"""How a worker lays out tensors and reuses host memory: two settings that decide much of a
CPU step's time and change no result beyond float rounding.

- Channels-last images (`scale.channels_last`). oneDNN's CPU convolutions, and cuDNN's under
  mixed precision, run fastest on NHWC; PyTorch's default is NCHW, converted on every call.
  A model whose examples are images (B, C, H, W) is moved to channels-last with its batches;
  any other input is left as it is (the setting means nothing for it).
- Freed memory kept for the next step (`keep_freed_memory`). PyTorch's CPU tensors come from
  glibc's malloc, which by default hands the top of its heap back to the kernel as soon as it is
  free and serves large blocks with mmap: every step then page-faults its activations in again,
  zero-filled by the kernel. Raising both thresholds keeps the memory in the process, as
  PyTorch's CUDA caching allocator does on a GPU; the process holds its peak, never more.

`python -m benchmarks.tools.host` measures both, side by side.
"""
from __future__ import annotations

import ctypes
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap (the activations of any model a CPU trains)
TRIM_THRESHOLD = 2**31 - 1  # keep whatever is freed (the largest value mallopt takes)

_KEPT: list[bool] = []


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse in this process (once; later calls only
    answer). False where that cannot be done: not Linux, or a C library without glibc's mallopt."""
    if _KEPT:
        return _KEPT[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):  # musl (Alpine) has no libc.so.6 or no mallopt
            mallopt = None
        if mallopt is not None:
            # both together: setting either alone also stops glibc's own adaptive threshold
            ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _KEPT.append(ok)
    return ok


def memory_format(sample: torch.Tensor, channels_last: bool) -> torch.memory_format:
    """The layout a run keeps its models and batches in: channels-last for images (B, C, H, W)
    when asked, PyTorch's default otherwise."""
    return torch.channels_last if channels_last and sample.dim() == 4 else torch.contiguous_format


def to_format(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A batch in the run's layout (a no-op for anything but 4-D tensors or the default layout)."""
    if fmt is torch.contiguous_format or x.dim() != 4:
        return x
    return x.contiguous(memory_format=fmt)
