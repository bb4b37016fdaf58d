"""The original project's loader: PIL transforms per image through a torch DataLoader.

Kept as the baseline the other pipelines are measured against, so it does what the original
did, at the original's cost: ``Pad(4)``, a 32x32 crop, a horizontal flip and ``ToTensor()``
on one PIL image at a time, in ``num_workers`` processes (0 by default, as the original).
Where to crop and whether to flip come from the epoch's plan (``pipelines.sampling``), as in
the other pipelines, so all three hand over the same batches; the original drew both at
random per image, with the same distribution.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import VisionDataset
from torchvision.transforms import functional as TF

from fastmbv1.errors import UserError
from pipelines.sampling import MAX_SHIFT, PipelineBase


def unavailable(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


class ArrayDataset(VisionDataset):
    """CIFAR-10 as ``torchvision.datasets.CIFAR10`` serves it, from arrays in memory.

    ``plan`` holds each sample's shift (dy, dx) and flip for the epoch, or None for plain
    images; every worker gets a fresh copy of it when an epoch's loader starts.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        super().__init__(root=None)
        self.images, self.labels = images, labels
        self.pad = transforms.Pad(MAX_SHIFT)
        self.plan: tuple[np.ndarray, ...] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[index])
        if self.plan is not None:
            dy, dx, flip = (a[index] for a in self.plan)
            # Output row r is padded row r + 4 - dy (the same convention as the torch
            # pipeline's gather), then the crop is mirrored where the plan says so.
            img = TF.crop(self.pad(img), MAX_SHIFT - int(dy), MAX_SHIFT - int(dx), 32, 32)
            if flip:
                img = TF.hflip(img)
        return TF.to_tensor(img), int(self.labels[index])


class TorchvisionPipeline(PipelineBase):
    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        num_workers: int,
        pin_memory: bool,
        **settings,
    ) -> None:
        super().__init__(len(images), **settings)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.dataset = ArrayDataset(np.asarray(images), np.asarray(labels))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.next_epoch()
        # Set before the loader starts: each epoch's workers get a fresh copy of the dataset.
        self.dataset.plan = self.shifts_and_flips(epoch) if self.train else None
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.indices(epoch).tolist(),  # already cut to whole batches if asked
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Its own generator: the loader draws a seed for its workers every epoch, which
            # would otherwise come from (and move) the caller's global one.
            generator=torch.Generator().manual_seed(epoch),
        )
        for x, y in loader:
            x = x.to(self.device, non_blocking=self.pin_memory)
            x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=self.pin_memory)


OPTIONS = ("num_workers", "pin_memory")


def build(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    **settings,
) -> TorchvisionPipeline:
    """``num_workers``: loader processes (0 = in this one); ``pin_memory``: page-locked
    batches for asynchronous copies, by default when the device is a GPU."""
    if not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be a whole number >= 0, got {num_workers!r}")
    if pin_memory is None:
        pin_memory = settings["device"].type == "cuda"
    return TorchvisionPipeline(
        images, labels, num_workers=num_workers, pin_memory=pin_memory, **settings
    )
