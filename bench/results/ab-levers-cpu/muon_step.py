"""One optimiser step with and without --muon, and a bf16 against an fp32 matrix product.

torch.optim.Muon runs its Newton-Schulz iterations in bfloat16; a CPU without bf16 matrix
instructions (AVX2 only) emulates them. Run from the repository root with the venv active:
    python bench/results/ab-levers-cpu/muon_step.py
"""

import time

import torch

from fastmbv1.config import merge
from fastmbv1.step import build_run

torch.set_num_threads(2)
for n in (256, 512):
    a = torch.randn(n, n)
    for dtype in (torch.float32, torch.bfloat16):
        b = a.to(dtype)
        b @ b
        t = time.perf_counter()
        b @ b
        print(f"{n} x {n} product, {dtype}: {1e3 * (time.perf_counter() - t):.1f} ms")
for width in (0.25, 0.5):
    for muon in (0.0, 0.5):
        run = build_run(
            merge({"width": width, "muon": muon, "device": "cpu"}, "cpu"), torch.device("cpu")
        )
        x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        run.model(x).sum().backward()
        run.optimizer.step()
        t = time.perf_counter()
        run.optimizer.step()
        print(f"width {width}, --muon {muon}: optimiser step {time.perf_counter() - t:.3f} s")
