"""``fastmbv1 info``: what a model costs: parameters, MACs, bytes on disk, latency, throughput."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from fastmbv1.checkpoint import model_from_record, read_checkpoint, save_model
from fastmbv1.errors import UserError
from fastmbv1.flops import ELEMENTWISE_FLOPS, layer_costs
from fastmbv1.machine import pick_device
from fastmbv1.models import build_model
from fastmbv1.tables import Column, render_table

IMAGE_SHAPE = (3, 32, 32)


def model_cost(model: nn.Module) -> dict[str, int]:
    """Parameters and multiply-accumulates for one 32x32 image, from the layer shapes.

    ``macs`` counts the conv and linear layers; at inference BN folds into the convs, so that
    is all the arithmetic. ``macs_with_bn`` adds 5 ops per BatchNorm element (fvcore's count
    for a BN left in training mode); that convention reproduces the original project's
    48.4 M (MobileNetV1) and 28.4 M (CustomMobileNet) to within 0.1 %, which conv/linear
    alone does not.
    """
    costs = layer_costs(model, IMAGE_SHAPE[-1])
    macs = sum(c.macs for c in costs)
    bn_elements = sum(math.prod(c.in_shape) for c in costs if c.kind in ("bn", "bn+relu"))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": macs,
        "macs_with_bn": macs + ELEMENTWISE_FLOPS["bn"][0] * bn_elements,
    }


def file_size(model: nn.Module, name: str, kwargs: dict) -> int:
    """Bytes of the model file that ``save_model`` writes (weights, buffers and metadata)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        save_model(path, model, name, kwargs)
        return path.stat().st_size


@torch.inference_mode()
def batch_seconds(model: nn.Module, device: torch.device, batch: int, repeats: int) -> float:
    """Median wall time of one forward pass of ``batch`` images, after warm-up passes."""
    x = torch.rand(batch, *IMAGE_SHAPE, device=device)

    def run() -> float:
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":  # kernels run asynchronously; wait for them
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(3):  # allocator, cuDNN algorithm choice, lazy initialisation
        run()
    return statistics.median(run() for _ in range(repeats))


def describe(
    model: nn.Module,
    name: str,
    kwargs: dict,
    device: torch.device,
    repeats: int = 20,
    batch_size: int = 512,
) -> dict:
    """Everything ``fastmbv1 info`` reports about ``model``, as a JSON-able dict."""
    model = model.eval()
    report = {"model": name, "kwargs": kwargs, **model_cost(model)}
    report["size_bytes"] = file_size(model, name, kwargs)
    model = model.to(device)
    report["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report["latency_ms"] = 1000 * batch_seconds(model, device, 1, repeats)
    report["batch_size"] = batch_size
    report["images_per_s"] = batch_size / batch_seconds(model, device, batch_size, repeats)
    return report


def format_report(r: dict) -> str:
    args = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items())
    lines = {
        "model": f"{r['model']}({args})",
        "parameters": f"{r['params']:,}",
        "MACs / image": f"{r['macs'] / 1e6:.2f} M conv+linear ({r['macs_with_bn'] / 1e6:.2f} M "
        "with 5 ops per BN element, as the original's figures count)",
        "size on disk": f"{r['size_bytes'] / 2**20:.2f} MiB ({r['size_bytes']:,} bytes)",
        "latency": f"{r['latency_ms']:.2f} ms (batch 1, median, {r['device']})",
        "throughput": f"{r['images_per_s']:,.0f} images/s (batch {r['batch_size']})",
    }
    rows = [{"what": what, "value": value} for what, value in lines.items()]
    return render_table([Column("", "what"), Column("", "value")], rows, header=False)


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.batch_size < 1:
        raise UserError("--repeats and --batch-size must be >= 1")
    if args.checkpoint:
        if args.width is not None:
            raise UserError("--width applies to --model; a checkpoint knows its own widths")
        record = read_checkpoint(args.checkpoint)
        record = record.get("model_record", record)  # a training checkpoint wraps one
        model = model_from_record(record, args.checkpoint)
        name, kwargs = record["model"], record["kwargs"]
    else:
        width = 1.0 if args.width is None else args.width
        if not (math.isfinite(width) and width > 0):
            raise UserError(f"--width must be > 0, got {width}")
        name, kwargs = args.model, {"width": width}
        model = build_model(name, **kwargs)
    device = pick_device(args.device)
    report = describe(model, name, kwargs, device, args.repeats, args.batch_size)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
