"""The roofline: how fast a training step could run, layer by layer, and how fast it runs.

A layer's lower bound is max(FLOPs / peak FLOP/s, bytes / bandwidth), with its FLOPs and
bytes counted from its shapes (``fastmbv1.flops``); the step's is the sum over its layers.
``step_roofline`` puts this machine's measured peaks (``fastmbv1.peak``) under the bench's
step and times every layer alone, forward and backward on a random input of its shape, so
that each layer's distance from its bound shows. ``predict`` puts a card's published peaks
(``fastmbv1.measure.gpus``) under each preset instead, adds the kernel launches, and gives
the step's and the epoch's floor on that card: a model, not a measurement.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from fastmbv1.config import TrainConfig, narrowest
from fastmbv1.evaluate import autocast, batch_dtype
from fastmbv1.flops import (
    MATMUL_KINDS,
    LayerCost,
    layer_costs,
    model_flops_per_image,
    optimizer_cost,
)
from fastmbv1.measure.gpus import GPUS, Card, read_spec
from fastmbv1.measure.inputs import TRAIN_IMAGES
from fastmbv1.measure.results import Table
from fastmbv1.models import build_model
from fastmbv1.peak import cache_file, cached_peaks, measure_peaks, step_dtype
from fastmbv1.plan import default_amp, make_config
from fastmbv1.step import Run, build_run, model_spec
from fastmbv1.tables import Column, render_table
from fastmbv1.timing import timed

MODEL_NOT_MEASUREMENT = "model, not measurement"
# Kernels a training step launches per layer, (forward, backward), counted from the layer
# list until a GPU trace counts them: one per operator in eager PyTorch. A conv: cuDNN's
# forward, then grad-input and grad-weight (the stem has no grad-input); a linear layer:
# addmm, then two matmuls and the bias gradient's sum; batch norm and ReLU one each way.
# The optimiser is one fused multi-tensor kernel.
EAGER_KERNELS = {
    "conv": (1, 2), "depthwise": (1, 2), "pointwise": (1, 2), "linear": (1, 3),
    "bn+relu": (2, 2), "bn": (1, 1), "relu": (1, 1), "pool": (1, 1), "normalize": (2, 0),
    "sgd": (0, 1),
}  # fmt: skip
# Under autocast each conv and linear weight is cast down forward, its gradient up backward.
CAST_KERNELS = 2
# The loss (log-softmax, label smoothing, the mixing of two labels) both ways and the step's
# bookkeeping (argmax, the count of hits, the loss kept): about a dozen small kernels.
LOSS_KERNELS = 12
# torch.compile leaves the convs to cuDNN and fuses the rest: a batch norm with its ReLU
# into a reduction and a pointwise kernel each way, the casts into those, the loss into few.
COMPILED_LOSS_KERNELS = 4
KERNEL_COUNTING = (
    "kernels counted from the layer list: per conv 1 forward + 2 backward (stem 1), per "
    "linear 1 + 3, per batch norm + ReLU 2 + 2, fused SGD 1, loss and bookkeeping "
    f"{LOSS_KERNELS} (compiled {COMPILED_LOSS_KERNELS}), under autocast {CAST_KERNELS} casts "
    "per weight in eager mode"
)


def activation_bytes(amp: str) -> int:
    return torch.empty((), dtype=batch_dtype(amp)).element_size()


def step_costs(model: nn.Module, cfg: TrainConfig) -> list[LayerCost]:
    """Every layer of ``model`` and the optimiser's update, as ``cfg`` trains it."""
    sgd = optimizer_cost(model, cfg.momentum, cfg.nesterov, cfg.weight_decay)
    return [*layer_costs(model), sgd]


def layer_bounds(
    costs: list[LayerCost], batch: int, amp: str, peak: float, bandwidth: float
) -> list[dict]:
    """Each layer's FLOPs, bytes, arithmetic intensity and lower-bound time in one step."""
    rows = []
    for c in costs:
        flops, moved = c.flops(batch), c.bytes(batch, activation_bytes(amp))
        compute_s, memory_s = flops / peak, moved / bandwidth
        rows.append(
            {
                "layer": c.name,
                "kind": c.kind,
                "flops": flops,
                "bytes": moved,
                "intensity": flops / moved,
                "bound_s": max(compute_s, memory_s),
                "bound_by": "compute" if compute_s >= memory_s else "memory",
            }
        )
    return rows


def layer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, cost: LayerCost, cfg: TrainConfig, device
) -> Callable[[], None]:
    """What layer ``cost`` does in a training step of ``cfg``, alone: forward and backward
    on a random batch of its input's shape (forward only where no gradient flows back), or
    the optimiser's update of every parameter."""
    if cost.kind == "sgd":
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        return optimizer.step
    modules = [model.get_submodule(path) for path in cost.paths]
    params = [p for m in modules for p in m.parameters()]
    x = torch.rand(cfg.batch_size, *cost.in_shape, device=device, dtype=batch_dtype(cfg.amp))
    if x.dim() == 4 and cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(cost.input_grad)

    def forward() -> torch.Tensor:
        y = x
        with autocast(device, cfg.amp):
            for m in modules:  # the model's ReLUs work in place, which a leaf input forbids
                y = torch.relu(y) if isinstance(m, nn.ReLU) else m(y)
        return y

    if cost.kind == "normalize":
        return lambda: forward().detach()
    grad = torch.ones_like(forward())

    def step() -> None:
        x.grad = None  # as zero_grad(set_to_none=True) leaves them: nothing to accumulate into
        for p in params:
            p.grad = None
        forward().backward(grad)

    return step


def time_layers(run: Run, costs: list[LayerCost], steps: int, warmup: int) -> list[float]:
    """Seconds of each layer's part of a training step of ``run``, each timed alone."""
    seconds = []
    for cost in costs:
        fn = layer_step(run.model, run.optimizer, cost, run.cfg, run.device)
        timed(fn, run.device, warmup + 1)
        seconds.append(timed(fn, run.device, steps) / steps)
    return seconds


def grouped(rows: list[dict]) -> list[dict]:
    """The layers as the bench shows them: each conv on its own; every batch norm and ReLU
    as one ``bn+relu`` row; pooling with the classifier. Sums; intensity recomputed."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = {"bn": "bn+relu", "relu": "bn+relu", "bn+relu": "bn+relu", "pool": "classifier",
               "linear": "classifier"}.get(r["kind"], r["layer"])  # fmt: skip
        groups.setdefault(key, []).append(r)
    shown = []
    for name, members in groups.items():
        row = {"layer": name, "kind": members[-1]["kind"], "count": len(members)}
        for key in ("flops", "bytes", "bound_s", "measured_s"):
            if all(key in m for m in members):
                row[key] = sum(m[key] for m in members)
        row["intensity"] = row["flops"] / row["bytes"]
        compute = sum(m["bound_s"] for m in members if m["bound_by"] == "compute")
        row["bound_by"] = "compute" if compute >= row["bound_s"] / 2 else "memory"
        if "measured_s" in row:
            row["over_bound"] = row["measured_s"] / row["bound_s"]
            row["achieved_flops_per_s"] = row["flops"] / row["measured_s"]
        shown.append(row)
    return shown


def step_roofline(
    cfg: TrainConfig, device, peak: float, bandwidth: float, steps: int, warmup: int
) -> dict:
    """The step of ``cfg`` against this machine's ``peak`` FLOP/s (in the step's dtype) and
    ``bandwidth``: model FLOPs per image, the step's lower bound and each layer's bound and
    measured time alone (for ``fastmbv1 bench step``)."""
    run = build_run(cfg, device)
    costs = step_costs(run.model, cfg)
    rows = layer_bounds(costs, cfg.batch_size, cfg.amp, peak, bandwidth)
    for row, s in zip(rows, time_layers(run, costs, steps, warmup), strict=True):
        row["measured_s"] = s
    return {
        "flops_per_image": model_flops_per_image(costs),
        "bound_s": sum(r["bound_s"] for r in rows),
        "layers_s": sum(r["measured_s"] for r in rows),
        "layers": grouped(rows),
    }


LAYER_COLUMNS = [
    Column("layer", "layer", 10),
    Column("n", "count", 2, "d"),
    Column("MFLOP", "flops", 8, ",.1f", scale=1e-6),
    Column("MB", "bytes", 7, ",.2f", scale=1e-6),
    Column("FLOP/B", "intensity", 6, ".1f"),
    Column("bound", "bound_by", 7),
    Column("bound ms", "bound_s", 8, ".3f", scale=1e3),
    Column("measured ms", "measured_s", 11, ".3f", scale=1e3),
    Column("x bound", "over_bound", 7, ".1f"),
    Column("GFLOP/s", "achieved_flops_per_s", 8, ",.1f", scale=1e-9),
]


def format_layers(row: dict) -> str | None:
    """A measured step's table of layers, each alone against its bound; None without."""
    if "layers" not in row:
        return None
    title = (
        f"\n{row['model']} width {row['width']:g}, batch {row['batch_size']}, amp {row['amp']}: "
        f"each layer alone against its bound, max(FLOPs / {row['peak_flops_per_s'] / 1e9:,.1f} "
        f"GFLOP/s, bytes / {row['bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s); alone the layers "
        f"take {row['layers_s']:.4f} s of the step's {row['step_s']:.4f} s"
    )
    return title + "\n" + render_table(LAYER_COLUMNS, row["layers"])


def count_kernels(costs: list[LayerCost], amp: str, compiled: bool) -> int:
    """Kernels per training step, estimated from the layer list (``KERNEL_COUNTING``)."""
    total = COMPILED_LOSS_KERNELS if compiled else LOSS_KERNELS
    for c in costs:
        forward, backward = EAGER_KERNELS[c.kind]
        matmul = c.kind in MATMUL_KINDS
        if matmul and not c.input_grad:
            backward -= 1  # the stem makes no gradient for its input, the data
        total += forward + backward
        if matmul and amp != "off" and not compiled:
            total += CAST_KERNELS
    return total


def predict(preset: str, card: Card) -> dict:
    """The floor of a step and of an epoch of ``preset`` on ``card``, set up as a CUDA GPU
    runs it by default (bf16 autocast and compiled where the preset leaves them open; the
    cpu preset at its narrowest width): a model, not a measurement."""
    cfg = narrowest(make_config({"preset": preset, "device": "cuda"}))
    amp = cfg.amp or default_amp(cuda=True)
    compiled = True if cfg.compile is None else cfg.compile  # the CUDA default
    name, kwargs = model_spec(cfg)
    model = build_model(name, **kwargs)
    costs = step_costs(model, cfg)
    peak, peak_dtype = card.peak(step_dtype(amp))
    bounds = layer_bounds(costs, cfg.batch_size, amp, peak, card.bandwidth)
    roofline_s = sum(r["bound_s"] for r in bounds)
    kernels = count_kernels(costs, amp, compiled)
    launch_s = kernels * card.launch_latency_s
    step_s = max(roofline_s, launch_s)
    steps = TRAIN_IMAGES // cfg.batch_size  # the training pipelines drop the last batch
    return {
        "preset": preset,
        "card": card.name,
        "model": cfg.model,
        "width": cfg.width,
        "batch_size": cfg.batch_size,
        "amp": amp,
        "compile": compiled,
        "peak_dtype": peak_dtype,
        "peak_flops_per_s": peak,
        "bandwidth_bytes_per_s": card.bandwidth,
        "flops_per_image": model_flops_per_image(costs),
        "roofline_step_s": roofline_s,
        "memory_bound_share": sum(r["bound_s"] for r in bounds if r["bound_by"] == "memory")
        / roofline_s,
        "kernels_per_step": kernels,
        "kernels_per_step_eager": count_kernels(costs, amp, compiled=False),
        "launch_step_s": launch_s,
        "step_floor_s": step_s,
        "bound_by": "launches" if launch_s > roofline_s else "roofline",
        "steps_per_epoch": steps,
        "epoch_floor_s": steps * step_s,
        "images_per_s_ceiling": cfg.batch_size / step_s,
        "what": MODEL_NOT_MEASUREMENT,
    }


def card_line(card: Card) -> str:
    peaks = ", ".join(f"{k} {v / 1e12:,.1f}" for k, v in card.peak_flops.items())
    return (
        f"{card.name}: peaks {peaks} TFLOP/s dense, {card.bandwidth / 1e12:.2f} TB/s, "
        f"kernel launch latency {card.launch_latency_s * 1e6:g} us"
    )


def bench_roofline(args: argparse.Namespace, device) -> Table:
    card = read_spec(args.spec) if args.spec else GPUS[args.gpu]
    columns = [
        Column("preset", "preset", 8),
        Column("width", "width", 5, ".2f"),
        Column("batch", "batch_size", 5, "d"),
        Column("amp", "amp", 4),
        Column("compile", "compile", 7),
        Column("peak", "peak_dtype", 4),
        Column("MFLOP/img", "flops_per_image", 9, ",.1f", scale=1e-6),
        Column("roofline ms", "roofline_step_s", 11, ".3f", scale=1e3),
        Column("kernels", "kernels_per_step", 7, "d"),
        Column("launch ms", "launch_step_s", 9, ".3f", scale=1e3),
        Column("step floor ms", "step_floor_s", 13, ".3f", scale=1e3),
        Column("bound by", "bound_by", 8),
        Column("epoch floor s", "epoch_floor_s", 13, ".2f"),
        Column("images/s ceiling", "images_per_s_ceiling", 16, ",.0f"),
        Column("", "what"),
    ]

    def footer(rows: list[dict]) -> str:
        return (
            f"{card_line(card)} (the launch latency is assumed, not published)\n"
            "step floor = max(sum over layers of max(FLOPs / peak, bytes / bandwidth), "
            f"kernels x launch latency); epoch floor = the steps of {TRAIN_IMAGES:,} images x "
            "step floor; data loading and evaluation are left out\n"
            f"{KERNEL_COUNTING}; a GPU trace replaces this count\n"
            f"every figure above is a {MODEL_NOT_MEASUREMENT}"
        )

    rows = (predict(preset, card) for preset in args.presets)
    return Table(columns, rows, footer, saved_as=args.gpu or Path(args.spec).stem)


def bench_peak(args: argparse.Namespace, device) -> Table:
    """This machine's roofs, measured now and cached: what MFU and the roofline divide by."""

    def rows():
        measured = measure_peaks(device, args.dtypes)
        best = cached_peaks(device)
        for dtype, flops in measured["flops"].items():
            cached = best.get("flops", {}).get(dtype, {})
            yield {"roof": f"matmul {dtype}", "now": flops, "unit": "GFLOP/s",
                   "best": cached.get("flops_per_s"), "when": cached.get("measured")}  # fmt: skip
        cached = best.get("bandwidth", {})
        size = measured["buffer_bytes"] / 2**20
        yield {"roof": f"copy {size:,.0f} MiB", "now": measured["bandwidth"], "unit": "GB/s",
               "best": cached.get("bytes_per_s"), "when": cached.get("measured")}  # fmt: skip

    columns = [
        Column("roof", "roof", 14),
        Column("now", "now", 9, ",.1f", scale=1e-9),
        Column("cached", "best", 9, ",.1f", scale=1e-9),
        Column("unit", "unit", 7),
        Column("cached since", "when"),
    ]

    def footer(rows: list[dict]) -> str:
        return (
            f"cached in {cache_file()}: the highest figures measured on this machine, which "
            "fastmbv1 train divides by for its MFU and fastmbv1 bench step shows beside its own"
        )

    return Table(columns, rows(), footer)
