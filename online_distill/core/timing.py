"""Step and exchange timings that do not stall the GPU.

On a GPU, host clocks around queued kernels time their launches, not their work, and an NCCL
exchange would look free; synchronizing at every mark makes the numbers true but loses the
CPU/GPU overlap the loop is meant to have. So on CUDA a mark is an event recorded on the
current stream (collectives make that stream wait for their result, so an event after an
all-gather completes after the exchange), and the epoch's marks are read once, after one
synchronize. On the CPU a mark is simply `time.perf_counter()`.
"""
from __future__ import annotations

import time

import torch


class Clock:
    def __init__(self, device: torch.device):
        self._device = device if device.type == "cuda" else None

    def mark(self):
        if self._device is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def read(self, marks: list[tuple]) -> tuple[list[float], float]:
        """Per-step times and total exchange seconds of an epoch, from each step's marks
        (start, exchange start, exchange end, [exchange start, exchange end, ...], end)."""
        if self._device is not None:
            torch.cuda.synchronize(self._device)  # once per epoch: every event has completed
        steps, exchange = [], 0.0
        for m in marks:
            steps.append(self._seconds(m[0], m[-1]))
            exchange += sum(self._seconds(a, b) for a, b in zip(m[1:-1:2], m[2:-1:2]))
        return steps, exchange

    @staticmethod
    def _seconds(start, end) -> float:
        if isinstance(start, float):
            return end - start
        return start.elapsed_time(end) / 1e3  # CUDA events measure milliseconds
