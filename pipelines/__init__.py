"""Data pipelines behind one interface: ``build_pipeline(name, images, labels, ...)``.

A pipeline turns uint8 images (N, 32, 32, 3) and integer labels (N,) into batches ``(x, y)``
on a device: ``x`` float (B, 3, 32, 32) in [0, 1], channels_last, of the requested dtype;
``y`` int64, the given labels. ``len(p)`` is the number of batches per epoch; each ``iter(p)``
is one epoch, numbered from ``p.epoch`` (settable, for resume), drawn from ``seed`` and that
number alone (see ``pipelines.sampling``).

A new pipeline is one module in this package with ``build(images, labels, **settings)``
(usually returning a ``pipelines.sampling.PipelineBase`` subclass), ``unavailable(device)``,
the names of its own options in ``OPTIONS`` if it has any, and a line in ``MODULES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Protocol

import numpy as np
import torch

from fastmbv1.errors import UserError
from pipelines.sampling import MAX_SHIFT

# name -> module; imported lazily so that a missing optional package (DALI) costs nothing.
MODULES = {
    "dali": "pipelines.dali",
    "torch": "pipelines.torch_batched",
    "torchvision": "pipelines.torchvision_loader",
}


class Pipeline(Protocol):
    epoch: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def _module(name: str) -> ModuleType:
    if name not in MODULES:
        raise UserError(f"unknown pipeline {name!r}; choose from {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name])


def unavailable(name: str, device: torch.device | str) -> str | None:
    """Why pipeline ``name`` cannot run on ``device`` here, or None if it can."""
    return _module(name).unavailable(torch.device(device))


def available(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Every pipeline name -> None where it works on ``device``, else the reason it doesn't."""
    return {name: unavailable(name, device) for name in MODULES}


def default_pipeline(device: torch.device | str) -> str:
    """DALI where it runs on the device's own hardware, else the torch pipeline."""
    device = torch.device(device)
    if device.type == "cuda" and unavailable("dali", device) is None:
        return "dali"
    return "torch"


def build_pipeline(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    train: bool,
    device: torch.device | str,
    seed: int,
    dtype: torch.dtype = torch.float32,
    drop_last: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
    alternate_flips: bool = False,
    translate: int = MAX_SHIFT,
    **options,
) -> Pipeline:
    """Build pipeline ``name``; ``drop_last`` defaults to ``train``; ``alternate_flips`` and
    ``translate``: see ``pipelines.sampling.shifts_and_flips``; ``options`` are its own (for
    example ``num_workers`` for torchvision)."""
    device = torch.device(device)
    reason = unavailable(name, device)
    if reason is not None:
        raise UserError(f"pipeline {name!r} is unavailable on {device}: {reason}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if not 0 <= translate <= MAX_SHIFT:
        raise UserError(f"translate must be in 0..{MAX_SHIFT} pixels, got {translate}")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise UserError(f"images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise UserError(f"{labels.shape[0]} labels for {images.shape[0]} images")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UserError(f"pipeline dtype must be float32, float16 or bfloat16, got {dtype}")
    module = _module(name)
    unknown = sorted(set(options) - set(getattr(module, "OPTIONS", ())))
    if unknown:
        raise UserError(f"pipeline {name!r} has no option {', '.join(unknown)}")
    # DALI takes densely packed arrays only, and a transposed view (CIFAR-10 is stored planar)
    # is not one. Copying it once here, which costs nothing for a contiguous array or memory
    # map, lets every pipeline gather batches from whatever view it is given.
    images = np.ascontiguousarray(images)
    return module.build(
        images,
        labels,
        batch_size=batch_size,
        train=train,
        device=device,
        seed=seed,
        dtype=dtype,
        drop_last=train if drop_last is None else drop_last,
        rank=rank,
        world_size=world_size,
        alternate_flips=alternate_flips,
        translate=translate,
        **options,
    )
