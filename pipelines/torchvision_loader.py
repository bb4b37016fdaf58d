"""The original project's loader: PIL transforms per image through a torch DataLoader.

Kept as the baseline the other pipelines are measured against, so it does what the original
did: ``Pad(4)``, ``RandomHorizontalFlip()``, ``RandomCrop(32)``, ``ToTensor()`` on one PIL
image at a time, in ``num_workers`` processes (0 by default, as the original). Its random
draws are torchvision's own, not ``pipelines.sampling``'s; only the visiting order is shared.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import VisionDataset

from fastmbv1.errors import UserError
from pipelines.sampling import PipelineBase, rng

TRANSFORMS = 2  # generator stream beside sampling.ORDER and sampling.AUGMENT


def unavailable(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


class ArrayDataset(VisionDataset):
    """CIFAR-10 as ``torchvision.datasets.CIFAR10`` serves it, from arrays in memory.

    Each sample's transforms run on torch's generator seeded with that sample's own seed for
    the epoch, so an epoch is the same whatever the number of workers or the order in which
    they finish, and the caller's global generator is left as it was.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        super().__init__(root=None, transform=transform)
        self.images, self.labels = images, labels
        self.seeds = np.zeros(len(images), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[index])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(self.seeds[index]))
            img = self.transform(img)
        return img, int(self.labels[index])


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
        train = self.train
        if train:
            transform = transforms.Compose(
                [
                    transforms.Pad(4),
                    transforms.RandomHorizontalFlip(),
                    transforms.RandomCrop(32),
                    transforms.ToTensor(),
                ]
            )
        else:
            transform = transforms.ToTensor()
        self.dataset = ArrayDataset(np.asarray(images), np.asarray(labels), transform)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.next_epoch()
        # Set before the loader starts: each epoch's workers get a fresh copy of the dataset.
        draws = rng(self.seed, epoch, TRANSFORMS)
        self.dataset.seeds = draws.integers(2**63 - 1, size=len(self.dataset))
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.indices(epoch).tolist(),  # already cut to whole batches if asked
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Its own generator: the loader draws a seed for its workers every epoch, which
            # would otherwise come from (and move) the caller's global one.
            generator=torch.Generator().manual_seed(int(draws.integers(2**63 - 1))),
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
