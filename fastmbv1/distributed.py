"""Data parallelism under ``torchrun``: one process per GPU (NCCL) or per CPU worker (gloo).

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op
for a single process. ``--batch-size`` is the global batch: each of N ranks takes 1/N of it,
so a recipe (batch, LR, steps per epoch) means the same thing on 1 GPU or on N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastmbv1.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # A gloo group beside NCCL: host values (clock, signals) reduce on the CPU, so agreeing
    # on them never synchronises a GPU stream. None on a single process or where gloo is
    # the default group already.
    host_group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """On CUDA each rank drives the GPU of its local rank."""
        if device.type == "cuda" and self.active:
            return torch.device("cuda", self.local_rank)
        return device

    def max_over_ranks(self, *values: float) -> list[float]:
        """Each value's largest over all ranks, computed on the host.

        Ranks must take the same LR and stop at the same step, or their weights drift and
        a rank waits forever in an all-reduce that the others never join.
        """
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return t.tolist()

    def sum(self, values: list[int], device: torch.device) -> list[int]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def share_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BN statistics) on every rank. DDP does not send them
        (``broadcast_buffers=False``), so each rank holds the statistics of its own batches;
        evaluating or saving needs one model."""
        if self.active:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init(device: torch.device) -> World:
    """Join the process group that torchrun describes in the environment (if any)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.type == "cuda"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return World(rank, size, local_rank, host_group)


def split_batch(batch_size: int, world: World) -> int:
    if batch_size % world.size:
        raise UserError(
            f"--batch-size {batch_size} (the global batch) must divide evenly over "
            f"{world.size} ranks"
        )
    return batch_size // world.size


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
