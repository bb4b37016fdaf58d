"""What the benches measure on: CIFAR-10 or random images of its shape, the presets as
``fastmbv1 train`` would run them here, the pipelines asked for, and where traces go."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from fastmbv1.config import TrainConfig, narrowest
from fastmbv1.errors import UserError
from fastmbv1.plan import make_config, resolve
from fastmbv1.profile import StepTrace
from pipelines import MODULES, unavailable
from pipelines.cifar10 import CIFAR10, load_cifar10

# CIFAR-10's sizes: measurements on part of the data are scaled to a full epoch with these.
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
# Steps a --trace records: enough to see the step's pattern, few enough to open quickly.
TRACE_STEPS = 5


def load_data(data: str | None, images: int | None = None, synthetic: bool = False) -> CIFAR10:
    """CIFAR-10 (or random images of its shape), cut to the first ``images`` of each split."""
    if not synthetic:
        c = load_cifar10(data)
        return CIFAR10(
            c.train_images[:images],
            c.train_labels[:images],
            c.test_images[:images],
            c.test_labels[:images],
            c.source,
        )
    rng = np.random.default_rng(0)
    n_train, n_test = (min(images or n, n) for n in (TRAIN_IMAGES, TEST_IMAGES))
    return CIFAR10(
        rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_train),
        rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_test),
        source=None,
    )


def data_for(args: argparse.Namespace) -> CIFAR10:
    return load_data(args.data, args.images, args.synthetic)


def preset_config(name: str, device: torch.device) -> TrainConfig:
    """Preset ``name`` as ``fastmbv1 train`` would run it on ``device`` (a width that a run
    would fit to its budget at its narrowest)."""
    return narrowest(resolve(make_config({"preset": name, "device": device.type}), device)[0])


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=int,...``, e.g. ``torchvision:num_workers=2``."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise UserError(f"pipeline option {item!r} in {spec!r} is not key=integer")
        options[key] = int(value)
    return name, options


def pipeline_specs(
    args: argparse.Namespace, device, extra: str | None = None
) -> list[tuple[str, dict, str | None]]:
    """(name, options, why it cannot run here or None) for ``--pipelines`` or the default:
    every pipeline, plus torchvision with one worker per core, plus the bench's own
    ``extra`` pipeline (which runs everywhere) if it has one."""
    specs = args.pipelines or [*MODULES, f"torchvision:num_workers={os.cpu_count()}", extra]
    parsed = [parse_spec(s) for s in specs if s]
    for name, opts in parsed:
        if name == "torchvision":
            opts.setdefault("num_workers", 0)  # its default, said in the table
    return [
        (name, opts, None if name == extra else unavailable(name, device)) for name, opts in parsed
    ]


def step_trace(args: argparse.Namespace, device, *label: str) -> StepTrace | None:
    """A StepTrace into ``--trace``'s folder, one subfolder per measured row; None without."""
    if not getattr(args, "trace", None):
        return None
    return StepTrace(Path(args.trace) / "-".join(filter(None, label)), device, TRACE_STEPS)
