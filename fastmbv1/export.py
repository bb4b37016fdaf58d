"""``fastmbv1 export``: a saved model as ONNX or TorchScript, for use without this package.

The graph takes float (N, 3, 32, 32) RGB in [0, 1] and returns (N, 10) logits: the model's
Normalize layer is part of it, and the batch dimension stays dynamic.
"""

from __future__ import annotations

import argparse
import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from fastmbv1.checkpoint import load
from fastmbv1.errors import UserError
from fastmbv1.info import IMAGE_SHAPE

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def export_onnx(model: nn.Module, path: Path) -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"ONNX export needs {' and '.join(missing)}: pip install 'fastmbv1[export]'"
        )
    # torch.export-based exporter (dynamo=True): the TorchScript-based one is deprecated.
    # external_data=False keeps the weights inside the one .onnx file.
    torch.onnx.export(
        model,
        (torch.rand(1, *IMAGE_SHAPE),),
        path,
        dynamo=True,
        external_data=False,
        verbose=False,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )


def export_torchscript(model: nn.Module, path: Path) -> None:
    # TorchScript is deprecated in favour of torch.export, but LibTorch (C++) still loads
    # only this format; the user asked for it by name, so its warnings are noise here.
    # Tracing suffices: the models have no data-dependent control flow. check_trace would
    # re-trace and compare graphs for seconds; the tests compare outputs instead.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        traced = torch.jit.trace(model, torch.rand(1, *IMAGE_SHAPE), check_trace=False)
    traced.save(str(path))


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}


def export_model(model: nn.Module, path: str | Path, fmt: str) -> None:
    """Write ``model`` (moved to the CPU, eval mode) to ``path`` as ``fmt``."""
    EXPORTERS[fmt](model.cpu().eval(), Path(path))


def run(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    model = load(checkpoint)
    out = Path(args.out) if args.out else checkpoint.with_suffix(SUFFIXES[args.format])
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder, not a file")
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise UserError(f"--out {out} would overwrite the checkpoint")
    export_model(model, out, args.format)
    print(f"wrote {out} ({args.format}, {out.stat().st_size:,} bytes)")
    return 0
