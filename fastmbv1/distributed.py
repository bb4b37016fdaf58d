"""Data parallelism under ``torchrun``: one process per GPU (NCCL) or per CPU worker (gloo).

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op
for a single process. ``FASTMBV1_DDP=1`` under ``torchrun --nproc-per-node 1`` joins the
process group and wraps the model in DDP all the same, so one GPU shows what DDP costs a
step (the GPU check does this). ``--batch-size`` is the global batch: each of N ranks takes
1/N of it, so a recipe (batch, LR, steps per epoch) means the same thing on 1 GPU or on N.

Failures: every collective gives up after ``--rank-timeout`` seconds (a hung or stopped rank),
and ``lost_ranks`` turns what the backend then raises into one line. Each round of
workers that ``torchrun --max-restarts`` starts meets in a store of its own
(``round_store``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fastmbv1.errors import LostRank, UserError, one_line

# NCCL's watchdog aborts the whole process when a collective outlives its timeout; it waits
# this much longer than the host's gloo group, whose timeout ends the run in one line first.
NCCL_GRACE_S = 60.0
# How long a rank that found a store address waits to reach it before asking again.
STORE_PROBE_S = 2.0
ROUND_KEY = "fastmbv1/round-store"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # A gloo group beside NCCL: host values (clock, signals) reduce on the CPU, so agreeing
    # on them never synchronises a GPU stream. None on a single process or where gloo is
    # the default group already.
    host_group: Any = None
    forced: bool = False  # joined with one rank, for FASTMBV1_DDP=1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether a process group is joined: the model is wrapped in DDP, ranks agree."""
        return self.size > 1 or self.forced

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


# Set to 1 to join a process group (and train through DDP) even with one rank.
FORCE_DDP = "FASTMBV1_DDP"


class Agreement:
    """What each rank knows that all must act on alike (the schedule's progress, a signal, a
    non-finite loss), gathered from every rank once a step on the host.

    Across machines a collective is a network round trip, so it travels while the step
    computes and is used one step late: ``exchange`` sends this step's values and returns
    every rank's values of the step before. Every rank gets the same rows, so each computes
    the same decision (the same LR, the same step to stop at) without waiting. ``now``
    returns this call's own rows instead (the epoch's end); a first call always does. On a
    single process, the rows are this process's values at once.
    """

    def __init__(self, world: World):
        self.world = world
        self.pending: tuple[Any, list[torch.Tensor]] | None = None

    def exchange(self, values: list[float], now: bool = False) -> list[list[float]]:
        if not self.world.active:
            return [list(values)]
        before = self.finish()
        mine = torch.tensor(values, dtype=torch.float64)
        rows = [torch.empty_like(mine) for _ in range(self.world.size)]
        work = dist.all_gather(rows, mine, group=self.world.host_group, async_op=True)
        self.pending = (work, rows)
        return self.finish() if now or before is None else before

    def finish(self) -> list[list[float]] | None:
        """The rows of the exchange in flight (waiting for them), or None."""
        if self.pending is None:
            return None
        (work, rows), self.pending = self.pending, None
        work.wait()
        return [r.tolist() for r in rows]


@contextmanager
def lost_ranks(timeout_s: float) -> Iterator[None]:
    """Turn a collective that failed because another rank is gone or silent (gloo's "Timed
    out waiting ...", "Connection reset by peer", NCCL's errors) into ``LostRank``, a
    one-line error; anything else passes through."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        text = str(e).lower()
        if not dist.is_initialized() or not any(k in text for k in ("gloo", "nccl", "timed out")):
            raise
        why = one_line(e).split("] ", 1)[-1]  # gloo starts with its source file: "[...cc:78] "
        raise LostRank(
            f"rank {dist.get_rank()}: the other ranks stopped answering ({why}); one of them "
            f"crashed, hung or was stopped (a collective waits --rank-timeout {timeout_s:g} s): "
            "see its log"
        ) from None


def restarted() -> bool:
    """Whether torchrun restarted this worker after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def round_store(rank: int, size: int, timeout: timedelta) -> dist.Store:
    """A store for this round of workers alone, hosted by rank 0 on a free port.

    torchrun's c10d and static rendezvous hand every round of workers the same TCPStore
    (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py creates it once per agent,
    ``if self._bootstrap_store_info is None``), and ``init_process_group`` writes the same
    keys in every round ("default_pg" prefix, group "0"). So a restarted round can read the
    dead round's gloo addresses: "Gloo connectFullMesh failed ... Connection refused", or a
    hang. TORCHELASTIC_RESTART_COUNT cannot name the round: each agent counts its own
    restarts, and they differ between nodes. Instead, rank 0 starts a new store and
    publishes its port and a fresh token through torchrun's store; the others take an
    address only from a store that answers with that token. A stale address points at a
    dead round's rank 0 (all of a round's workers stop before the next round starts), so it
    either refuses the connection or, if its port was reused, holds another token.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
    if rank == 0:
        token = uuid.uuid4().hex
        store = dist.TCPStore(addr, 0, size, True, timeout, wait_for_workers=False)
        store.set(ROUND_KEY, token)
        agent.set(ROUND_KEY, f"{store.port} {token}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        found_port, token = agent.get(ROUND_KEY).decode().split()
        try:
            store = dist.TCPStore(
                addr, int(found_port), is_master=False, timeout=timedelta(seconds=STORE_PROBE_S)
            )
            if store.get(ROUND_KEY).decode() == token:
                store.set_timeout(timeout)
                return store
        except (RuntimeError, dist.DistError):
            pass  # the dead round's address, or its port taken by another store
        if time.monotonic() > deadline:
            raise LostRank(f"rank {rank}: rank 0 did not start this round's store in time")
        time.sleep(0.2)


def init(device: torch.device, timeout_s: float) -> World:
    """Join the process group that torchrun describes in the environment (if any); every
    collective then fails after ``timeout_s`` seconds without an answer."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    forced = os.environ.get(FORCE_DDP) == "1"
    if size == 1 and not forced:
        return World()
    if "MASTER_ADDR" not in os.environ:
        raise UserError(f"{FORCE_DDP}=1 needs torchrun: torchrun --nproc-per-node 1 -m fastmbv1")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.type == "cuda"
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        backend = "nccl" if cuda else "gloo"
        group_timeout = timedelta(seconds=timeout_s + NCCL_GRACE_S) if cuda else timeout
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = round_store(rank, size, timeout)
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=size, timeout=group_timeout
            )
        else:
            dist.init_process_group(backend, timeout=group_timeout)
    host_group = (
        dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    )
    return World(rank, size, local_rank, host_group, forced=size == 1)


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
