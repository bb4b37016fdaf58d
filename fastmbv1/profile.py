"""Traces of a few training steps, op by op, with torch.profiler.

The trainer and the bench label their regions with ``torch.profiler.record_function``:
``data wait``, ``augment``, ``forward``, ``backward``, ``optimizer step`` and ``evaluation``
(a label costs about a microsecond when no profiler runs). ``StepTrace`` records the steps
it is told to, writes a Chrome-format trace that Perfetto, ``chrome://tracing`` and
TensorBoard's profiler plugin open, and lists the operators that took the most time of
their own: "where the time goes" down to the depthwise and pointwise convolutions, the
batch norms and the data gather.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fastmbv1.machine import sync
from fastmbv1.tables import Column, render_table

TOP_OPS = 15
REGIONS = ("data wait", "augment", "forward", "backward", "optimizer step", "evaluation")


class StepTrace:
    """Record from ``start()`` to ``stop()`` into ``folder``; ``stop`` returns the trace's path.

    ``steps`` says how many steps the caller means to record (it calls ``stop`` after them).
    """

    def __init__(self, folder: str | Path, device: torch.device, steps: int):
        self.folder, self.device, self.steps = Path(folder), device, steps
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        # Shapes tell a depthwise convolution (weight C x 1 x 3 x 3) from a pointwise one.
        self.profiler = profile(activities=activities, record_shapes=True)
        self.running = False

    def start(self) -> None:
        sync(self.device)  # what was queued before belongs to earlier steps
        self.profiler.start()
        self.running = True

    def report(self) -> None:
        """Stop, write the trace and print where it is and the top operators."""
        path = self.stop()
        print(f"trace of {self.steps} steps in {path}; operators by their own time:", flush=True)
        print(format_top_ops(self.top_ops(), self.device), flush=True)

    def stop(self) -> Path:
        sync(self.device)
        self.profiler.stop()
        self.running = False
        self.folder.mkdir(parents=True, exist_ok=True)
        # TensorBoard's profiler plugin finds *.pt.trace.json files; Perfetto opens any.
        path = self.folder / f"{self.device.type}-{self.steps}-steps.pt.trace.json"
        self.profiler.export_chrome_trace(str(path))
        return path

    def top_ops(self, n: int = TOP_OPS) -> list[dict]:
        """The operators with the most time of their own, biggest first (``rank_ops``)."""
        return rank_ops(self.profiler.key_averages(group_by_input_shape=True), self.device, n)


def rank_ops(events, device: torch.device, n: int = TOP_OPS) -> list[dict]:
    """The ``n`` operators of ``events`` (``key_averages``) with the most time of their own
    (children excluded), biggest first; convolutions split into depthwise, pointwise and the
    stem by their weight's shape.

    On CUDA a kernel's time is in two events: the kernel's own (device type CUDA) and the
    self device time of the CPU operator that launched it. Only the operators are summed:
    they carry the input shapes that tell the convolutions apart, and a step replayed as a
    CUDA graph has its kernels' time on the labelled region that replayed it.
    """
    cuda = device.type == "cuda"
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.key in REGIONS or (cuda and e.device_type != DeviceType.CPU):
            continue
        name = e.key + conv_kind(e.input_shapes) if "conv" in e.key else e.key
        calls_us = totals.setdefault(name, [0, 0.0])
        calls_us[0] += e.count
        calls_us[1] += e.self_device_time_total if cuda else e.self_cpu_time_total
    total = sum(us for _, us in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: item[1][1], reverse=True)[:n]
    return [
        {"op": op, "calls": calls, "self_ms": us / 1000, "share": us / total}
        for op, (calls, us) in ranked
    ]


def conv_kind(shapes: list) -> str:
    """`` (depthwise)``, `` (pointwise)`` or `` (stem)`` from a convolution's argument shapes
    (its weight is the only 4-d argument with a 1x1 or 3x3 kernel: activations here are
    never 1 or 3 pixels wide)."""
    for shape in shapes:
        if len(shape) == 4 and tuple(shape[2:]) in ((1, 1), (3, 3)):
            if shape[2] == 1:
                return " (pointwise)"
            return " (depthwise)" if shape[1] == 1 else " (stem)"
    return ""


def format_top_ops(rows: list[dict], device: torch.device) -> str:
    where = "GPU" if device.type == "cuda" else "CPU"
    columns = [
        Column("operator", "op"),
        Column("calls", "calls", spec="d"),
        Column(f"self {where} ms", "self_ms", spec=",.1f"),
        Column("share", "share", spec=".1%"),
    ]
    return render_table(columns, rows)
