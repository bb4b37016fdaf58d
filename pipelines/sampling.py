"""What every pipeline draws per epoch (the visiting order and each sample's shift and flip),
and ``PipelineBase``, the base class that hands each epoch its draws.

All draws come from numpy generators seeded by (seed, epoch, stream), so an epoch is
reproducible from the seed and its number alone, whichever pipeline consumes it, and a
resumed run sees the very same epochs. Under data parallelism every rank draws the same
permutation and takes its own interleaved shard of it.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_SHIFT = 4  # Pad(4) + RandomCrop(32): shifts of -4..4 on each axis
# Generator streams, so the order never depends on the augmentation, nor the shifts on
# whether flips alternate.
ORDER, AUGMENT, FLIPS = 0, 1, 2


def rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def epoch_indices(
    n: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    train: bool,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
) -> np.ndarray:
    """Sample indices this rank visits in ``epoch``, already cut to whole batches if asked.

    Every rank gets the same number of samples (and so of batches), so none waits at the end
    of an epoch for a batch that never comes.
    """
    order = rng(seed, epoch, ORDER).permutation(n) if train else np.arange(n)
    mine = order[rank::world_size]
    if train:  # equal shares, so every rank runs the same number of steps
        mine = mine[: n // world_size]
    if drop_last:
        mine = mine[: len(mine) - len(mine) % batch_size]
    return mine


def shifts_and_flips(
    n: int, *, seed: int, epoch: int, alternate: bool = False, translate: int = MAX_SHIFT
) -> tuple[np.ndarray, ...]:
    """Shifts dy, dx in -translate..translate (at most ``MAX_SHIFT``, the pipelines'
    padding) and a flip flag for each of the ``n`` samples, by sample index.

    Drawn by index rather than by position in the order, so a sample's augmentation in an
    epoch is the same whatever rank or batch it lands in. With ``alternate`` (airbench's
    alternating flip) a random half is flipped in even epochs and the other half in odd
    ones, so any two epochs in a row show every image both ways, where independent coin
    flips show a quarter of them only one way.
    """
    g = rng(seed, epoch, AUGMENT)
    dy = g.integers(-translate, translate + 1, n)
    dx = g.integers(-translate, translate + 1, n)
    flip = g.integers(0, 2, n).astype(bool)
    if alternate:
        flip = rng(seed, 0, FLIPS).integers(0, 2, n).astype(bool) ^ bool(epoch % 2)
    return dy, dx, flip


class PipelineBase:
    """The base of every pipeline: its settings, the epoch counter, each epoch's indices and
    the number of batches per epoch.

    ``epoch`` is the number of the next epoch that iterating will produce (set it to resume).
    """

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        seed: int,
        dtype: torch.dtype,
        drop_last: bool,
        rank: int,
        world_size: int,
        alternate_flips: bool,
        translate: int,
    ) -> None:
        self.n, self.batch_size, self.train, self.device = n, batch_size, train, device
        self.seed, self.dtype, self.drop_last = seed, dtype, drop_last
        self.rank, self.world_size = rank, world_size
        self.alternate_flips, self.translate = alternate_flips, translate
        self.epoch = 0

    def indices(self, epoch: int) -> np.ndarray:
        return epoch_indices(
            self.n,
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            train=self.train,
            drop_last=self.drop_last,
            rank=self.rank,
            world_size=self.world_size,
        )

    def shifts_and_flips(self, epoch: int) -> tuple[np.ndarray, ...]:
        """Every sample's shift and flip in ``epoch``, by sample index."""
        return shifts_and_flips(
            self.n,
            seed=self.seed,
            epoch=epoch,
            alternate=self.alternate_flips,
            translate=self.translate,
        )

    def __len__(self) -> int:
        return -(-len(self.indices(0)) // self.batch_size)

    def next_epoch(self) -> int:
        """The number of the epoch to produce now; advances the counter."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch
