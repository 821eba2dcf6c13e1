"""One training step (forward, backward, SGD with momentum) and one forward pass at batch 128 on
one CPU thread, for the models the CPU profile chose between (the numbers in benchmarks/README.md):

    .venv/bin/python benchmarks/raw/cpu/step_times.py > benchmarks/raw/cpu/step_times.txt
"""
import time

import torch

from online_distill.models.builders import build_model

torch.set_num_threads(1)
torch.manual_seed(0)
x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
for name in ["mlp", "tiny_cnn", "small_cnn"]:
    m = build_model(name, x[:2], 10)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(20):
        step()
    train = (time.perf_counter() - t) / 20
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(10):
            m(x)
        fwd = (time.perf_counter() - t) / 10
    print(f"{name}: {sum(p.numel() for p in m.parameters())} parameters, train {train * 1e3:.1f} ms/step, "
          f"forward {fwd * 1e3:.1f} ms (batch 128, 1 thread)")
