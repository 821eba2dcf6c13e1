"""The loop's clock: per-step and exchange times from marks read once per epoch."""
import time

import pytest
import torch

from online_distill.core.timing import Clock


def test_cpu_marks_give_step_and_exchange_seconds():
    # marks per step: start, exchange start, exchange end, exchange start, exchange end, end
    marks = [(0.0, 1.0, 1.5, 3.0, 3.25, 4.0), (4.0, 4.5, 5.5, 6.0, 6.0, 7.0)]
    steps, exchange = Clock(torch.device("cpu")).read(marks)
    assert steps == [4.0, 3.0]
    assert exchange == 0.5 + 0.25 + 1.0 + 0.0


def test_cpu_mark_is_the_host_clock():
    clock = Clock(torch.device("cpu"))
    a = clock.mark()
    time.sleep(0.02)
    (step,), exchange = clock.read([(a, clock.mark())])
    assert 0.02 <= step < 1.0 and exchange == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_events_time_the_queued_work_not_its_launch():
    device = torch.device("cuda")
    clock = Clock(device)
    x = torch.randn(4096, 4096, device=device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    a = clock.mark()
    for _ in range(20):
        x = x @ x / 64
    b = clock.mark()
    launched = time.perf_counter() - t0  # host time of the launches: the work is still queued
    torch.cuda.synchronize()
    done = time.perf_counter() - t0  # host time until the work finished
    (step,), _ = clock.read([(a, b)])
    assert done > 2 * launched  # the premise: the work outlasts its launches
    assert 0.5 * done < step <= done
