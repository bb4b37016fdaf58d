"""One optimiser step with and without --muon, beside the forward and backward, and a bf16
against an fp32 matrix product (each the median of five).

Muon's Newton-Schulz iterations run in bfloat16 where the hardware has it and in float32
where it would be emulated (``fastmbv1.optim.ns_dtype``); torch.optim.Muon always uses
bfloat16, which the first runs of this script (muon_step.txt) timed on an AVX2 CPU.
Run from the repository root with the venv active:
    python bench/results/ab-levers-cpu/muon_step.py
"""

import statistics

import torch

from fastmbv1.config import merge
from fastmbv1.optim import ns_dtype
from fastmbv1.step import build_run
from fastmbv1.timing import timed

CPU = torch.device("cpu")


def median_s(fn, reps: int = 5) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn, CPU) for _ in range(reps))


torch.set_num_threads(2)
print(f"Newton-Schulz dtype here: {ns_dtype(CPU)}")
for n in (256, 512):
    a = torch.randn(n, n)
    for dtype in (torch.float32, torch.bfloat16):
        b = a.to(dtype)
        print(f"{n} x {n} product, {dtype}: {1e3 * median_s(lambda b=b: b @ b):.1f} ms")
for width in (0.25, 0.5):
    for muon in (0.0, 0.5):
        run = build_run(merge({"width": width, "muon": muon, "device": "cpu"}, "cpu"), CPU)
        x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        backward = median_s(lambda run=run, x=x: run.model(x).sum().backward())
        step = median_s(run.optimizer.step)
        print(
            f"width {width}, --muon {muon}: forward and backward {backward:.3f} s, "
            f"optimiser step {step:.3f} s"
        )
