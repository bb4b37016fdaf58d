"""The whole data set as one uint8 tensor on the device, augmented a batch at a time.

Translation and flip are one gather: each sample's 32 rows and 32 columns are read from the
zero-padded image at its own offset, with the column order reversed where it is flipped.
No per-sample Python, no host round-trip on CUDA: the plan for the epoch (order, shifts,
flips) goes to the device once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.sampling import MAX_SHIFT, PipelineBase


def unavailable(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


class TorchPipeline(PipelineBase):
    def __init__(self, images: np.ndarray, labels: np.ndarray, **settings) -> None:
        super().__init__(len(images), **settings)
        device, train = self.device, self.train
        # Copies: the arrays may be read-only memory maps of the cache.
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.int64, device=device)
        images = torch.tensor(np.asarray(images), device=device)  # (N, 32, 32, 3) uint8
        if train:  # pad once, so every batch is a plain gather with zero fill built in
            p = MAX_SHIFT
            images = F.pad(images.permute(0, 3, 1, 2), (p, p, p, p)).permute(0, 2, 3, 1)
            images = images.contiguous()
        self.images = images
        self.base = torch.arange(32, device=device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.next_epoch()
        order = torch.as_tensor(self.indices(epoch), device=self.device)
        if self.train:
            dy, dx, flip = (
                torch.as_tensor(a, device=self.device) for a in self.shifts_and_flips(epoch)
            )
            # Row r of the output reads padded row r + 4 - dy; column c reads c + 4 - dx,
            # mirrored (31 - c) first when flipped: the same as Pad(4), crop, then flip.
            rows = self.base + MAX_SHIFT - dy[:, None]
            cols = torch.where(flip[:, None], self.base.flip(0), self.base) + MAX_SHIFT
            cols = cols - dx[:, None]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.train:
                r, c = rows[idx], cols[idx]
                x = self.images[idx[:, None, None], r[:, :, None], c[:, None, :]]
            else:
                x = self.images[idx]
            # (B, 32, 32, 3) contiguous, viewed as (B, 3, 32, 32), is channels_last already.
            x = x.permute(0, 3, 1, 2).to(self.dtype).div_(255)
            yield x, self.labels[idx]


def build(images: np.ndarray, labels: np.ndarray, **kw) -> TorchPipeline:
    return TorchPipeline(images, labels, **kw)
