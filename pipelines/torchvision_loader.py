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
from pipelines.sampling import epoch_indices, rng

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


class TorchvisionPipeline:
    def __init__(self, images, labels, *, batch_size, train, device, seed, dtype, drop_last,
                 rank, world_size, num_workers, pin_memory):  # fmt: skip
        self.batch_size, self.train, self.device = batch_size, train, device
        self.seed, self.dtype, self.drop_last = seed, dtype, drop_last
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch = 0
        if train:
            transform = transforms.Compose([
                transforms.Pad(4),
                transforms.RandomHorizontalFlip(),
                transforms.RandomCrop(32),
                transforms.ToTensor(),
            ])  # fmt: skip
        else:
            transform = transforms.ToTensor()
        self.dataset = ArrayDataset(np.asarray(images), np.asarray(labels), transform)

    def _indices(self, epoch: int) -> np.ndarray:
        return epoch_indices(len(self.dataset), self.batch_size, seed=self.seed, epoch=epoch,
                             train=self.train, drop_last=self.drop_last,
                             rank=self.rank, world_size=self.world_size)  # fmt: skip

    def __len__(self) -> int:
        return -(-len(self._indices(0)) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        # Set before the loader starts: each epoch's workers get a fresh copy of the dataset.
        draws = rng(self.seed, epoch, TRANSFORMS)
        self.dataset.seeds = draws.integers(2**63 - 1, size=len(self.dataset))
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self._indices(epoch).tolist(),  # already cut to whole batches if asked
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


def build(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    train: bool,
    device: torch.device,
    seed: int,
    dtype: torch.dtype,
    drop_last: bool,
    rank: int,
    world_size: int,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    **options,
) -> TorchvisionPipeline:
    """``num_workers``: loader processes (0 = in this one); ``pin_memory``: page-locked
    batches for asynchronous copies, by default when the device is a GPU."""
    if options:
        raise UserError(f"pipeline 'torchvision' has no option {', '.join(options)}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"num_workers must be a whole number >= 0, got {num_workers!r}")
    return TorchvisionPipeline(
        images, labels, batch_size=batch_size, train=train, device=device, seed=seed,
        dtype=dtype, drop_last=drop_last, rank=rank, world_size=world_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda" if pin_memory is None else pin_memory,
    )  # fmt: skip
